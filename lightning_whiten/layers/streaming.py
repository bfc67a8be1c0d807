"""Streaming normalization (Liao, Kawaguchi & Poggio 2016): online statistics for batch size 1,
small batches and recurrent networks."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .. import functional
from ..functional.streaming import StreamingState, StreamingStatistics
from ..registry import NormFamily, register_family
from .lpnorm import PerChannelNorm
from .norm_act import NormActMixin

__all__ = ["StreamingNorm", "close_windows"]

WindowMode = Literal["auto", "manual"]
_WINDOW_MODES = ("auto", "manual")


class StreamingNorm(PerChannelNorm):
    """Streaming normalization with an Lp normalizer (Liao, Kawaguchi & Poggio 2016).

    Normalizes with statistics collected online from every training sample seen so far, so it
    trains at batch size 1, in small batches, and inside a recurrence (the same layer applied
    at every time step shares one set of statistics). Per channel, for a forward call with
    batch mean ``m`` (over the batch and spatial positions)::

        S_m <- average of m over the window's calls         (short-term: since the last update)
        c   = alpha L_m + (1 - alpha) S_m                   (L: long-term running statistics)
        d   = mean |x - c|^p
        S_d <- average of d over the window's calls
        M   = alpha L_d + (1 - alpha) S_d
        y   = weight * (x - c) (M + eps)^(-1/p) + bias

    When a window closes (a weight update, see below), ``L <- (1 - momentum) L + momentum S``
    and ``S`` is cleared. The gradients with respect to ``c`` and ``M`` are streamed the same
    way (``grad_momentum``) and the gradient passed to the call's own ``m`` and ``d`` is
    ``beta_long G_L + beta_short G_S + beta_current g``
    (:mod:`lightning_whiten.functional.streaming`). Eval uses the long-term statistics only:
    ``y = weight * (x - running_mean) (running_moment + eps)^(-1/p) + bias``, a fixed
    per-channel affine map, like BatchNorm's.

    Windows (how a weight update is told apart from a time step), ``window="auto"``: a window
    is the set of forward calls whose backward has not run yet. A training forward call joins
    the open window; when the backward of every call in the window has run, the window
    closes. The plain online loop (forward, backward, ``optimizer.step()`` per sample) and a
    recurrence (T forward calls, one backward through all of them, a step) therefore need no
    extra call. A training forward whose output does not require grad (``torch.no_grad()``)
    closes its window at once when nothing else is pending; a window whose calls never all get
    a backward (part of a graph discarded) is closed by the next training forward that follows
    a backward. With gradient accumulation each micro-batch is its own window. For the paper's
    exact "weight update" boundary, use ``window="manual"`` and call :meth:`close_window` (or
    :func:`close_windows` on a model) after each optimizer step, e.g.
    ``optimizer.register_step_post_hook(lambda *_: close_windows(model))``.

    Choices the paper leaves open (or where this differs from the authors' PyTorch code,
    ``liaoq/StreamingNorm``, which streams the batch mean and standard deviation):

    * The statistics are the mean and the p-th absolute moment ``d`` *around the mixed center*
      ``c`` (not around the call's own mean): at batch size 1 with ``(1, C)`` inputs the call's
      own dispersion is 0, while ``|x - c|^p`` measures the spread across samples; the moments
      (not their p-th roots) are averaged. With ``alpha = 0``, ``beta = (0, 0, 1)`` (or
      ``(0, 1, 0)``) and one call per window the layer is exactly :class:`LpNorm` in training.
    * Short-term averages weight every call of a window equally (the authors' code too).
    * The long-term statistics start at ``running_mean = 0``, ``running_moment = 1`` (BatchNorm's
      initial running buffers) and are mixed in from the first call, as a prior that fades with
      ``momentum``. The authors' code uses the short-term statistics alone until the first
      update. (Their Bessel-corrected standard deviation of one ``(1, C)`` sample is NaN, so
      their layer outputs NaN at every step at batch size 1.) ``from_batchnorm`` starts from
      the BN's statistics instead. Every difference from the authors' code is listed in the
      StreamingNorm docs; ``tests/test_streaming_reference.py`` pins the agreement.
    * Streamed gradients: the short-term average includes the current call; before the first
      window closes the long-term gradient is taken as the short-term one (both as in the
      authors' code). The gradient is that of the p-th moment ``M``, not of its root.
    * Defaults: ``alpha = 0.5``, ``beta = (0.5, 0.5, 0)``, ``grad_momentum = 0.3``
      (``kappa = 0.7``): the authors' feed-forward setting (they recommend ``alpha = 0.7``,
      ``beta = (0.7, 0, 0.3)`` for recurrent and online learning). ``momentum = 0.1``
      (BatchNorm's) rather than their 0.3: eval uses the long-term statistics, and averaging
      only about three windows leaves them to the last few samples at batch size 1 (ResNet-20
      on Digits at batch size 1, 800 steps, p = 2: 66% at 0.3, 83% at 0.1; a slow ``grad_momentum``
      such as 0.05, on the other hand, diverged). ``p = 1`` (the paper's recommended L1
      normalizer; the authors' code uses the standard deviation, ``p = 2``).

    Args:
        num_features: channels ``C`` (dim 1 of the input).
        p: order of the moment (``>= 1``; 1: mean absolute deviation, 2: standard deviation).
        eps: added to the moment; must be positive.
        momentum: running-average factor of the long-term statistics per window (``None``:
            cumulative average of all windows).
        grad_momentum: the same for the long-term gradients.
        alpha: weight of the long-term statistics in the normalization (``1 - alpha``: short
            term).
        beta_long, beta_short, beta_current: weights of the long-term, short-term and current
            gradients of the statistics.
        window: ``"auto"`` (windows follow the backward passes) or ``"manual"``
            (:meth:`close_window`).
        affine: learn per-channel ``weight`` and ``bias``.
        track_running_stats: must be True (the long-term statistics are part of the method).
        check_finite: warn (naming the layer) when a training call is non-finite on CPU.
        device, dtype: of the parameters (statistics buffers stay at least float32).

    Works in training at any batch size, including ``(1, C)``. Not for use inside activation
    checkpointing (a recomputed forward would count twice) or under ``torch.compile`` with
    ``fullgraph=True`` (its state changes in the backward pass: the layer runs eagerly, a graph
    break). No cross-process synchronization: each process streams its own statistics. With a
    dynamic AMP loss scale, streamed gradients from before a change of scale are off by the
    ratio of the scales until the running average forgets them.
    """

    schedulable: ClassVar[tuple[str, ...]] = (
        "eps",
        "momentum",
        "grad_momentum",
        "alpha",
        "beta_long",
        "beta_short",
        "beta_current",
    )
    uses_batch_statistics: ClassVar[bool] = False

    def __init__(
        self,
        num_features: int,
        *,
        p: float = 1.0,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        grad_momentum: float = 0.3,
        alpha: float = 0.5,
        beta_long: float = 0.5,
        beta_short: float = 0.5,
        beta_current: float = 0.0,
        window: WindowMode = "auto",
        affine: bool = True,
        track_running_stats: bool = True,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if track_running_stats is not True:
            raise ValueError(
                "StreamingNorm: track_running_stats must be True: the long-term running "
                "statistics are part of the method (they normalize training batches too)"
            )
        if window not in _WINDOW_MODES:
            raise ValueError(
                f"StreamingNorm: window must be one of {_WINDOW_MODES}, got {window!r}"
            )
        super().__init__(
            num_features,
            p=p,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=True,
            check_finite=check_finite,
            device=device,
            dtype=dtype,
        )
        self.grad_momentum = grad_momentum
        self.alpha = alpha
        self.beta_long = beta_long
        self.beta_short = beta_short
        self.beta_current = beta_current
        self.window = window
        factory: dict[str, Any] = {"device": device, "dtype": self.running_mean.dtype}
        for name in ("short_mean", "short_moment", "grad_running_mean", "grad_running_moment",
                     "grad_short_mean", "grad_short_moment"):  # fmt: skip
            self.register_buffer(name, torch.zeros(num_features, **factory))
        self.register_buffer("short_count", torch.zeros((), **factory))
        self.register_buffer("grad_short_count", torch.zeros((), **factory))
        self.register_buffer("grad_windows", torch.tensor(0, dtype=torch.long, device=device))
        # Window bookkeeping on the host (not saved: a window never spans a checkpoint save
        # in the usual loops).
        self._window = _Window()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("grad_momentum", "alpha", "beta_long", "beta_short", "beta_current"):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value <= 1
            ):
                raise ValueError(
                    f"{type(self).__name__}: {name} must be a number in [0, 1], got {value!r}"
                )
            value = float(value)
        elif name == "window" and value not in _WINDOW_MODES:
            raise ValueError(
                f"{type(self).__name__}: window must be one of {_WINDOW_MODES}, got {value!r}"
            )
        super().__setattr__(name, value)

    def _extra_repr_options(self) -> list[str]:
        return [
            f"grad_momentum={self.grad_momentum}",
            f"alpha={self.alpha}",
            f"beta=({self.beta_long}, {self.beta_short}, {self.beta_current})",
            f"window={self.window!r}",
        ]

    @property
    def state(self) -> StreamingState:
        """The streaming state (views of this layer's buffers)."""
        return StreamingState(
            self.running_mean, self.running_moment, self.short_mean, self.short_moment,
            self.short_count, self.grad_running_mean, self.grad_running_moment,
            self.grad_short_mean, self.grad_short_moment, self.grad_short_count,
            self.grad_windows, self.num_batches_tracked,
        )  # fmt: skip

    def close_window(self) -> None:
        """End the open window (a weight update): fold the short-term statistics and gradients
        into the long-term ones and clear them. Automatic with ``window="auto"``."""
        functional.close_window(self.state, self.momentum, self.grad_momentum)
        self._window.pending = 0
        self._window.calls = 0

    def _after_backward(self) -> None:
        window = self._window
        window.pending -= 1
        window.backward_seen = True
        if self.window == "auto" and window.pending <= 0:
            self.close_window()

    @torch.compiler.disable
    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x, batch_stats=self.training)
        cdtype = self._compute_dtype(x)
        with functional.full_precision(x):
            xf = x.to(cdtype)
            weight = self.weight.to(cdtype) if self.weight is not None else None
            bias = self.bias.to(cdtype) if self.bias is not None else None
            if not self.training:
                return self._eval_map(xf, weight, bias).to(x.dtype)
            auto = self.window == "auto"
            window = self._window
            if auto and window.backward_seen and window.calls:
                self.close_window()  # some calls of the last window never got a backward
            window.backward_seen = False
            rule = StreamingStatistics(
                self.state,
                self.alpha,
                self.beta_long,
                self.beta_short,
                self.beta_current,
                on_backward=self._after_backward,
            )
            y = functional.lp_normalize(xf, self.p, self.eps, weight, bias, rule).output
        window.calls += 1
        with torch.no_grad():
            self.nonfinite_batches.add_(~rule.finite)
        self._warn_nonfinite(rule.finite)
        if y.requires_grad:
            window.pending += 1
        elif auto and window.pending == 0:
            self.close_window()  # no backward will come for this call
        return y.to(x.dtype)


class _Window:
    """The open window of a layer: calls, calls awaiting their backward, a backward seen."""

    __slots__ = ("backward_seen", "calls", "pending")

    def __init__(self) -> None:
        self.pending = 0  # calls of the open window whose backward has not run
        self.calls = 0  # calls in the open window
        self.backward_seen = False  # a backward ran since the last training forward


def close_windows(module: nn.Module) -> int:
    """Close the open window of every :class:`StreamingNorm` in ``module`` (a weight update).

    For ``window="manual"``: call it after each optimizer step, e.g.
    ``optimizer.register_step_post_hook(lambda *_: close_windows(model))``. Returns the number
    of layers.
    """
    layers = [m for m in module.modules() if isinstance(m, StreamingNorm)]
    for layer in layers:
        layer.close_window()
    return len(layers)


class StreamingNormAct(NormActMixin, StreamingNorm):
    """:class:`StreamingNorm` followed by ``drop`` and ``act`` (replaces timm's
    ``BatchNormAct2d``)."""


register_family(
    NormFamily(
        "streaming",
        StreamingNorm,
        act_layer=StreamingNormAct,
        group_option=None,
        aliases=("streamingnorm",),
        description=__doc__,
    )
)
