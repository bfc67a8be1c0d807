"""``WhiteningMonitor``: what whitening costs and what it does, in the Trainer's loggers.

Overhead (sampled steps only): per layer forward and backward time, the whitening layers' share
of the training step, and their memory (buffers plus what they save for backward). Timing
hooks are attached for a sampled step and removed after it, so other steps run untouched; on
GPU the times come from CUDA events read at the end of the sampled step, and no host
synchronization happens on other steps.

Quality (every ``snd_every_n_epochs``): SND and whiteness per layer (see
:mod:`lightning_whiten.diagnostics`) on inputs captured with forward hooks during the first
training batches of the epoch, with a fixed seed. For SWBN also the distance of its whitening
matrix from where it started, ``||W - W_0||_F / sqrt(d)`` (mean over groups), and the whiteness
BatchNorm would give on the same inputs (``W = I``); at the end of fit a warning (once) when
every SWBN layer's ``W`` is still within 1% of its start: SWBN then trained as BatchNorm.

Under DDP, every metric is measured and logged on rank 0 only (ranks run the same model on
same-sized batches; SND needs no collective).
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..diagnostics import snd, whiteness
from ..layers import SWBN, IterNorm, WhiteningNorm

__all__ = ["WhiteningMonitor", "swbn_distance"]

#: ``||W - W_0||_F / sqrt(d)`` below which an SWBN layer is reported as still BatchNorm: its
#: output differs from BN's by about this fraction of the output's scale.
SWBN_STILL_BN = 0.01


@torch.no_grad()
def swbn_distance(layer: SWBN, start: Tensor | None = None) -> float:
    """How far SWBN's whitening matrix moved: ``mean_g ||W_g - W0_g||_F / sqrt(d_g)``.

    ``start``: the ``(G, d, d)`` matrices it started from (default: the identity, a layer
    converted from BatchNorm). Groups of ``d_g`` real channels (padding excluded).
    """
    w = layer.whitening.to(torch.float64)
    w0 = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device) if start is None else start
    diff = w - w0.to(w)
    sizes = torch.tensor(layer.group_sizes, dtype=w.dtype, device=w.device)
    mask = layer.group_mask
    if mask is not None:  # the padded channels of the last group are not part of the layer
        pair = mask.unsqueeze(-1) & mask.unsqueeze(-2)
        diff = diff * pair.to(diff.dtype)
    return float((torch.linalg.matrix_norm(diff) / sizes.sqrt()).mean())


class _Clock:
    """Wall-clock marks on CPU, CUDA events on GPU (read only when the step is over)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: Any, end: Any) -> float:
        if self.cuda:
            end.synchronize()
            return float(start.elapsed_time(end))
        return (end - start) * 1e3


@dataclass
class _LayerStats:
    name: str
    module: nn.Module
    forward_ms: list[float] = field(default_factory=list)
    backward_ms: list[float] = field(default_factory=list)
    saved_bytes: int = 0
    buffer_bytes: int = 0
    quality: dict[str, float] = field(default_factory=dict)
    quality_skipped: str | None = None  # why SND/whiteness could not be measured, if so
    cache: list[Tensor] = field(default_factory=list)
    whitening_start: Tensor | None = None  # SWBN's W at fit start
    # per sampled step
    marks: list[tuple[Any, Any]] = field(default_factory=list)
    node_marks: list[list[Any]] = field(default_factory=list)
    timed_nodes: int = 0  # autograd nodes timed for the last sampled step


