"""``NormSAMCallback``: train any LightningModule (automatic optimization) with
:class:`lightning_whiten.NormSAM`, with no change to its ``training_step``.

How it plugs in. Lightning's automatic optimization hands a closure (``training_step``, zero
grad, backward) to ``LightningModule.optimizer_step``, which passes it on to
``optimizer.step(closure)`` through the precision plugin; the plugin runs the closure, then
``on_before_optimizer_step``, gradient clipping and the step (with a ``GradScaler``: unscale,
clip, ``scaler.step``). The callback wraps that closure (it replaces the module's
``optimizer_step`` for the duration of ``fit``, calling the original one, so a user override
still runs) by one that

1. runs ``training_step`` on the batch at ``w`` and takes the gradient of its loss with respect
   to the perturbed parameters only (``torch.autograd.grad``; under DDP without gradient sync,
   then one all-reduce of those few gradients: the full-batch method);
2. perturbs them (:meth:`NormSAM.perturb`, on the unscaled gradient under fp16 AMP);
3. calls Lightning's closure: ``training_step`` and backward at the perturbed point, with every
   usual hook, loss scaling and DDP gradient sync;
4. restores the perturbed parameters (and, with ``freeze_norm_stats``, the normalization
   buffers).

The plugin then clips and steps with the second gradient only, which is what SAM needs.
"""

from __future__ import annotations

import copy
import functools
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor

from ..sam import NormSAM, ParamsChoice, average_gradients, check_options

__all__ = ["NormSAMCallback"]


