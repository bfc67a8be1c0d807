"""``python -m lightning_whiten`` runs the ``lightning-whiten`` command."""

import sys

from .cli import main

sys.argv[0] = "lightning-whiten"  # usage and help name the command, not __main__.py
main()
