"""The ``lightning-whiten`` command: LightningCLI with the project's model and datamodules.

    lightning-whiten fit --config recipes/quickstart.yaml
    lightning-whiten fit --config recipes/quickstart.yaml --trainer.max_epochs 2 --print_config
    python -m lightning_whiten validate --config recipes/quickstart.yaml --ckpt_path last.ckpt

Model and datamodules resolve by short class name (``--data Digits``); ``WhiteningCallback``
and ``WhiteningMonitor`` can be configured as trainer callbacks in YAML. The datamodule's
``num_classes`` is linked to the model's. The resolved config is saved with every run.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

# Imported so that their classes resolve by short name in configs and on the command line.
from . import callbacks as _callbacks  # noqa: F401
from .data import CIFAR10, CIFAR100, Digits, ImageDataModule, ImageFolder, SyntheticImages  # noqa: F401
from .models import ImageClassifier

__all__ = ["WhitenCLI", "main", "run"]


class WhitenCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(
            "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
        )


def run(args: list[str] | None = None) -> WhitenCLI:
    """Run the CLI and return it (for tests and scripts; ``args`` default to ``sys.argv``)."""
    return WhitenCLI(
        ImageClassifier,
        ImageDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


def main() -> None:
    """Entry point of ``lightning-whiten`` and ``python -m lightning_whiten``.

    Returns nothing: the console-script wrapper passes the return value to ``sys.exit``.
    """
    run()


if __name__ == "__main__":
    main()