class NormSAMCallback(Callback):
    """Sharpness-aware minimization on the normalization layers (SAM-ON) for any
    LightningModule with automatic optimization.

    Args:
        rho, adaptive, eta, p, layerwise, normalize_bias, params, freeze_norm_stats: as in
            :class:`lightning_whiten.NormSAM` (``params="norm"``: SAM-ON; ``"all"``: SAM/ASAM).
        start_epoch, end_epoch: SAM runs in epochs ``start_epoch <= epoch < end_epoch``
            (``None``: to the end); other epochs take plain optimizer steps (the authors'
            ``start_sam`` / ``end_sam``).
        timing_every_n_steps: measure the step-time overhead every this many optimizer steps
            (synchronizing the device on those steps only); 0 disables it.

    Logged (``on_step``; ``sam/sharpness`` also as an epoch mean):

    * ``sam/sharpness``: the loss at the perturbed point minus the loss (a sharpness proxy);
    * ``sam/perturbation_norm``: ``||eps||_2``; ``sam/grad_norm``: ``||g_S||_2`` (unscaled);
    * ``sam/first_pass_ms`` and ``sam/overhead_pct`` (sampled steps, straight to the loggers):
      the time SAM adds (its first pass and ascent, plus the replay of the earlier micro-batches
      when accumulating) and that time relative to a plain step's forward and backward (the
      second pass's time, times ``accumulate_grad_batches``).

    What the module's own logs show: ``training_step`` runs twice per SAM step. Its first run,
    at the unperturbed weights, is the one logged: ``train/loss`` (or whatever it logs) is the
    loss at ``w``, comparable with a run without SAM. In the second run, at the perturbed
    point, ``self.log`` / ``self.log_dict`` are no-ops and the states of its torchmetrics are
    restored afterwards, so nothing is counted twice. The loss Lightning itself reports (the
    ``outputs`` of ``on_train_batch_end``) is the second run's, at the perturbed point. Other
    side effects of ``training_step`` happen twice.

    Gradient accumulation: every micro-batch is replayed at the perturbed point (their
    first-pass gradients, already accumulated by Lightning, give the ascent direction; the
    unperturbed gradients are then discarded and each earlier micro-batch runs again at the
    perturbed point before the last one), so ``accumulate_grad_batches=k`` with batches of
    ``B`` computes the same step as batches of ``k B`` for batch-independent models. The
    earlier micro-batches are kept in memory until the step.

    Supported: one optimizer (not LBFGS), single device and DDP strategies, fp32 / bf16 / fp16
    (with its ``GradScaler``) precision, gradient clipping (applied to the second gradient),
    accumulation, checkpoint resume. With :class:`WhiteningCallback` the whitening layers'
    ``weight`` and ``bias`` are perturbed and their buffers follow ``freeze_norm_stats``.
    """

    def __init__(
        self,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        p: int | float | str = 2,
        layerwise: bool = False,
        normalize_bias: bool = False,
        params: ParamsChoice = "norm",
        freeze_norm_stats: bool = False,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        timing_every_n_steps: int = 50,
    ) -> None:
        super().__init__()
        check_options("NormSAMCallback", rho, adaptive, eta, p, layerwise, normalize_bias, params)
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(
                f"NormSAMCallback: start_epoch must be an integer >= 0, got {start_epoch!r}"
            )
        if end_epoch is not None and (
            isinstance(end_epoch, bool)
            or not isinstance(end_epoch, int)
            or end_epoch <= start_epoch
        ):
            raise ValueError(
                f"NormSAMCallback: end_epoch must be None or an integer > start_epoch "
                f"({start_epoch}), got {end_epoch!r}"
            )
        if isinstance(timing_every_n_steps, bool) or not (
            isinstance(timing_every_n_steps, int) and timing_every_n_steps >= 0
        ):
            raise ValueError(
                "NormSAMCallback: timing_every_n_steps must be an integer >= 0, got "
                f"{timing_every_n_steps!r}"
            )
        self.options: dict[str, Any] = {
            "rho": rho,
            "adaptive": adaptive,
            "eta": eta,
            "p": p,
            "layerwise": layerwise,
            "normalize_bias": normalize_bias,
            "params": params,
            "freeze_norm_stats": freeze_norm_stats,
        }
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.timing_every_n_steps = timing_every_n_steps
        #: The minimizer, built at the start of training (after the optimizer exists).
        self.sam: NormSAM | None = None
        #: SAM steps taken in this process (plain steps outside the epoch range not counted).
        self.sam_steps = 0
        self._micro_batches: list[tuple[Any, int]] = []
        self._unperturbed_losses: list[Tensor] = []
        self._pending: dict[str, Tensor] = {}
        self._timing: dict[str, float] = {}
        self._patched: pl.LightningModule | None = None

    # -- setup -------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "NormSAMCallback needs automatic optimization; with manual optimization call "
                "lightning_whiten.NormSAM's first_step/second_step in training_step"
            )
        if sum(isinstance(c, NormSAMCallback) for c in trainer.callbacks) > 1:
            raise ValueError("NormSAMCallback: the Trainer has more than one NormSAMCallback")
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                "NormSAMCallback supports single-device and DDP strategies, got "
                f"{type(strategy).__name__}"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"NormSAMCallback needs exactly one optimizer, got {len(optimizers)}")
        if isinstance(optimizers[0], torch.optim.LBFGS):
            raise ValueError(
                "NormSAMCallback: LBFGS evaluates the closure several times per step; "
                "use a first-order base optimizer"
            )
        self.sam = NormSAM(pl_module, optimizers[0], **self.options)
        self._patch(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unpatch()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unpatch()

    def _patch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unpatch()
        original = pl_module.optimizer_step  # the class's method, or a user's override

        @functools.wraps(original)
        def optimizer_step(epoch, batch_idx, optimizer, optimizer_closure=None, *args, **kwargs):
            closure = optimizer_closure
            if closure is not None and self._active(trainer):
                closure = functools.partial(
                    self._sam_closure, trainer, pl_module, optimizer, optimizer_closure, batch_idx
                )
            try:
                return original(epoch, batch_idx, optimizer, closure, *args, **kwargs)
            finally:
                # the step is taken: the next micro-batch starts a new accumulation
                self._micro_batches.clear()
                self._unperturbed_losses.clear()

        pl_module.optimizer_step = optimizer_step
        self._patched = pl_module

    def _unpatch(self) -> None:
        if self._patched is not None:
            self._patched.__dict__.pop("optimizer_step", None)
            self._patched = None
        self._micro_batches.clear()
        self._unperturbed_losses.clear()

    def _active(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        return self.start_epoch <= epoch and (self.end_epoch is None or epoch < self.end_epoch)

    # -- micro-batches and logging -------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # (an epoch cut short before its step, e.g. by on_train_batch_start returning -1,
        # leaves nothing to replay in the next one)
        self._micro_batches.clear()
        self._unperturbed_losses.clear()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._micro_batches.append((batch, batch_idx))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._micro_batches:
            # no step yet (accumulating): keep this micro-batch's loss at w for the sharpness
            loss = _loss_of(outputs)
            if loss is not None:
                self._unperturbed_losses.append(loss.detach())
            return
        pending, self._pending = self._pending, {}
        timing, self._timing = self._timing, {}
        for key, value in pending.items():
            pl_module.log(key, value, on_step=True, on_epoch=key == "sam/sharpness")
        if timing and trainer.is_global_zero:
            # Straight to the loggers: self.log would repeat the value at every later step.
            for logger in trainer.loggers:
                logger.log_metrics(timing, step=trainer.global_step)

    # -- the SAM step --------------------------------------------------------------------------
    def _sam_closure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: Any,
        closure: Any,
        batch_idx: int,
    ) -> Any:
        sam = self.sam
        assert sam is not None
        if not self._micro_batches:  # (not reached through Lightning's loop)
            return closure()
        *earlier, (batch, index) = self._micro_batches
        k = trainer.accumulate_grad_batches
        timed = (
            self.timing_every_n_steps > 0 and trainer.global_step % self.timing_every_n_steps == 0
        )
        device = pl_module.device
        start = _now(device, timed)

        # 1. at w: the gradient of the perturbed parameters only
        with _no_sync(trainer):
            loss = _loss_of(_training_step(trainer, pl_module, batch, index))
        if loss is None:  # training_step skipped the batch: let Lightning handle it
            with _silenced(pl_module):
                return closure()
        loss = loss / k
        scale = _grad_scale(trainer, loss)
        grads = sam.gradients(loss * scale if scale is not None else loss)
        if earlier:  # Lightning accumulated the earlier micro-batches' gradients at w
            grads = [
                q.grad if g is None else (g if q.grad is None else g + q.grad)
                for g, (_, q) in zip(grads, sam.named_parameters, strict=True)
            ]
        if trainer.world_size > 1:  # DDP averages gradients; so does the ascent direction
            grads = average_gradients(grads, [q for _, q in sam.named_parameters])
        unperturbed = loss.detach() + sum(self._unperturbed_losses)

        # 2. ascent, 3. second pass at the perturbed point, 4. restore
        sam.perturb(grads, grad_scale=scale)
        first_done = _now(device, timed)
        replay_ms = 0.0
        try:
            with _silenced(pl_module):
                perturbed = torch.zeros((), device=loss.device)
                if earlier:
                    # discard the unperturbed gradients, replay the earlier micro-batches
                    pl_module.optimizer_zero_grad(trainer.current_epoch, batch_idx, optimizer)
                    for micro_batch, micro_index in earlier:
                        with _no_sync(trainer):
                            micro_loss = _loss_of(
                                _training_step(trainer, pl_module, micro_batch, micro_index)
                            )
                            if micro_loss is None:
                                continue
                            micro_loss = micro_loss / k
                            call._call_strategy_hook(trainer, "backward", micro_loss, optimizer)
                        perturbed = perturbed + micro_loss.detach()
                    replay_ms = (_now(device, timed) - first_done) * 1e3
                last = closure()
                if last is not None:
                    perturbed = perturbed + last
        finally:
            sam.restore()
        end = _now(device, timed)

        self.sam_steps += 1
        pending: dict[str, Tensor] = {}
        if last is not None:  # (None: training_step skipped the batch at the perturbed point)
            pending["sam/sharpness"] = (perturbed - unperturbed).float()
        if sam.perturbation_norm is not None:
            pending["sam/perturbation_norm"] = sam.perturbation_norm.float()
            pending["sam/grad_norm"] = sam.grad_norm.float()
        self._pending = pending
        if timed:
            extra_ms = (first_done - start) * 1e3 + replay_ms
            plain_ms = (end - first_done) * 1e3 - replay_ms
            self._timing = {
                "sam/first_pass_ms": extra_ms,
                "sam/overhead_pct": 100.0 * extra_ms / max(plain_ms * k, 1e-9),
            }
        return last


# -- helpers ----------------------------------------------------------------------------------
def _loss_of(output: Any) -> Tensor | None:
    """The loss in a ``training_step`` output (a tensor, or a mapping with ``"loss"``)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        loss = output.get("loss")
        return loss if isinstance(loss, Tensor) else None
    return None


def _training_step(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, index: int):
    """``training_step`` as Lightning's loop calls it (strategy, precision context, DDP)."""
    kwargs: OrderedDict[str, Any] = OrderedDict(batch=batch)
    if is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2):
        kwargs["batch_idx"] = index
    return call._call_strategy_hook(trainer, "training_step", *kwargs.values())