class WhiteningMonitor(Callback):
    """Log the cost and the effect of whitening during training.

    Logged keys (to the Trainer's loggers, at the global step):

    * ``whiten/step_ms``, ``whiten/overhead_ms``, ``whiten/overhead_pct``: time of a sampled
      training step, of its whitening layers (forward + backward) and their share (%).
    * ``whiten/memory_mb``: whitening layers' buffers plus what they save for backward.
    * ``whiten/<layer>/forward_ms``, ``whiten/<layer>/backward_ms``, ``whiten/<layer>/saved_mb``.
    * ``whiten/<layer>/snd``, ``whiten/<layer>/whiteness``, ``whiten/<layer>/condition_number``
      and, for IterNorm, ``whiten/<layer>/newton_residual``, every ``snd_every_n_epochs``.

    The monitor never stops training: a measurement it cannot make (non-finite inputs, a
    failed decomposition) is skipped, reported once as a warning and in the summary.

    Args:
        every_n_steps: measure overhead on the second training batch (the first one warms up)
            and then on one batch in this many (0 disables).
        snd_every_n_epochs: compute SND and whiteness every this many epochs (0 disables).
        snd_batch_size: mini-batch size for SND (default: the training batch size seen).
        snd_num_batches: mini-batches per probe sample (cost: ``probes x num_batches``
            normalizations of a mini-batch per layer and evaluation; the defaults keep SND under
            ~1% of an epoch of a few hundred steps; raise both for less noisy estimates).
        snd_probes: probe samples per layer.
        capture_batches: training batches whose layer inputs are cached for SND/whiteness.
        max_cached_samples: at most this many samples cached per layer (kept on the CPU).
        layers: glob patterns of layer names to monitor (default: every whitening layer).
        include_batchnorm: also monitor BatchNorm layers, as a baseline.
        summary: print a table at the end of fit (rank 0).
        seed: seed of the SND sampling.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        snd_every_n_epochs: int = 1,
        snd_batch_size: int | None = None,
        snd_num_batches: int = 4,
        snd_probes: int = 4,
        capture_batches: int = 1,
        max_cached_samples: int = 128,
        layers: str | Sequence[str] | None = None,
        include_batchnorm: bool = False,
        summary: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("snd_every_n_epochs", snd_every_n_epochs),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"WhiteningMonitor: {name} must be an integer >= 0, got {value!r}")
        self.every_n_steps = every_n_steps
        self.snd_every_n_epochs = snd_every_n_epochs
        self.snd_batch_size = snd_batch_size
        self.snd_num_batches = snd_num_batches
        self.snd_probes = snd_probes
        self.capture_batches = capture_batches
        self.max_cached_samples = max_cached_samples
        self.patterns = [layers] if isinstance(layers, str) else list(layers or [])
        self.include_batchnorm = include_batchnorm
        self.summary = summary
        self.seed = seed
        self.layers: dict[str, _LayerStats] = {}
        self.step_ms: list[float] = []
        self.overhead_pct: list[float] = []
        self._handles: list[Any] = []
        self._open_contexts: list[Any] = []  # saved-tensor hooks entered by a sampled forward
        self._sampled = False
        self._capturing = False
        self._captured_batches = 0
        self._batch_counter = 0
        self._step_start: Any = None
        self._clock: _Clock | None = None
        self._train_batch_size: int | None = None
        self._warned_swbn = False

    # -- discovery ---------------------------------------------------------------------------
    def _wanted(self, name: str, module: nn.Module) -> bool:
        if not (
            isinstance(module, WhiteningNorm)
            or (self.include_batchnorm and isinstance(module, _BatchNorm))
        ):
            return False
        return not self.patterns or any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layers = {
            name: _LayerStats(name, module)
            for name, module in pl_module.named_modules()
            if name and self._wanted(name, module)
        }
        for stats in self.layers.values():
            stats.buffer_bytes = sum(
                b.numel() * b.element_size() for b in stats.module.buffers(recurse=False)
            )
            if isinstance(stats.module, SWBN):
                stats.whitening_start = stats.module.whitening.detach().to(torch.float64).clone()
        if not self.layers:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                "WhiteningMonitor: no whitening layer to monitor (is WhiteningCallback set?)"
            )
        self._clock = _Clock(pl_module.device)

    # -- overhead on sampled steps -------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_counter += 1
        measuring = (
            self.every_n_steps
            and (self._batch_counter == 2 or self._batch_counter % self.every_n_steps == 0)
            and trainer.is_global_zero
        )
        self._sampled = bool(measuring) and bool(self.layers)
        capture = (
            self._capturing
            and self._captured_batches < self.capture_batches
            and trainer.is_global_zero
        )
        if not (self._sampled or capture):
            return
        for stats in self.layers.values():
            stats.marks.clear()
            stats.node_marks.clear()
            self._handles.append(
                stats.module.register_forward_pre_hook(self._pre_hook(stats, capture))
            )
            if self._sampled:
                self._handles.append(stats.module.register_forward_hook(self._post_hook(stats)))
        if capture:
            self._captured_batches += 1
        if self._sampled:
            self._step_start = self._clock.mark()

    def _pre_hook(self, stats: _LayerStats, capture: bool):
        def hook(module, args):
            x = args[0]
            if capture:
                if self._train_batch_size is None:
                    self._train_batch_size = x.shape[0]
                room = self.max_cached_samples - sum(c.shape[0] for c in stats.cache)
                if room > 0:
                    stats.cache.append(x[:room].detach().to("cpu", copy=True))
            if self._sampled:
                saved: dict[int, int] = {}

                def pack(t: Tensor) -> Tensor:
                    storage = t.untyped_storage()
                    saved[storage.data_ptr()] = storage.nbytes()
                    return t

                ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
                ctx.__enter__()
                self._open_contexts.append(ctx)
                # The autograd node that produced the input: the layer's backward ends there.
                stop = x.grad_fn if isinstance(x, Tensor) else None
                stats.marks.append((self._clock.mark(), (ctx, saved, stop)))

        return hook

    def _post_hook(self, stats: _LayerStats):
        def hook(module, args, output):
            start, (ctx, saved, stop) = stats.marks.pop()
            end = self._clock.mark()
            self._close(ctx)
            stats.forward_ms.append(self._clock.ms(start, end))
            stats.saved_bytes = sum(saved.values())
            if isinstance(output, Tensor) and output.grad_fn is not None:
                self._time_backward(stats, output.grad_fn, stop)

        return hook

    def _time_backward(self, stats: _LayerStats, first: Any, stop: Any) -> None:
        """Time the layer's own autograd nodes: every node between its output and the node
        that produced its input (``stop``, excluded), whatever the layer computes."""
        nodes, stack = [], [first]
        while stack:
            node = stack.pop()
            if node is None or node is stop or node in nodes:
                continue
            nodes.append(node)
            stack.extend(n for n, _ in node.next_functions)
        marks: list[Any] = []
        stats.node_marks.append(marks)
        stats.timed_nodes = len(nodes)
        for node in nodes:
            begin: list[Any] = []
            node.register_prehook(lambda *_, begin=begin: begin.append(self._clock.mark()))
            node.register_hook(
                lambda *_, begin=begin, marks=marks: marks.append((begin.pop(), self._clock.mark()))
            )

    def _close(self, ctx: Any) -> None:
        if ctx in self._open_contexts:
            self._open_contexts.remove(ctx)
            ctx.__exit__(None, None, None)

    def _cleanup(self) -> None:
        """Remove every hook this monitor installed and leave every saved-tensor hook it
        entered (innermost first): after an exception in a sampled step too."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        while self._open_contexts:
            self._open_contexts.pop().__exit__(None, None, None)
        for stats in self.layers.values():
            stats.marks.clear()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._cleanup()
        self._sampled = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._cleanup()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._cleanup()
        if not self._sampled:
            return
        self._sampled = False
        clock = self._clock
        step_ms = clock.ms(self._step_start, clock.mark())
        overhead = 0.0
        metrics: dict[str, float] = {}
        memory = 0
        for stats in self.layers.values():
            backward = sum(clock.ms(a, b) for marks in stats.node_marks for a, b in marks)
            stats.backward_ms.append(backward)
            forward = stats.forward_ms[-1] if stats.forward_ms else 0.0
            overhead += forward + backward
            memory += stats.saved_bytes + stats.buffer_bytes
            metrics[f"whiten/{stats.name}/forward_ms"] = forward
            metrics[f"whiten/{stats.name}/backward_ms"] = backward
            metrics[f"whiten/{stats.name}/saved_mb"] = stats.saved_bytes / 2**20
        self.step_ms.append(step_ms)
        self.overhead_pct.append(100.0 * overhead / step_ms if step_ms > 0 else 0.0)
        metrics.update({
            "whiten/step_ms": step_ms,
            "whiten/overhead_ms": overhead,
            "whiten/overhead_pct": self.overhead_pct[-1],
            "whiten/memory_mb": memory / 2**20,
        })  # fmt: skip
        _log(trainer, metrics)

    # -- SND and whiteness -------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = self.snd_every_n_epochs and trainer.current_epoch % self.snd_every_n_epochs == 0
        self._capturing = bool(due) and trainer.is_global_zero
        self._captured_batches = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._capturing:
            return
        self._capturing = False
        metrics: dict[str, float] = {}
        for stats in self.layers.values():
            if not stats.cache:
                continue
            inputs = torch.cat(stats.cache).to(pl_module.device)
            stats.cache.clear()
            if inputs.shape[0] < 3:
                stats.quality_skipped = f"only {inputs.shape[0]} cached samples"
                continue
            quality = self._measure_quality(stats, inputs)
            if quality is None:
                continue
            stats.quality = quality
            metrics.update({f"whiten/{stats.name}/{k}": v for k, v in quality.items()})
        skipped = {s.name: s.quality_skipped for s in self.layers.values() if s.quality_skipped}
        if skipped:
            from lightning.pytorch.utilities import rank_zero_warn

            listed = "; ".join(f"{name}: {why}" for name, why in skipped.items())
            rank_zero_warn(
                f"WhiteningMonitor: epoch {trainer.current_epoch}: SND/whiteness not measured "
                f"for {listed} (training continues)"
            )
        _log(trainer, metrics)

    def _measure_quality(self, stats: _LayerStats, inputs: Tensor) -> dict[str, float] | None:
        """SND and whiteness of one layer, or ``None`` (with the reason recorded) when they
        cannot be measured: the monitor must never stop training."""
        stats.quality_skipped = None
        if not bool(torch.isfinite(inputs).all()):
            stats.quality_skipped = "non-finite values in the cached inputs"
            return None
        batch = min(self.snd_batch_size or self._train_batch_size or 32, inputs.shape[0] - 1)
        try:
            value = snd(
                stats.module, inputs, max(batch, 2), self.snd_num_batches, self.snd_probes,
                self.seed,
            )  # fmt: skip
            quality = {"snd": float(value), **whiteness(stats.module, inputs).summary()}
            if isinstance(stats.module, SWBN):
                layer = stats.module
                proxy = nn.BatchNorm1d(layer.num_features, eps=layer.eps, device=inputs.device)
                quality["bn_whiteness"] = float(
                    whiteness(proxy, inputs, group_size=layer.group_size).error.mean()
                )
                quality["w_distance"] = swbn_distance(layer, stats.whitening_start)
        except (RuntimeError, ValueError) as err:  # e.g. torch.linalg.LinAlgError
            stats.quality_skipped = f"{type(err).__name__}: {err}".splitlines()[0][:120]
            return None
        return quality

    # -- summary -----------------------------------------------------------------------------
    def summary_rows(self) -> list[dict[str, Any]]:
        rows = []
        total_step = sum(self.step_ms) / len(self.step_ms) if self.step_ms else 0.0
        for stats in self.layers.values():
            m = stats.module
            fwd = (
                sum(stats.forward_ms) / len(stats.forward_ms) if stats.forward_ms else float("nan")
            )
            bwd = (
                sum(stats.backward_ms) / len(stats.backward_ms)
                if stats.backward_ms
                else float("nan")
            )
            rows.append({
                "layer": stats.name,
                "type": type(m).__name__,
                "group_size": getattr(m, "group_size", None),
                "iterations": getattr(m, "iterations", None) if isinstance(m, IterNorm) else None,
                "snd": stats.quality.get("snd"),
                "whiteness": stats.quality.get("whiteness"),
                "bn_whiteness": stats.quality.get("bn_whiteness"),
                "w_distance": (
                    swbn_distance(m, stats.whitening_start) if isinstance(m, SWBN) else None
                ),
                "forward_ms": fwd,
                "backward_ms": bwd,
                "share_pct": 100.0 * (fwd + bwd) / total_step if total_step else float("nan"),
            })  # fmt: skip
        return rows

    def empty_columns(self) -> list[str]:
        """Why columns of the summary are empty, if they are (for short runs, mostly)."""
        reasons = []
        if not self.step_ms:
            if not self.every_n_steps:
                why = "timing is off (every_n_steps=0)"
            else:
                why = (
                    f"no training step was sampled ({self._batch_counter} ran; the 2nd and then "
                    f"every {self.every_n_steps}th are)"
                )
            reasons.append(f"fwd/bwd ms, share: {why}")
        if not any(s.quality for s in self.layers.values()):
            if not self.snd_every_n_epochs:
                why = "SND is off (snd_every_n_epochs=0)"
            else:
                skipped = [s.quality_skipped for s in self.layers.values() if s.quality_skipped]
                why = skipped[0] if skipped else "no training epoch ended"
            reasons.append(f"SND, whiteness: {why}")
        else:
            for s in self.layers.values():
                if s.quality_skipped:
                    reasons.append(f"SND of {s.name}: {s.quality_skipped}")
        return reasons

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._cleanup()
        if trainer.is_global_zero:
            self._warn_if_swbn_is_batchnorm()
        if not (self.summary and trainer.is_global_zero and self.layers):
            return
        from rich.table import Table

        from ..surgery.report import render_table

        def fmt(value: Any, spec: str) -> str:
            return "-" if value is None or value != value else format(value, spec)

        mean_pct = sum(self.overhead_pct) / len(self.overhead_pct) if self.overhead_pct else None
        title = "lightning-whiten monitor"
        if mean_pct is not None:
            title += f": whitening takes {mean_pct:.1f}% of a training step ({len(self.step_ms)} sampled)"
        table = Table(title=title, title_justify="left")
        empty = self.empty_columns()
        if empty:
            table.caption = "\n".join(f"- {reason}" for reason in empty)
            table.caption_justify = "left"
        for column in (
            "layer",
            "type",
            "group",
            "T",
            "SND",
            "whiteness",
            "BN whiteness",
            "|W-W0|",
            "fwd ms",
            "bwd ms",
            "share %",
        ):
            table.add_column(column, justify="left" if column in ("layer", "type") else "right")
        for row in self.summary_rows():
            table.add_row(
                row["layer"], row["type"], fmt(row["group_size"], "d"), fmt(row["iterations"], "d"),
                fmt(row["snd"], ".3f"), fmt(row["whiteness"], ".3f"),
                fmt(row["bn_whiteness"], ".3f"), fmt(row["w_distance"], ".4f"),
                fmt(row["forward_ms"], ".2f"),
                fmt(row["backward_ms"], ".2f"), fmt(row["share_pct"], ".1f"),
            )  # fmt: skip
        print(render_table(table), end="")

    def _warn_if_swbn_is_batchnorm(self) -> None:
        """Warn once when every monitored SWBN layer ended within ``SWBN_STILL_BN`` of its start."""
        swbn = {s.name: s for s in self.layers.values() if isinstance(s.module, SWBN)}
        if not swbn or self._warned_swbn:
            return
        moved = {name: swbn_distance(s.module, s.whitening_start) for name, s in swbn.items()}
        if max(moved.values()) >= SWBN_STILL_BN:
            return
        self._warned_swbn = True
        rates = sorted({float(s.module.whitening_rate) for s in swbn.values()})
        whiter = [
            f"{name} {s.quality['whiteness']:.3f} vs {s.quality['bn_whiteness']:.3f}"
            for name, s in swbn.items()
            if "bn_whiteness" in s.quality
        ][:3]
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"WhiteningMonitor: the run ended with SWBN indistinguishable from BatchNorm: the "
            f"whitening matrices of its {len(swbn)} SWBN layer(s) moved at most "
            f"{max(moved.values()):.2%} from their start (||W - W0||_F / sqrt(d))"
            + (f"; output whiteness SWBN vs BN: {', '.join(whiter)}" if whiter else "")
            + f". whitening_rate {', '.join(f'{r:g}' for r in rates)} is too small for this "
            "run's length (W moves about whitening_rate x steps): use the default "
            "whitening_rate='auto', or a larger rate (below 1 / group_size)."
        )


def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    # Straight to the loggers at the current step: these values exist only on sampled steps or
    # epochs, and self.log would repeat them at every logging step.
    if not metrics or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
