"""``python -m lightning_whiten`` runs the ``lightning-whiten`` command."""

from .cli import main

main()
