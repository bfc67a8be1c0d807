"""``NormalizationAnalysis``: why a normalizer helps or hurts, measured on the model being
trained. A thin adapter over :mod:`lightning_whiten.diagnostics`: Lubana et al.'s probes at the
start of fit, Santurkar et al.'s landscape smoothness and internal covariate shift every ``n``
steps, logged to the Trainer's loggers with the time they took.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from .. import diagnostics as D

__all__ = ["NormalizationAnalysis"]


class NormalizationAnalysis(Callback):
    """Log the mechanisms behind a normalizer's effect during training.

    At the first training batch of the fit (``init_probes``), on that batch: per activation and
    convolution, Lubana et al.'s activation variance, sample cosine similarity, stable rank,
    pre-normalization spread and activation-gradient norm (:func:`~lightning_whiten.diagnostics.init_probes`).

    Every ``every_n_steps`` optimizer steps, at the start of the training batch (weights ``w_t``,
    the batch ``B_t`` the step is about to use): Santurkar et al.'s loss range, gradient
    predictiveness and effective beta-smoothness along the gradient
    (:func:`~lightning_whiten.diagnostics.landscape`) and their internal covariate shift per
    layer (:func:`~lightning_whiten.diagnostics.covariate_shift`, with the first optimizer).

    Logged keys (to the Trainer's loggers, at the global step; rank 0):

    * ``norm/init/<layer>/<metric>`` and ``norm/init/<summary>`` (``activation_growth``,
      ``gradient_ratio``, ``final_cosine_similarity``, ``final_stable_rank``, ...);
    * ``norm/loss_min``, ``norm/loss_max``, ``norm/grad_change_min``, ``norm/grad_change_max``,
      ``norm/beta_smoothness``, ``norm/grad_norm``;
    * ``norm/ics/<layer>/l2``, ``norm/ics/<layer>/cosine`` and their means over layers
      ``norm/ics_l2_mean``, ``norm/ics_cosine_mean``;
    * ``norm/analysis_ms``: the time of each measurement.

    Training is unchanged: every measurement restores the weights, ``.grad``, the optimizer's
    state, every buffer, module attributes and the random number generators (a fit with and
    without the callback gives the same losses -- tested). Measurements run in float32 outside
    autocast, on the LightningModule's ``forward`` (or ``module``). Under DDP every rank runs
    them (layers that sync statistics across processes need all ranks) and rank 0 logs its own.

    Cost: ``init_probes`` is one forward and backward pass, once. A landscape measurement is
    ``1 + len(step_sizes)`` passes, covariate shift ``2 + (number of layers measured)`` passes and
    a simulated optimizer step; :attr:`seconds` and the summary give the measured share of
    training time.

    Args:
        every_n_steps: measure landscape and covariate shift every this many optimizer steps
            (0: never).
        landscape: measure Santurkar et al.'s smoothness.
        covariate_shift: measure internal covariate shift.
        init_probes: run Lubana et al.'s probes once, at the first training batch of the fit
            (not again when the fit resumes from a checkpoint).
        step_sizes: ``eta`` grid of the landscape.
        covariate_shift_layers: names of the layers whose covariate shift is measured
            (default: the convolutions and linear layers).
        covariate_shift_max_layers: at most this many of them, spread evenly over the depth
            (first and last included; ``None``: all). Each costs a forward and backward pass.
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar, or a name in
            ``torch.nn.functional`` (``"cross_entropy"``); default the module's ``criterion``
            if it has one (``ImageClassifier``), else cross-entropy.
        batch_fn: ``batch -> (inputs, targets)``; default the first two items of the batch.
        module: dotted attribute path of the ``nn.Module`` to measure inside the LightningModule
            (e.g. ``"net"``); default the LightningModule itself (its ``forward``).
        log_layers: log per-layer keys (``norm/init/<layer>/...``, ``norm/ics/<layer>/...``);
            the summaries are always logged.
        summary: print the init-probe table and a summary at the end of fit (rank 0).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        landscape: bool = True,
        covariate_shift: bool = True,
        init_probes: bool = True,
        step_sizes: Sequence[float] = D.DEFAULT_STEP_SIZES,
        covariate_shift_layers: Sequence[str] | None = None,
        covariate_shift_max_layers: int | None = 8,
        loss_fn: str | Callable[[Any, Any], Tensor] | None = None,
        batch_fn: Callable[[Any], tuple[Any, Any]] | None = None,
        module: str | None = None,
        log_layers: bool = True,
        summary: bool = True,
    ) -> None:
        super().__init__()
        if (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 0
        ):
            raise ValueError(
                f"NormalizationAnalysis: every_n_steps must be an integer >= 0, got {every_n_steps!r}"
            )
        if not step_sizes or any(not float(e) > 0 for e in step_sizes):
            raise ValueError(
                f"NormalizationAnalysis: step_sizes must be positive numbers, got {step_sizes!r}"
            )
        if isinstance(loss_fn, str):
            if not callable(getattr(nn.functional, loss_fn, None)):
                raise ValueError(
                    f"NormalizationAnalysis: loss_fn {loss_fn!r} is not a function of "
                    "torch.nn.functional"
                )
            loss_fn = getattr(nn.functional, loss_fn)
        self.every_n_steps = every_n_steps
        self.landscape = landscape
        self.covariate_shift = covariate_shift
        self.init_probes = init_probes
        self.step_sizes = tuple(float(e) for e in step_sizes)
        self.covariate_shift_layers = (
            list(covariate_shift_layers) if covariate_shift_layers is not None else None
        )
        self.covariate_shift_max_layers = covariate_shift_max_layers
        self.loss_fn = loss_fn
        self.batch_fn = batch_fn
        self.module = module
        self.log_layers = log_layers
        self.summary = summary
        #: What init_probes measured (``InitProbes``), once it ran.
        self.init_result: D.InitProbes | None = None
        #: One dict per measured step: ``{"step", "landscape", "covariate_shift", "ms"}``.
        self.history: list[dict[str, Any]] = []
        #: Seconds spent in measurements, and in training (``on_train_start`` to ``on_train_end``).
        self.seconds = 0.0
        self.train_seconds = 0.0
        self._init_done = False
        self._last_step: int | None = None
        self._train_start: float | None = None

    # -- helpers -------------------------------------------------------------------------------
    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        target: Any = pl_module
        for part in (self.module or "").split("."):
            if part:
                if not hasattr(target, part):
                    raise AttributeError(
                        f"NormalizationAnalysis: {type(pl_module).__name__} has no attribute "
                        f"path {self.module!r}"
                    )
                target = getattr(target, part)
        if not isinstance(target, nn.Module):
            raise TypeError(
                f"NormalizationAnalysis: module {self.module!r} is a {type(target).__name__}, "
                "not an nn.Module"
            )
        return target

    def _loss_fn(self, pl_module: pl.LightningModule) -> Callable[[Any, Any], Tensor]:
        if self.loss_fn is not None:
            return self.loss_fn
        criterion = getattr(pl_module, "criterion", None)
        return criterion if callable(criterion) else nn.functional.cross_entropy

    def _split(self, batch: Any) -> tuple[Any, Any]:
        if self.batch_fn is not None:
            return self.batch_fn(batch)
        try:
            return batch[0], batch[1]
        except (TypeError, IndexError, KeyError):
            raise TypeError(
                "NormalizationAnalysis: cannot take (inputs, targets) from a batch of type "
                f"{type(batch).__name__}; pass batch_fn"
            ) from None

    def _timed(self, device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        return out, seconds * 1e3

    # -- hooks -----------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start = time.perf_counter()
        if self.covariate_shift and self.every_n_steps and not trainer.optimizers:
            rank_zero_warn("NormalizationAnalysis: no optimizer, covariate shift is not measured")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._train_start is not None:
            self.train_seconds += time.perf_counter() - self._train_start
            self._train_start = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        due_init = self.init_probes and not self._init_done
        step = trainer.global_step
        due = (
            self.every_n_steps > 0
            and step % self.every_n_steps == 0
            and step != self._last_step
            and (self.landscape or self.covariate_shift)
        )
        if not (due_init or due):
            return
        model = self._target(pl_module)
        loss_fn = self._loss_fn(pl_module)
        x, y = self._split(batch)
        device = pl_module.device
        metrics: dict[str, float] = {}
        if due_init:
            self._init_done = True
            probes, ms = self._timed(device, lambda: D.init_probes(model, (x, y), loss_fn))
            self.init_result = probes
            metrics.update({f"norm/init/{k}": v for k, v in probes.summary().items()})
            if self.log_layers:
                for name, row in probes.layers.items():
                    for metric, value in row.items():
                        if isinstance(value, float):
                            metrics[f"norm/init/{name}/{metric}"] = value
            metrics["norm/init_ms"] = ms
        if due:
            self._last_step = step
            record: dict[str, Any] = {"step": step}
            total_ms = 0.0
            if self.landscape:
                smooth, ms = self._timed(
                    device, lambda: D.landscape(model, loss_fn, (x, y), self.step_sizes)
                )
                total_ms += ms
                record["landscape"] = smooth
                metrics.update({
                    "norm/loss_min": smooth["loss_range"][0],
                    "norm/loss_max": smooth["loss_range"][1],
                    "norm/grad_change_min": smooth["gradient_predictiveness"][0],
                    "norm/grad_change_max": smooth["gradient_predictiveness"][1],
                    "norm/beta_smoothness": smooth["beta_smoothness"],
                    "norm/grad_norm": smooth["grad_norm"],
                })  # fmt: skip
            if self.covariate_shift and trainer.optimizers:
                optimizer = trainer.optimizers[0]
                shift, ms = self._timed(
                    device,
                    lambda: D.covariate_shift(
                        model,
                        loss_fn,
                        (x, y),
                        optimizer,
                        self.covariate_shift_layers,
                        self.covariate_shift_max_layers,
                    ),
                )
                total_ms += ms
                record["covariate_shift"] = shift
                if shift:
                    metrics["norm/ics_l2_mean"] = sum(v["l2"] for v in shift.values()) / len(shift)
                    cosines = [v["cosine"] for v in shift.values() if v["cosine"] == v["cosine"]]
                    if cosines:
                        metrics["norm/ics_cosine_mean"] = sum(cosines) / len(cosines)
                if self.log_layers:
                    for name, values in shift.items():
                        metrics[f"norm/ics/{name}/l2"] = values["l2"]
                        metrics[f"norm/ics/{name}/cosine"] = values["cosine"]
            record["ms"] = total_ms
            metrics["norm/analysis_ms"] = total_ms
            self.history.append(record)
        _log(trainer, metrics)

    def overhead_pct(self) -> float:
        """Measurement time as a percentage of the training time without it."""
        rest = self.train_seconds - self.seconds
        return 100.0 * self.seconds / rest if rest > 0 else float("nan")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.summary and trainer.is_global_zero):
            return
        from rich.console import Console
        from rich.table import Table

        console = Console(width=max(Console().width, 110))
        if self.init_result is not None:
            console.print(self.init_result.table())
        if not self.history:
            return
        table = Table(
            title=(
                f"Normalization analysis: {len(self.history)} measured steps, "
                f"{self.seconds:.1f} s ({self.overhead_pct():.1f}% of training)"
            ),
            title_justify="left",
        )
        for column in ("step", "loss range", "grad change range", "beta", "ICS l2", "ICS cos"):
            table.add_column(column, justify="right")
        for record in self.history:
            smooth = record.get("landscape")
            shift = record.get("covariate_shift") or {}
            row = [str(record["step"])]
            if smooth:
                lo, hi = smooth["loss_range"]
                glo, ghi = smooth["gradient_predictiveness"]
                row += [
                    f"{lo:.4g}-{hi:.4g}",
                    f"{glo:.3g}-{ghi:.3g}",
                    f"{smooth['beta_smoothness']:.3g}",
                ]
            else:
                row += ["-", "-", "-"]
            if shift:
                row.append(f"{sum(v['l2'] for v in shift.values()) / len(shift):.3g}")
                row.append(f"{sum(v['cosine'] for v in shift.values()) / len(shift):.3f}")
            else:
                row += ["-", "-"]
            table.add_row(*row)
        console.print(table)

    # -- checkpoint ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"init_done": self._init_done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._init_done = bool(state_dict.get("init_done", False))


def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    # Straight to the loggers at the current step: these values exist only on measured steps.
    if not metrics or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
