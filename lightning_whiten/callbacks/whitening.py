"""``WhiteningCallback``: convert a LightningModule's normalization layers at setup and drive
their hyperparameters during training. A thin adapter over :func:`lightning_whiten.convert`
and :class:`lightning_whiten.schedules.LayerScheduler`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from ..checkpoint import CHECKPOINT_KEY, layer_attributes
from ..diagnostics import nonfinite_batches
from ..layers import SWBN, WhiteningNorm
from ..layers.base import warns_at_batch
from ..schedules import LayerScheduler, Schedule
from ..surgery import ConversionReport, convert
from ..surgery.registry import LAYERS

__all__ = ["CHECKPOINT_KEY", "WhiteningCallback"]


class WhiteningCallback(Callback):
    """Whiten a LightningModule: convert its BatchNorm layers at ``setup`` and schedule the
    whitening layers' hyperparameters during training.

    Conversion happens in ``setup``, after the module's ``configure_model`` (called here first,
    in Lightning's init contexts; the hook is idempotent by Lightning's contract) and before
    optimizers are configured, checkpoint weights are restored and the model is wrapped by
    DDP. ``Trainer(sync_batchnorm=True)`` leaves the whitening layers alone and turns the
    BatchNorms left unconverted into ``SyncBatchNorm`` as usual; the whitening layers sync
    their own statistics across processes (``sync``).

    Args:
        layer: ``"iternorm"``, ``"dbn"``, ``"swbn"`` or a whitening layer class path.
        layer_options: options of the layer (``{"group_size": 64, "iterations": 5}``).
        include, exclude, min_channels, placement, stages, frozen, respect_conv_groups:
            selection, as in :func:`lightning_whiten.convert`.
        schedules: ``{"attribute" or "attribute@pattern": schedule}``, applied at the start of
            every training batch; e.g. ``{"iterations": Step([3, 5], [0.5], unit="fraction")}``.
            Any numeric attribute of the layers can be scheduled (``iterations``,
            ``whitening_rate``, ``momentum``, ``eps``); integer attributes are rounded.
        tie_whitening_rate_to_lr: if set, SWBN's ``whitening_rate`` follows the first
            optimizer's learning rate times this ratio (the SWBN paper decays the rate with the
            learning rate; a public reimplementation uses 1e-4).
        sync: ``"batch"`` or ``"none"`` to set every converted layer's cross-process sync;
            ``None`` keeps the layer default (``"batch"``: synced whenever
            ``torch.distributed`` runs more than one process).
        log_report: print the conversion report (rank 0) and log its counts as
            hyperparameters.
    """

    def __init__(
        self,
        layer: str = "iternorm",
        layer_options: dict[str, Any] | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        min_channels: int = 1,
        placement: Literal["all", "first"] = "all",
        stages: Sequence[int] | None = None,
        frozen: bool = False,
        respect_conv_groups: bool = True,
        schedules: dict[str, Schedule | dict[str, Any] | float] | None = None,
        tie_whitening_rate_to_lr: float | None = None,
        sync: Literal["batch", "none"] | None = None,
        log_report: bool = True,
    ) -> None:
        super().__init__()
        if sync not in (None, "batch", "none"):
            raise ValueError(
                f"WhiteningCallback: sync must be 'batch', 'none' or None, got {sync!r}"
            )
        if tie_whitening_rate_to_lr is not None and not tie_whitening_rate_to_lr > 0:
            raise ValueError(
                "WhiteningCallback: tie_whitening_rate_to_lr must be a positive ratio, got "
                f"{tie_whitening_rate_to_lr!r}"
            )
        self.convert_kwargs: dict[str, Any] = {
            "layer": layer,
            "include": include,
            "exclude": exclude,
            "min_channels": min_channels,
            "placement": placement,
            "stages": list(stages) if stages is not None else None,
            "frozen": frozen,
            "respect_conv_groups": respect_conv_groups,
            **dict(layer_options or {}),
        }
        self.scheduler = LayerScheduler(schedules)
        if tie_whitening_rate_to_lr is not None and any(
            LayerScheduler.split(k)[0] == "whitening_rate" for k in self.scheduler.schedules
        ):
            raise ValueError(
                "WhiteningCallback: whitening_rate has a schedule and is tied to the learning "
                "rate; choose one"
            )
        self.tie_whitening_rate_to_lr = tie_whitening_rate_to_lr
        self.sync = sync
        self.log_report = log_report
        self.report: ConversionReport | None = None
        self._converted: Any = None  # the module converted (setup runs once per trainer.fn)
        self._restored_values: dict[str, float] = {}
        self._nonfinite_seen: dict[str, int] = {}

    # -- conversion --------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # (Two WhiteningCallbacks are refused by Lightning itself when the Trainer is built:
        # the callback is stateful.)
        if self._converted is pl_module:
            return
        _configure_model(trainer, pl_module)
        self.report = convert(pl_module, **self.convert_kwargs)
        self._converted = pl_module
        layers = [m for m in pl_module.modules() if isinstance(m, WhiteningNorm)]
        if self.sync is not None:
            for m in layers:
                m.sync = self.sync
        known = {cls.__name__: list(cls.schedulable) for cls in LAYERS.values()}
        self.scheduler.bind(pl_module, known_attributes=known)
        if self.tie_whitening_rate_to_lr is not None and not any(
            isinstance(m, SWBN) for m in layers
        ):
            raise ValueError(
                "WhiteningCallback: tie_whitening_rate_to_lr is set but the model has no SWBN "
                "layer (layer='swbn')"
            )
        if self.report.num_replaced == 0:
            rank_zero_warn(
                "WhiteningCallback: no normalization layer was converted; see the report "
                "(every skipped layer has a reason)"
            )
        if self.log_report:
            self._log_report(trainer)

    def _log_report(self, trainer: pl.Trainer) -> None:
        assert self.report is not None
        if trainer.is_global_zero:
            from rich.console import Console

            Console().print(self.report.table())
        counts = {f"whiten/{k}": v for k, v in self.report.counts().items()}
        counts["whiten/layer"] = self.report.layer
        for logger in trainer.loggers:
            logger.log_hyperparams(counts)

    # -- schedules ---------------------------------------------------------------------------
    def _times(self, trainer: pl.Trainer, batch_idx: int) -> dict[str, float]:
        batches = trainer.num_training_batches
        per_epoch = batches if batches and math.isfinite(batches) else None
        epoch = trainer.current_epoch + (batch_idx / per_epoch if per_epoch else 0.0)
        total = trainer.estimated_stepping_batches
        fraction = trainer.global_step / total if total and math.isfinite(total) else math.nan
        return {"step": float(trainer.global_step), "epoch": epoch, "fraction": fraction}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        uses_fraction = any(s.unit == "fraction" for s in self.scheduler.schedules.values())
        if uses_fraction and not math.isfinite(trainer.estimated_stepping_batches):
            raise ValueError(
                "WhiteningCallback: a schedule uses unit='fraction' but the run has no known "
                "length (set max_epochs or max_steps)"
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        changed = (
            self.scheduler.apply(self._times(trainer, batch_idx))
            if self.scheduler.schedules
            else {}
        )
        if self.tie_whitening_rate_to_lr is not None and trainer.optimizers:
            rate = self.tie_whitening_rate_to_lr * trainer.optimizers[0].param_groups[0]["lr"]
            for m in pl_module.modules():
                if isinstance(m, SWBN):
                    m.whitening_rate = rate
            if self.scheduler.current.get("whitening_rate") != rate:
                self.scheduler.current["whitening_rate"] = rate
                changed["whitening_rate"] = rate
        if changed and trainer.is_global_zero:
            # Straight to the loggers: self.log would repeat the value at every logging step.
            metrics = {f"whiten/{key}": float(value) for key, value in changed.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # -- non-finite batches -------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._nonfinite_seen = nonfinite_batches(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # One host synchronization per epoch. Layers on CPU have already warned at the batch.
        seen = self._nonfinite_seen
        counts = nonfinite_batches(pl_module)
        skipped = {
            name: count - seen.get(name, 0)
            for name, count in counts.items()
            if count > seen.get(name, 0)
            and pl_module.get_submodule(name).check_finite
            and not warns_at_batch(pl_module.get_submodule(name).nonfinite_batches.device)
        }
        if skipped:
            listed = ", ".join(f"{name} ({n})" for name, n in skipped.items())
            rank_zero_warn(
                f"WhiteningCallback: epoch {trainer.current_epoch}: training batches with "
                f"non-finite statistics were skipped by the running statistics of {listed}",
                category=RuntimeWarning,
            )

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def spec(self) -> dict[str, Any] | None:
        return self.report.spec if self.report is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "values": dict(self.scheduler.current)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = state_dict.get("spec")
        if stored is not None and self.spec is not None and stored != self.spec:
            rank_zero_warn(
                "WhiteningCallback: the checkpoint was written with another conversion "
                f"({stored}) than this callback's ({self.spec})"
            )
        self._restored_values = dict(state_dict.get("values", {}))
        self.scheduler.current.update(self._restored_values)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.report is not None:
            checkpoint[CHECKPOINT_KEY] = {
                "spec": self.report.spec,
                "report": self.report.to_dict(),
                # Values that schedules (or the lr tie) moved away from the spec's options, so
                # load_converted rebuilds the layers as they were, not as they started.
                "attributes": layer_attributes(pl_module, self.scheduler),
            }


def _configure_model(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Call ``configure_model`` as Lightning does, so layers built there exist to be converted."""
    if is_overridden("configure_model", pl_module):
        with (
            trainer.strategy.tensor_init_context(),
            trainer.strategy.model_sharded_context(),
            trainer.precision_plugin.module_init_context(),
        ):
            pl_module.configure_model()
    rank_zero_info("WhiteningCallback: converting normalization layers")
