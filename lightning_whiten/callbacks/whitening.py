"""``WhiteningCallback``: convert a LightningModule's normalization layers at setup and drive
their hyperparameters during training. A thin adapter over :func:`lightning_whiten.convert`
and :class:`lightning_whiten.schedules.LayerScheduler`."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from ..checkpoint import (
    CHECKPOINT_KEY,
    UNREADABLE,
    apply_layer_attributes,
    check_resume,
    layer_attributes,
    unreadable,
)
from ..diagnostics import diverged_batches, nonfinite_batches
from ..layers import SWBN
from ..layers.base import warns_at_batch
from ..registry import families, family_of
from ..schedules import LayerScheduler, Schedule
from ..surgery import ConversionReport, ConversionSpec
from ._lightning_paths import install as _install_lightning_paths

__all__ = ["CHECKPOINT_KEY", "WhiteningCallback", "convert_in_configure_model"]

# ddp_spawn's main process and load_from_checkpoint, see _lightning_paths.
_install_lightning_paths()


class WhiteningCallback(Callback):
    """Whiten a LightningModule: convert its BatchNorm layers at ``setup`` and schedule the
    whitening layers' hyperparameters during training.

    Conversion happens in ``setup``, after the module's ``configure_model`` (called here first,
    in Lightning's init contexts; the hook is idempotent by Lightning's contract) and before
    optimizers are configured, checkpoint weights are restored and the model is wrapped by
    DDP. ``Trainer(sync_batchnorm=True)`` leaves the whitening layers alone and turns the
    BatchNorms left unconverted into ``SyncBatchNorm`` as usual; the whitening layers sync
    their own statistics across processes (``sync``).

    The conversion is a :class:`~lightning_whiten.surgery.ConversionSpec` built (and validated)
    when the callback is constructed, so a misspelt layer or option fails before the Trainer
    does any work.

    Args:
        layer: a registered family (``"iternorm"``, ``"dbn"``, ``"swbn"``, ...) or a whitening
            layer class path.
        layer_options: options of the layer (``{"group_size": 64, "iterations": 5}``).
        include, exclude, types, min_channels, placement, stages, frozen, respect_conv_groups, insert, drop_following_norm:
            selection (insertion, removal), as in :func:`lightning_whiten.convert`.
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
            hyperparameters: ``True`` prints the table when fitting and its one-line title
            in ``validate``/``test``/``predict`` (the table was printed by the run that
            trained the model); ``"table"`` or ``"summary"`` always print that; ``False``
            prints and logs nothing. The ``lightning-whiten`` command also prints only the
            title when a fit resumes from ``ckpt_path``.
        recalibrate_batches: re-estimate every normalization layer's running statistics at the
            current weights (:func:`lightning_whiten.recalibrate`, an equal-weight average)
            on the last ``recalibrate_batches`` training batches of the current epoch: before
            each validation run during ``fit`` (after weight averaging swapped its weights in),
            at the end of each training epoch that no validation run recalibrated (before
            ``ModelCheckpoint`` saves), and at the end of ``fit`` (after
            ``StochasticWeightAveraging`` / ``EMAWeightAveraging`` put the averaged weights in,
            whatever the callback order). ``0`` turns it off. The batches are the ones the
            training loop already moved to the device (kept by reference: that many batches
            of device memory); batches other than a tensor or an ``(input, ...)`` tuple need a
            ``recalibration_step(batch)`` method on the LightningModule that runs its forward.
            Default 10: 10 forward passes without gradients per validation (measured: the
            time of 4 training steps of a ResNetV2-20, about 1% of a CIFAR-10 epoch, 19% of
            the quickstart's 22-step epoch), which recover what 20 and 50 batches do (ResNetV2-20 after 100
            fast steps on digits: IterNorm eval 48% -> 99%, DBN 30% -> 98%; see
            ``docs/guide/statistics.md``).
    """

    def __init__(
        self,
        layer: str = "iternorm",
        layer_options: dict[str, Any] | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        types: str | Sequence[str] | None = None,
        min_channels: int = 1,
        placement: Literal["all", "first"] = "all",
        stages: Sequence[int] | None = None,
        frozen: bool = False,
        respect_conv_groups: bool = True,
        insert: str | Sequence[str] | None = None,
        drop_following_norm: bool = False,
        schedules: dict[str, Schedule | dict[str, Any] | float] | None = None,
        tie_whitening_rate_to_lr: float | None = None,
        sync: Literal["batch", "none"] | None = None,
        log_report: bool | Literal["table", "summary"] = True,
        recalibrate_batches: int = 10,
    ) -> None:
        super().__init__()
        if (
            isinstance(recalibrate_batches, bool)
            or not isinstance(recalibrate_batches, int)
            or recalibrate_batches < 0
        ):
            raise ValueError(
                "WhiteningCallback: recalibrate_batches must be an integer >= 0, got "
                f"{recalibrate_batches!r}"
            )
        if sync not in (None, "batch", "none"):
            raise ValueError(
                f"WhiteningCallback: sync must be 'batch', 'none' or None, got {sync!r}"
            )
        if log_report not in (True, False, "table", "summary"):
            raise ValueError(
                "WhiteningCallback: log_report must be true, false, 'table' or 'summary', got "
                f"{log_report!r}"
            )
        if tie_whitening_rate_to_lr is not None and not tie_whitening_rate_to_lr > 0:
            raise ValueError(
                "WhiteningCallback: tie_whitening_rate_to_lr must be a positive ratio, got "
                f"{tie_whitening_rate_to_lr!r}"
            )
        #: The conversion this callback applies (and stores in checkpoints).
        self.spec = ConversionSpec.of(
            layer,
            include=include,
            exclude=exclude,
            types=types,
            min_channels=min_channels,
            placement=placement,
            stages=stages,
            frozen=frozen,
            respect_conv_groups=respect_conv_groups,
            insert=insert,
            drop_following_norm=drop_following_norm,
            **dict(layer_options or {}),
        )
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
        self._skipped_seen: dict[str, dict[str, int]] = {}
        self.recalibrate_batches = recalibrate_batches
        #: The last training batches (device tensors, by reference) used to recalibrate.
        self._recent: deque[Any] = deque(maxlen=max(recalibrate_batches, 1))
        self._recalibrated_at: int | None = None  # global_step of the last recalibration
        self._validation_pending = False

    # -- conversion --------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # (Two WhiteningCallbacks are refused by Lightning itself when the Trainer is built:
        # the callback is stateful.)
        if self._converted is pl_module:
            return
        self._check_checkpoints(trainer)
        if _shards_in_configure_model(trainer):
            # FSDP2 (ModelParallelStrategy): configure_model calls fully_shard, which registers
            # the parameters it shards and all-reduces; layers swapped in afterwards would be
            # neither. Layers that exist already are converted first.
            self._convert(trainer, pl_module, only_if_found=True)
        _configure_model(trainer, pl_module)  # it may call convert_in_configure_model
        if self._converted is not pl_module:
            self._convert(trainer, pl_module)
        if stage == "fit":
            _rebuild_averaged_copies(trainer, pl_module, stage)

    def _convert(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        only_if_found: bool = False,
        log: bool = True,
    ) -> None:
        """Convert ``pl_module`` with the spec, bind the schedules, log the report.
        ``only_if_found``: only if the spec selects a layer (else leave it for later)."""
        from ..surgery import plan_conversion

        example = getattr(pl_module, "example_input_array", None)
        example = example if isinstance(example, Tensor) else None
        if example is not None:
            example = example.to(pl_module.device)
        plan = plan_conversion(pl_module, self.spec, example)
        if only_if_found and not (plan.to_replace or plan.to_insert):
            return
        if log:
            rank_zero_info("WhiteningCallback: converting normalization layers")
        self.report = plan.apply(pl_module)
        self._converted = pl_module
        layers = [m for m in pl_module.modules() if family_of(m) is not None]
        if self.sync is not None:
            for m in layers:
                if hasattr(m, "sync"):
                    m.sync = self.sync
        known = {f.layer.__name__: list(f.schedulable) for f in families().values()}
        self.scheduler.bind(pl_module, known_attributes=known)
        # The schedules' start values from now on, not the constructor's: what runs before the
        # first training batch (sanity check, BatchSizeFinder/LearningRateFinder trials) sees
        # the layers as training starts.
        self.scheduler.apply({"step": 0.0, "epoch": 0.0, "fraction": 0.0}, record=False)
        if self.tie_whitening_rate_to_lr is not None and not any(
            isinstance(m, SWBN) for m in layers
        ):
            raise ValueError(
                "WhiteningCallback: tie_whitening_rate_to_lr is set but the model has no SWBN "
                "layer (layer='swbn')"
            )
        if self.log_report and log:
            self._log_report(trainer)

    def convert_main_process(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, attributes: dict[str, Any]
    ) -> None:
        """``ddp_spawn``: convert the user's model in the main process after the workers'
        ``fit``, as the workers did, before their weights are loaded into it; ``attributes``
        are the layer attributes (schedules' values) the workers ended with."""
        if self._converted is not pl_module:
            self._convert(trainer, pl_module, log=False)
        apply_layer_attributes(pl_module, attributes, trusted=True)

    def _check_checkpoints(self, trainer: pl.Trainer) -> None:
        """Make a checkpoint that does not fit the conversion fail with the cause.

        Lightning reads a resumed checkpoint after ``setup`` through its strategy and then loads
        the weights, with errors that name a file format or state-dict keys, not the cause. The
        strategy's ``load_checkpoint`` is wrapped until ``teardown``: an unreadable file says
        so, and a checkpoint of another conversion (or none) is refused, naming both.
        """
        strategy = trainer.strategy
        if "load_checkpoint" in vars(strategy):
            return  # already wrapped (setup runs once per stage)
        original = strategy.load_checkpoint
        spec = self.spec

        def load_checkpoint(checkpoint_path, *args, **kwargs):
            try:
                checkpoint = original(checkpoint_path, *args, **kwargs)
            except UNREADABLE as err:
                raise unreadable(checkpoint_path, err) from err
            check_resume(checkpoint, spec)
            return checkpoint

        strategy.load_checkpoint = load_checkpoint

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        vars(trainer.strategy).pop("load_checkpoint", None)

    def _log_report(self, trainer: pl.Trainer) -> None:
        assert self.report is not None
        if trainer.is_global_zero:
            from ..surgery.report import render_table

            style = self.log_report
            if style is True:
                style = "table" if trainer.state.fn == "fit" else "summary"
            if style == "table":
                print(render_table(self.report.table()), end="")
            else:
                print(self.report.title())
        counts = {f"whiten/{k}": v for k, v in self.report.counts().items()}
        counts["whiten/layer"] = self.report.layer
        for logger in trainer.loggers:
            logger.log_hyperparams(counts)

    # -- schedules ---------------------------------------------------------------------------
    def _times(self, trainer: pl.Trainer, batch_idx: int) -> dict[str, float]:
        batches = trainer.num_training_batches
        per_epoch = batches if batches and math.isfinite(batches) else None
        # The epoch time at the first micro-batch of this optimizer step: under
        # accumulate_grad_batches every unit moves between optimizer steps only (the layers'
        # running statistics still update at every micro-batch, as BatchNorm's do).
        accumulate = max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1)
        first = batch_idx - batch_idx % accumulate
        epoch = trainer.current_epoch + (first / per_epoch if per_epoch else 0.0)
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

    # -- skipped batches -----------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Batches of this epoch only: a run resumed at an epoch boundary recalibrates on the
        # same batches as the uninterrupted one.
        self._recent.clear()
        self._skipped_seen = {key: read(pl_module) for key, (_, read) in _SKIP_COUNTERS.items()}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A host synchronization per counter and epoch. Layers on CPU have already warned.
        for key, (what, read) in _SKIP_COUNTERS.items():
            seen = self._skipped_seen.get(key, {})
            skipped = {}
            for name, count in read(pl_module).items():
                layer = pl_module.get_submodule(name)
                new = count - seen.get(name, 0)
                if (
                    new > 0
                    and layer.check_finite
                    and not warns_at_batch(getattr(layer, key).device)
                ):
                    skipped[name] = new
            if skipped:
                listed = ", ".join(f"{name} ({n})" for name, n in skipped.items())
                rank_zero_warn(
                    f"WhiteningCallback: epoch {trainer.current_epoch}: training batches with "
                    f"{what} were skipped by the running statistics of {listed}",
                    category=RuntimeWarning,
                )
        self._recalibrate_at_epoch_end(trainer, pl_module)

    # -- precise statistics ---------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if self.recalibrate_batches:
            self._recent.append(batch)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Recalibrated at the first validation batch: after every callback's
        # on_validation_epoch_start, where weight averaging swaps its averaged weights in.
        self._validation_pending = (
            bool(self.recalibrate_batches)
            and trainer.state.fn == "fit"
            and not trainer.sanity_checking
        )

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if self._validation_pending:
            self._validation_pending = False
            self.recalibrate(trainer, pl_module)

    def _recalibrate_at_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before ModelCheckpoint's epoch-end save (Lightning runs checkpoint callbacks last),
        # when no validation run has recalibrated at these weights: a checkpoint then holds the
        # statistics the module ends with.
        if self.recalibrate_batches and self._recalibrated_at != trainer.global_step:
            self.recalibrate(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_fit_end follows every callback's on_train_end, where StochasticWeightAveraging
        # and EMAWeightAveraging copy their averaged weights into the module.
        averaging = _weight_averaging_callbacks(trainer)
        if self.recalibrate_batches and (averaging or self._recalibrated_at != trainer.global_step):
            self.recalibrate(trainer, pl_module)
            _share_statistics_with_averages(trainer, pl_module)
        self._recent.clear()

    def recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Re-estimate the running statistics of ``pl_module`` (and of any timm ``ModelEma*``
        or torch ``AveragedModel`` inside it) on the last training batches kept.

        Returns the :class:`~lightning_whiten.recalibration.RecalibrationReport` of
        ``pl_module``, or ``None`` when there was nothing to do.
        """
        from ..recalibration import default_forward, recalibrate

        if not self._recent:
            return None
        batches = list(self._recent)
        step_fn = getattr(pl_module, "recalibration_step", None)
        if not callable(step_fn) and not is_overridden("forward", pl_module):
            # A module that runs its network in training_step only: nothing to call. Say so
            # once and stop, rather than failing the run.
            rank_zero_warn(
                f"WhiteningCallback: {type(pl_module).__name__} defines neither forward nor "
                "recalibration_step(batch), so the running statistics cannot be recalibrated "
                "(recalibrate_batches turned off); define one of them, or pass "
                "recalibrate_batches=0 to silence this"
            )
            self.recalibrate_batches = 0
            self._recent.clear()
            return None

        def forward(model: Any, batch: Any) -> Any:
            with trainer.precision_plugin.forward_context():
                if model is pl_module and callable(step_fn):
                    return step_fn(batch)
                return default_forward(model, batch)

        report = recalibrate(pl_module, batches, forward=forward, device=None)
        for name, copy in _averaged_copies(pl_module):
            try:
                recalibrate(copy, batches, forward=forward, device=None)
            except (TypeError, RuntimeError, ValueError) as err:
                rank_zero_warn(
                    f"WhiteningCallback: could not recalibrate the averaged copy '{name}' "
                    f"({type(err).__name__}: {err}); call lightning_whiten.recalibrate on it "
                    "with a forward that fits it"
                )
        self._recalibrated_at = trainer.global_step
        return report

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "values": dict(self.scheduler.current)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = state_dict.get("spec")
        if stored is not None:
            stored = ConversionSpec.from_dict(stored)
            if stored != self.spec:
                rank_zero_warn(
                    "WhiteningCallback: the checkpoint was written with another conversion "
                    f"({stored.to_dict()}) than this callback's ({self.spec.to_dict()})"
                )
        self.scheduler.current.update(dict(state_dict.get("values", {})))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.report is not None:
            checkpoint[CHECKPOINT_KEY] = {
                "spec": self.spec.to_dict(),
                "report": self.report.to_dict(),
                # Values that schedules (or the lr tie) moved away from the spec's options, so
                # load_converted rebuilds the layers as they were, not as they started.
                "attributes": layer_attributes(pl_module, self.scheduler),
            }


def _averaged_copies(pl_module: Any) -> list[tuple[str, Any]]:
    """Weight-averaged copies kept inside the module: ``(name, network)`` of timm's
    ``ModelEma``/``ModelEmaV2``/``ModelEmaV3`` and torch's ``AveragedModel`` submodules."""
    from torch.optim.swa_utils import AveragedModel

    copies = []
    for name, module in pl_module.named_modules():
        if isinstance(module, AveragedModel) or type(module).__name__.startswith("ModelEma"):
            inner = getattr(module, "module", None)
            if inner is not None:
                copies.append((f"{name}.module", inner))
    return copies


def _weight_averaging_callbacks(trainer: pl.Trainer) -> list[Any]:
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:  # Lightning < 2.6
        WeightAveraging = ()  # type: ignore[assignment,misc]
    return [
        cb
        for cb in trainer.callbacks
        if isinstance(cb, (StochasticWeightAveraging, WeightAveraging))  # type: ignore[arg-type]
    ]


def _rebuild_averaged_copies(
    trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
) -> None:
    """Weight-averaging callbacks listed before this one copied the module in their ``setup``,
    before the conversion: the copy has BatchNorm buffers (``EMAWeightAveraging`` then fails
    on the first update with a shape error; ``StochasticWeightAveraging`` would pair the
    parameters of different layers). Nothing was averaged yet, so their ``setup`` runs again,
    on the converted module."""
    for cb in _weight_averaging_callbacks(trainer):
        if getattr(cb, "_average_model", None) is not None:
            rank_zero_info(
                f"WhiteningCallback: {type(cb).__name__} copied the model before the conversion; "
                "copying it again from the converted model"
            )
            cb.setup(trainer, pl_module, stage)


def _share_statistics_with_averages(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """After ``fit``, ``EMAWeightAveraging`` writes its averaged model into every checkpoint
    (``on_save_checkpoint``): give that copy the recalibrated statistics too."""
    for cb in _weight_averaging_callbacks(trainer):
        average = getattr(cb, "_average_model", None)
        inner = getattr(average, "module", None)
        if inner is None or not hasattr(cb, "_swap_models"):
            continue
        ours = dict(pl_module.named_buffers())
        for name, buf in inner.named_buffers():
            if name in ours and ours[name].shape == buf.shape:
                buf.data.copy_(ours[name].data)


def _configure_model(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Call ``configure_model`` as Lightning does, so layers built there exist to be converted."""
    if is_overridden("configure_model", pl_module):
        with (
            trainer.strategy.tensor_init_context(),
            trainer.strategy.model_sharded_context(),
            trainer.precision_plugin.module_init_context(),
        ):
            pl_module.configure_model()


def _shards_in_configure_model(trainer: pl.Trainer) -> bool:
    """Whether the strategy expects ``configure_model`` to shard the model (FSDP2, tensor
    parallelism): Lightning's ``ModelParallelStrategy``."""
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:  # pragma: no cover - older Lightning
        return False
    return isinstance(trainer.strategy, ModelParallelStrategy)


def convert_in_configure_model(pl_module: pl.LightningModule) -> None:
    """Convert ``pl_module`` now, with the conversion of the Trainer's ``WhiteningCallback``:
    for modules that build their layers in ``configure_model`` and shard them there (FSDP2's
    ``fully_shard`` under ``ModelParallelStrategy``). Call it after building the layers and
    before sharding::

        def configure_model(self):
            if self.net is None:
                self.net = build_net()
                lw.convert_in_configure_model(self)  # before fully_shard
                fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    Layers that exist before ``configure_model`` (built in ``__init__``) need nothing: the
    callback converts them before calling it. Does nothing when the module is already
    converted, or outside ``trainer.fit``/``validate``/... with a ``WhiteningCallback``.
    """
    trainer = getattr(pl_module, "_trainer", None)
    callback = None
    if trainer is not None:
        callback = next((c for c in trainer.callbacks if isinstance(c, WhiteningCallback)), None)
    if callback is None or callback._converted is pl_module:
        return
    callback._convert(trainer, pl_module)


#: Per-layer counters of batches kept out of the running statistics, and what they count.
_SKIP_COUNTERS = {
    "nonfinite_batches": ("non-finite statistics", nonfinite_batches),
    "diverged_batches": ("a diverged whitening matrix", diverged_batches),
}
