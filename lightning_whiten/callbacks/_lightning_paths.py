"""Two Lightning code paths that rebuild a LightningModule outside the callback's ``setup``,
taught about converted models (installed once per process, when ``WhiteningCallback`` is
imported).

- ``ddp_spawn`` / ``ddp_fork`` (``_MultiProcessingLauncher``): the workers train a converted
  copy, and the main process loads the rank-0 weights back into the user's model with
  ``strict=False`` -- into the original BatchNorms. The workers now send the conversion along
  with the weights, and the main process converts the user's model before the weights load
  (strictly), so the model the user holds after ``fit`` is the trained, converted one.
- ``LightningModule.load_from_checkpoint``: a converted checkpoint loaded into a module without
  :class:`~lightning_whiten.checkpoint.WhitenedModuleMixin` fails with the cause and the fix
  (not a raw key mismatch), and with ``strict=False`` warns, naming the layers left as
  BatchNorm, instead of returning a silently different model.

Both wrap private Lightning functions (checked to exist; a Lightning without them is left
alone, with the plain behaviour).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import lightning.pytorch as pl

from ..checkpoint import CHECKPOINT_KEY, WhitenedModuleMixin, layer_attributes, unconverted_layers

_INSTALLED = False


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    _install_spawn_recovery()
    _install_load_state_check()


def _whitening_callback(trainer: pl.Trainer) -> Any:
    from .whitening import WhiteningCallback

    return next((c for c in trainer.callbacks if isinstance(c, WhiteningCallback)), None)


# -- ddp_spawn ------------------------------------------------------------------------------
def _install_spawn_recovery() -> None:
    try:
        from lightning.pytorch.strategies.launchers.multiprocessing import (
            _MultiProcessingLauncher as Launcher,
        )
    except ImportError:  # pragma: no cover - another Lightning layout
        return
    extra_results = getattr(Launcher, "get_extra_results", None)
    recover = getattr(Launcher, "_recover_results_in_main_process", None)
    if extra_results is None or recover is None:  # pragma: no cover
        return

    @functools.wraps(extra_results)
    def get_extra_results(self: Any, trainer: pl.Trainer) -> dict[str, Any]:
        # rank 0 of the workers, after fit: what the main process needs to rebuild the layers
        extra = extra_results(self, trainer)
        callback = _whitening_callback(trainer)
        if callback is not None and callback.report is not None:
            extra[CHECKPOINT_KEY] = {
                "attributes": layer_attributes(trainer.lightning_module, callback.scheduler)
            }
        return extra

    @functools.wraps(recover)
    def recover_results(self: Any, worker_output: Any, trainer: pl.Trainer) -> None:
        entry = worker_output.extra.pop(CHECKPOINT_KEY, None)
        path = worker_output.weights_path
        callback = _whitening_callback(trainer)
        if entry is not None and path is not None and callback is not None:
            module = trainer.lightning_module
            callback.convert_main_process(trainer, module, entry["attributes"])
            # strictly: a model that does not fit the workers' weights fails here, with keys
            module.load_state_dict(self._strategy.checkpoint_io.load_checkpoint(path))
        recover(self, worker_output, trainer)  # loads them again (strict=False), cleans up

    Launcher.get_extra_results = get_extra_results
    Launcher._recover_results_in_main_process = recover_results


# -- load_from_checkpoint ---------------------------------------------------------------------
def _install_load_state_check() -> None:
    from lightning.pytorch.core import saving

    load_state = getattr(saving, "_load_state", None)
    if load_state is None:  # pragma: no cover
        return

    @functools.wraps(load_state)
    def _load_state(cls: Any, checkpoint: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        converted = isinstance(checkpoint, dict) and CHECKPOINT_KEY in checkpoint
        if not (
            converted
            and isinstance(cls, type)
            and issubclass(cls, pl.LightningModule)
            and not issubclass(cls, WhitenedModuleMixin)
        ):
            return load_state(cls, checkpoint, *args, **kwargs)
        layer = (checkpoint[CHECKPOINT_KEY].get("spec") or {}).get("layer")
        fix = (
            f"this checkpoint was written by a model converted with WhiteningCallback (layer "
            f"{layer!r}) and {cls.__name__} builds the original normalization layers. Add one "
            f"line: class {cls.__name__}(lightning_whiten.WhitenedModuleMixin, "
            "LightningModule) (the mixin converts the module before the weights load), or load "
            f"it with lightning_whiten.load_converted({cls.__name__}, path)"
        )
        try:
            module = load_state(cls, checkpoint, *args, **kwargs)
        except RuntimeError as err:
            if "state_dict" not in str(err):
                raise
            raise RuntimeError(f"{cls.__name__}.load_from_checkpoint: {fix}") from err
        left = unconverted_layers(module, checkpoint)
        if left:  # strict=False: the whitening weights were dropped, the BatchNorms kept
            warnings.warn(
                f"{cls.__name__}.load_from_checkpoint(strict=False) gave a different model: "
                f"the checkpoint's layers {', '.join(left)} were not loaded. {fix}",
                UserWarning,
                stacklevel=4,
            )
        return module

    saving._load_state = _load_state
