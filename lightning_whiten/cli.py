"""The ``lightning-whiten`` command: LightningCLI with the project's model and datamodules.

    lightning-whiten fit --config quickstart
    lightning-whiten fit --config quickstart --whiten.layer_options.group_size 8 --print_config
    lightning-whiten recipes list
    lightning-whiten recipes copy quickstart my.yaml
    python -m lightning_whiten validate --config my.yaml --ckpt_path last.ckpt

``--config`` takes a file or the name of a bundled recipe (the package ships them:
``lightning_whiten/recipes`` in a wheel, the checkout's ``recipes/`` in a source install).
The whitening is the ``whiten`` section (``--whiten.layer dbn``,
``--whiten.layer_options.group_size 8``): a :class:`~lightning_whiten.WhiteningCallback`
added to the Trainer's callbacks; configs that list the callback in ``trainer.callbacks``
keep working. Model and datamodules resolve by short class name (``--data Digits``); the
datamodule's ``num_classes`` is linked to the model's. The resolved config is saved with
every run.

``lightning-whiten --help`` and ``recipes`` answer without importing Lightning; a mistake in
a config (a misspelt layer or option, a negative learning rate, a missing data folder, an
unreadable ``--ckpt_path``) is reported as one line before any work starts.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import shutil
import sys
import warnings
from importlib import resources
from pathlib import Path

__all__ = ["DESCRIPTION", "main", "recipe_path", "recipes_dir", "resolve_config", "run"]

DESCRIPTION = (
    "lightning-whiten: train vision models with batch whitening (IterNorm, DBN, SWBN) and the "
    "normalization methods around it, through LightningCLI. A recipe is a YAML config, given "
    "by name (a bundled recipe) or as a file: lightning-whiten fit --config quickstart"
)
SUBCOMMANDS = {
    "fit": "Train a model: converts its normalization layers (WhiteningCallback), trains, "
    "validates and saves checkpoints.",
    "validate": "Run the validation loop on a trained model (--ckpt_path).",
    "test": "Run the test loop on a trained model (--ckpt_path).",
    "predict": "Predict class probabilities with a trained model (--ckpt_path).",
    "recipes": "List the bundled recipes, print one, or copy one out for editing "
    "(lightning-whiten recipes copy quickstart my.yaml).",
}


def recipes_dir(package: Path | None = None) -> Path | None:
    """The folder of the bundled recipes, or ``None``.

    A wheel ships them inside the package (``lightning_whiten/recipes``, found through
    :mod:`importlib.resources`); a source checkout (an editable install) keeps them in its
    top-level ``recipes/``, next to its ``pyproject.toml``. A ``recipes/`` folder beside an
    installed package (``site-packages/recipes``) belongs to something else and is never read.
    ``package``: the package folder to look in (tests); default: this package.
    """
    bundled = resources.files(__package__) / "recipes" if package is None else package / "recipes"
    if isinstance(bundled, Path) and bundled.is_dir():
        return bundled
    package = Path(__file__).resolve().parent if package is None else package
    checkout = package.parent
    pyproject = checkout / "pyproject.toml"
    if (
        pyproject.is_file()
        and re.search(r'^name = "lightning-whiten"$', pyproject.read_text(), re.MULTILINE)
        and (checkout / "recipes").is_dir()
    ):
        return checkout / "recipes"
    return None


def recipe_names() -> list[str]:
    """The names of the bundled recipes (file names without ``.yaml``), sorted."""
    folder = recipes_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder is not None else []


class RecipeError(ValueError):
    """A ``--config`` that is neither a file nor a bundled recipe, or a ``recipes`` mistake."""


def recipe_path(name: str) -> Path:
    """The file of the bundled recipe ``name`` (``"quickstart"`` or ``"quickstart.yaml"``).

    Raises:
        RecipeError: no bundled recipe has that name (close names are suggested).
    """
    stem = name[:-5] if name.endswith(".yaml") else name
    folder = recipes_dir()
    if folder is not None and "/" not in stem and (folder / f"{stem}.yaml").is_file():
        return folder / f"{stem}.yaml"
    names = recipe_names()
    close = difflib.get_close_matches(stem, names, n=3, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise RecipeError(
        f"{name!r} is not a file and not a bundled recipe{hint} "
        "(lightning-whiten recipes list shows them)"
    )


# A --config value that names a file or a recipe (not an inline YAML/JSON config).
_NAME_LIKE = re.compile(r"^[^\s{}\[\]:,]+$")


def resolve_config(value: str) -> str:
    """A ``--config`` value as LightningCLI reads it: a file as it is, a recipe's name as the
    path of the bundled recipe; anything else that looks like a name or a path is an error
    (an inline YAML config passes through).

    Raises:
        RecipeError: neither a file nor a bundled recipe.
    """
    if not _NAME_LIKE.match(value) or os.path.isfile(value):
        return value
    if os.sep in value or "/" in value or not re.fullmatch(r"[\w.-]+", value):
        raise RecipeError(f"--config {value!r}: no such file")
    return str(recipe_path(value))


def resolve_config_args(args: list[str]) -> list[str]:
    """``args`` with every ``--config``/``-c`` value passed through :func:`resolve_config`."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg in ("-c", "--config") and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out


