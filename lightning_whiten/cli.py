"""The ``lightning-whiten`` command: LightningCLI with the project's model and datamodules.

    lightning-whiten fit --config recipes/quickstart.yaml
    lightning-whiten fit --config recipes/quickstart.yaml --trainer.max_epochs 2 --print_config
    python -m lightning_whiten validate --config recipes/quickstart.yaml --ckpt_path last.ckpt

Model and datamodules resolve by short class name (``--data Digits``); ``WhiteningCallback``
and ``WhiteningMonitor`` can be configured as trainer callbacks in YAML. The datamodule's
``num_classes`` is linked to the model's. The resolved config is saved with every run.

``lightning-whiten --help`` answers without importing Lightning (it lists the recipes); a
mistake in a config (a misspelt layer or option, a negative learning rate, a missing data
folder) is reported as one line before any work starts.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

__all__ = ["DESCRIPTION", "main", "run"]

DESCRIPTION = (
    "lightning-whiten: train vision models with batch whitening (IterNorm, DBN, SWBN) and the "
    "normalization methods around it, through LightningCLI. A recipe is a YAML config: "
    "lightning-whiten fit --config recipes/<name>.yaml"
)
SUBCOMMANDS = {
    "fit": "Train a model: converts its normalization layers (WhiteningCallback), trains, "
    "validates and saves checkpoints.",
    "validate": "Run the validation loop on a trained model (--ckpt_path).",
    "test": "Run the test loop on a trained model (--ckpt_path).",
    "predict": "Predict class probabilities with a trained model (--ckpt_path).",
}
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def recipe_summaries() -> list[tuple[str, str]]:
    """``(name, first line of its header)`` for every recipe next to the package (a source
    checkout; an installed wheel has none)."""
    rows = []
    for path in sorted(RECIPES.glob("*.yaml")) if RECIPES.is_dir() else []:
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        summary = first.lstrip("# ").split(" -- ", 1)[-1].strip()
        rows.append((path.stem, summary))
    return rows


def fast_help() -> str:
    """The top-level help, without importing torch or Lightning."""
    lines = [
        "usage: lightning-whiten [-h] {fit,validate,test,predict} [--config FILE] [options]",
        "",
        DESCRIPTION,
        "",
        "subcommands (lightning-whiten <subcommand> --help lists every option):",
    ]
    lines += [f"  {name:<9} {text}" for name, text in SUBCOMMANDS.items()]
    recipes = recipe_summaries()
    if recipes:
        width = max(len(name) for name, _ in recipes)
        lines += ["", f"recipes ({RECIPES}):"]
        lines += [f"  {name:<{width}}  {summary}" for name, summary in recipes]
    lines += [
        "",
        "examples:",
        "  lightning-whiten fit --config recipes/quickstart.yaml",
        "  lightning-whiten fit --config recipes/quickstart.yaml --trainer.max_epochs 2",
        "  lightning-whiten fit --config recipes/quickstart.yaml --print_config",
        "  lightning-whiten validate --config recipes/quickstart.yaml --ckpt_path last.ckpt",
    ]
    return "\n".join(lines)


class _DropNoise(logging.Filter):
    """Lightning's advertisements ("Tip: ...") on every run are noise in logs; the seed is in
    the printed and saved config (and its line would precede a config error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return "Tip:" not in message and not message.startswith("Seed set to")


def _quiet() -> None:
    # Third-party deprecation notices that name nothing of this package (the test suite
    # filters the same ones in pyproject.toml); the package's own warnings stay visible.
    for category, module in (
        (DeprecationWarning, "lightning_utilities"),
        (DeprecationWarning, "lightning.pytorch.cli"),
        (DeprecationWarning, "jsonargparse"),
        (FutureWarning, "torch._inductor"),
    ):
        warnings.filterwarnings("ignore", category=category, module=module)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*does not have many workers")
    warnings.filterwarnings("ignore", message=r"No seed found, seed set to")
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.fabric.utilities.seed",
    ):
        logging.getLogger(name).addFilter(_DropNoise())


def _cli_class():
    from lightning.pytorch.cli import LightningCLI

    class WhitenCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments(
                "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
            )

        def instantiate_classes(self) -> None:
            # Constructors validate their arguments (layer names and options, learning rate,
            # data folders): report the first mistake as one line, before any work starts.
            try:
                super().instantiate_classes()
            except (ValueError, TypeError, FileNotFoundError) as err:
                print(f"lightning-whiten: error: {_user_message(err)}", file=sys.stderr)
                sys.exit(2)

        def after_fit(self) -> None:
            callback = self.trainer.checkpoint_callback
            if self.trainer.is_global_zero and callback is not None:
                path = callback.best_model_path or getattr(callback, "last_model_path", "")
                if path:
                    print(f"lightning-whiten: checkpoint: {path}")

    return WhitenCLI


# jsonargparse wraps a constructor's error in its own; the cause is the user's message.
_WRAPPERS = {"ArgumentError", "NSKeyError", "ValueError", "TypeError"}
# jsonargparse's own words for a value that matched no type of a Union, one per type tried.
_TYPE_MISMATCH = ("Expected a ", "Does not validate against")


def _user_message(err: BaseException) -> str:
    """The constructor's own message inside jsonargparse's wrapping.

    Newer jsonargparse chains the constructor's exception as ``__cause__``; before 4.40 a value
    that failed every type of a Union (``trainer.callbacks`` is one) keeps only the messages, as
    ``  - ...`` lines of its text, first the type mismatches ("Expected a <class 'NoneType'>"),
    then the real error.
    """
    cause = err
    while cause.__cause__ is not None and type(cause).__name__ in _WRAPPERS:
        cause = cause.__cause__
    if not str(cause).startswith(_TYPE_MISMATCH):
        return str(cause)
    chain, seen = [err], set()
    while chain:
        e = chain.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        for line in str(e).splitlines():
            item = line.strip()
            if item.startswith("- ") and not item[2:].startswith(_TYPE_MISMATCH):
                return item[2:]
        chain += [e.__cause__, e.__context__]
    return str(cause)


def run(args: list[str] | None = None):
    """Run the CLI and return it (for tests and scripts; ``args`` default to ``sys.argv``)."""
    # Imported so that their classes resolve by short name in configs and on the command line.
    import lightning.pytorch as pl

    from . import callbacks as _callbacks  # noqa: F401
    from . import data as _data  # noqa: F401
    from . import fewshot as _fewshot  # noqa: F401
    from . import text as _text  # noqa: F401
    from .models import gan as _gan  # noqa: F401

    parser_kwargs = {"description": DESCRIPTION}
    parser_kwargs.update({name: {"description": text} for name, text in SUBCOMMANDS.items()})
    # Any LightningModule / LightningDataModule (ImageClassifier, ProtoNet, GAN, CharLM and
    # their datamodules); every one of them takes ``num_classes``, linked from the data.
    return _cli_class()(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=parser_kwargs,
        args=args,
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lightning-whiten`` and ``python -m lightning_whiten``.

    Returns nothing: the console-script wrapper passes the return value to ``sys.exit``.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(fast_help())
        if not args:
            sys.exit(2)
        return
    _quiet()
    run(argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