def _no_sync(trainer: pl.Trainer):
    strategy = trainer.strategy
    if isinstance(strategy, ParallelStrategy):
        return strategy.block_backward_sync()
    return nullcontext()


def _grad_scale(trainer: pl.Trainer, loss: Tensor) -> Tensor | None:
    """The ``GradScaler``'s current scale as a tensor (no host synchronization), if any."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler.scale(torch.ones((), device=loss.device, dtype=torch.float32))


def _now(device: torch.device, timed: bool) -> float:
    if not timed:
        return 0.0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _copy_state(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        # "cat" states grow by appending new tensors: keeping the list's items is enough (and
        # keeps the copy O(1) per step instead of O(epoch))
        return list(value)
    return copy.deepcopy(value)


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def _silenced(pl_module: pl.LightningModule) -> Iterator[None]:
    """Inside: ``self.log`` / ``self.log_dict`` do nothing; afterwards the module's torchmetrics
    are back in their state from before (the second pass is not counted)."""
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - a Lightning dependency
        Metric = ()
    saved = []
    for m in pl_module.modules():
        if isinstance(m, Metric):
            states = {name: _copy_state(getattr(m, name)) for name in m._defaults}
            extra = {
                key: _copy_state(getattr(m, key))
                for key in ("_update_count", "_computed", "_forward_cache")
                if hasattr(m, key)
            }
            saved.append((m, states, extra))
    pl_module.log = _no_log
    pl_module.log_dict = _no_log
    try:
        yield
    finally:
        pl_module.__dict__.pop("log", None)
        pl_module.__dict__.pop("log_dict", None)
        for m, states, extra in saved:
            for name, value in {**states, **extra}.items():
                setattr(m, name, value)