def recipe_summaries() -> list[tuple[str, str]]:
    """``(name, first line of its header)`` for every bundled recipe."""
    folder = recipes_dir()
    rows = []
    for name in recipe_names():
        path = folder / f"{name}.yaml"  # type: ignore[operator]
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        summary = first.lstrip("# ").split(" -- ", 1)[-1].strip()
        rows.append((name, summary))
    return rows


def recipes_command(args: list[str]) -> None:
    """``lightning-whiten recipes list | show NAME | copy NAME [DEST] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="lightning-whiten recipes",
        description="The recipes bundled with lightning-whiten (YAML configs for "
        "lightning-whiten fit --config NAME).",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list the recipes with their one-line summary")
    show = sub.add_parser("show", help="print a recipe")
    show.add_argument("name")
    copy = sub.add_parser("copy", help="copy a recipe to a file to edit it")
    copy.add_argument("name")
    copy.add_argument("dest", nargs="?", default=None, help="file or folder (default: ./NAME.yaml)")
    copy.add_argument("--force", action="store_true", help="overwrite an existing file")
    options = parser.parse_args(args)
    if options.action == "list":
        rows = recipe_summaries()
        if not rows:
            raise RecipeError("no bundled recipes found (a broken installation?)")
        width = max(len(name) for name, _ in rows)
        print(f"recipes ({recipes_dir()}); run one with lightning-whiten fit --config NAME:")
        for name, summary in rows:
            print(f"  {name:<{width}}  {summary}")
        return
    source = recipe_path(options.name)
    if options.action == "show":
        print(source.read_text(), end="")
        return
    dest = Path(options.dest if options.dest is not None else source.name)
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and not options.force:
        raise RecipeError(f"{dest} exists (--force overwrites it)")
    shutil.copyfile(source, dest)
    print(f"lightning-whiten: copied {source.stem} to {dest}; run it with "
          f"lightning-whiten fit --config {dest}")  # fmt: skip


def fast_help() -> str:
    """The top-level help, without importing torch or Lightning."""
    lines = [
        "usage: lightning-whiten [-h] {fit,validate,test,predict,recipes} "
        "[--config RECIPE_OR_FILE] [options]",
        "",
        DESCRIPTION,
        "",
        "subcommands (lightning-whiten <subcommand> --help lists every option):",
    ]
    lines += [f"  {name:<9} {text}" for name, text in SUBCOMMANDS.items()]
    recipes = recipe_summaries()
    if recipes:
        width = max(len(name) for name, _ in recipes)
        lines += [
            "",
            "recipes (--config NAME runs one; lightning-whiten recipes copy NAME edits one):",
        ]
        lines += [f"  {name:<{width}}  {summary}" for name, summary in recipes]
    lines += [
        "",
        "examples:",
        "  lightning-whiten fit --config quickstart",
        "  lightning-whiten fit --config quickstart --trainer.max_epochs 2",
        "  lightning-whiten fit --config quickstart --whiten.layer dbn "
        "--whiten.layer_options '{group_size: 8}'",
        "  lightning-whiten fit --config quickstart --whiten.layer_options.group_size 8",
        "  lightning-whiten fit --config quickstart --print_config",
        "  lightning-whiten recipes copy quickstart my.yaml",
        "  lightning-whiten fit --config my.yaml",
        "  lightning-whiten validate --config quickstart --ckpt_path last.ckpt",
        "",
        "The whitening options (--whiten.*) are WhiteningCallback's: "
        "lightning-whiten fit --whiten.help WhiteningCallback lists them.",
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

    from .callbacks import WhiteningCallback

    class WhitenCLI(LightningCLI):
        def init_parser(self, **kwargs):
            parser = super().init_parser(**kwargs)
            for action in parser._actions:
                if action.dest == "config":
                    action.help = (
                        "A config: the name of a bundled recipe (lightning-whiten recipes list) "
                        "or a YAML/JSON file. Given several times, later ones override."
                    )
            return parser

        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments(
                "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
            )
            # The whitening as a section of its own (``whiten: {layer: dbn, layer_options:
            # {...}}``, ``--whiten.layer_options.group_size 8``): Lightning's pattern for a
            # callback a CLI always offers. Subclass mode with no default keeps it optional
            # (no ``whiten``: no conversion, e.g. a BatchNorm baseline) and lets
            # ``class_path`` be omitted (jsonargparse then uses WhiteningCallback itself).
            parser.add_lightning_class_args(
                WhiteningCallback, "whiten", subclass_mode=True, required=False
            )

        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            # LightningCLI reads --ckpt_path right after parsing (for its hyperparameters) and
            # the Trainer again after converting the model: a bad file ended in a traceback
            # from torch's zip reader or unpickler. Check it first, with the package's words.
            subcommand = self.config.get("subcommand")
            config = self.config.get(subcommand, self.config) if subcommand else self.config
            path = config.get("ckpt_path")
            if path is None or path in ("last", "hpc", "registry") or "://" in str(path):
                return
            from .checkpoint import check_checkpoint_file

            try:
                check_checkpoint_file(path)
            except (ValueError, FileNotFoundError) as err:
                _fail(str(err))

        def instantiate_classes(self) -> None:
            # Constructors validate their arguments (layer names and options, learning rate,
            # data folders): report the first mistake as one line, before any work starts.
            try:
                super().instantiate_classes()
            except (ValueError, TypeError, FileNotFoundError) as err:
                _fail(_user_message(err))
            config = self.config.get(str(self.subcommand), self.config)
            if config.get("ckpt_path") is not None:
                # a resumed fit: the run that wrote the checkpoint printed the table
                for callback in self.trainer.callbacks:
                    if isinstance(callback, WhiteningCallback) and callback.log_report is True:
                        callback.log_report = "summary"

        def instantiate_trainer(self, **kwargs):
            extra = [
                self._get(self.config_init, key)
                for key in self._parser(self.subcommand).callback_keys
            ]
            extra = [c for c in extra if c is not None]  # no ``whiten`` section: no conversion
            trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
            listed = trainer_config.get("callbacks") or []
            listed = listed if isinstance(listed, list) else [listed]
            if any(isinstance(c, WhiteningCallback) for c in extra) and any(
                isinstance(c, WhiteningCallback) for c in listed
            ):
                _fail(
                    "WhiteningCallback is configured twice: in the whiten section (or "
                    "--whiten.* options) and in trainer.callbacks. Keep one: move its "
                    "init_args to 'whiten:' (then --whiten.layer_options.group_size 8 changes "
                    "an option), or drop the whiten options and change the callback in "
                    "trainer.callbacks"
                )
            # First in the list, where recipes used to put it: its hooks (conversion at setup,
            # schedules at batch start) run before those of the monitor or SAM.
            trainer_config["callbacks"] = [*extra, *listed]
            return self._instantiate_trainer(trainer_config, [])

        def after_fit(self) -> None:
            callback = self.trainer.checkpoint_callback
            if self.trainer.is_global_zero and callback is not None:
                path = callback.best_model_path or getattr(callback, "last_model_path", "")
                if path:
                    print(f"lightning-whiten: checkpoint: {path}")

    return WhitenCLI


def _fail(message: str) -> None:
    """One line on stderr and exit status 2 (argparse's status for a usage error)."""
    print(f"lightning-whiten: error: {message}", file=sys.stderr)
    sys.exit(2)


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
    """Run the CLI and return it (for tests and scripts; ``args`` default to ``sys.argv``).

    A ``--config`` naming a bundled recipe (``--config quickstart``) is resolved to its file.
    """
    # Imported so that their classes resolve by short name in configs and on the command line.
    import lightning.pytorch as pl

    from . import callbacks as _callbacks  # noqa: F401
    from . import data as _data  # noqa: F401
    from . import fewshot as _fewshot  # noqa: F401
    from . import text as _text  # noqa: F401
    from .models import gan as _gan  # noqa: F401

    try:
        if args is None:
            sys.argv[1:] = resolve_config_args(sys.argv[1:])
        else:
            args = resolve_config_args(list(args))
    except RecipeError as err:
        _fail(str(err))
    _refuse_callback_list_options(sys.argv[1:] if args is None else args)
    parser_kwargs = {"description": DESCRIPTION}
    parser_kwargs.update(
        {name: {"description": text} for name, text in SUBCOMMANDS.items() if name != "recipes"}
    )
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


def _refuse_callback_list_options(args: list[str]) -> None:
    """``--trainer.callbacks.init_args.layer_options ...`` sets the *last* callback of the list
    (jsonargparse's rule), never WhiteningCallback's options: say what to write instead of
    jsonargparse's long error about the wrong callback."""
    import inspect

    from .callbacks import (
        NormalizationAnalysis,
        NormSAMCallback,
        WhiteningCallback,
        WhiteningMonitor,
    )

    def parameters(cls) -> set[str]:
        return set(inspect.signature(cls.__init__).parameters) - {"self"}

    own = parameters(WhiteningCallback) - set().union(
        *(parameters(c) for c in (WhiteningMonitor, NormSAMCallback, NormalizationAnalysis))
    )
    for arg in args:
        match = re.match(r"--trainer\.callbacks\.init_args\.(\w+)", arg)
        if match and match.group(1) in own:
            option = arg.split("=", 1)[0].removeprefix("--trainer.callbacks.init_args.")
            _fail(
                f"{arg.split('=', 1)[0]} would set the last callback in trainer.callbacks, not "
                f"WhiteningCallback: write --whiten.{option}, with the callback in the "
                "config's whiten section (whiten: {layer: iternorm, layer_options: {...}}), "
                "as in the bundled recipes"
            )


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lightning-whiten`` and ``python -m lightning_whiten``.

    Returns nothing: the console-script wrapper passes the return value to ``sys.exit``.
    Output piped into a reader that stops early (``lightning-whiten --help | head -1``) ends
    the command quietly, without a BrokenPipeError traceback.
    """
    try:
        try:
            _main(argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader has gone: point stdout at devnull so the interpreter's final flush does
        # not fail again, and exit as Python does on EPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


def _main(argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(fast_help())
        if not args:
            sys.exit(2)
        return
    if args[0] == "recipes":
        try:
            recipes_command(args[1:])
        except BrokenPipeError:
            raise
        except (RecipeError, OSError) as err:
            _fail(str(err))
        return
    _quiet()
    run(argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
