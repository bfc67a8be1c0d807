"""Streaming normalization statistics (Liao, Kawaguchi & Poggio 2016, arXiv 1610.06160).

Streaming normalization collects the statistics that normalize a batch online, from every
training batch seen so far, so it works at batch size 1 and shares one set of statistics across
the time steps of a recurrent network. Each layer keeps, per channel:

* short-term statistics ``S``: the plain average of the per-call statistics since the last
  weight update (a *window*: every forward call between two weight updates -- one call in a
  feed-forward net, one per time step in a recurrent one);
* long-term statistics ``L``: a running average of ``S``, updated when a window closes
  (``L <- (1 - momentum) L + momentum S``; ``momentum = 1 - kappa`` in the paper's notation;
  ``None``: cumulative average of the windows, as BatchNorm's ``momentum=None``);

and normalizes with the mix ``s_hat = alpha L + (1 - alpha) S`` (the paper's ``alpha_1 = alpha``,
``alpha_2 = 1 - alpha``). The gradients of the loss with respect to the mixed statistics are
*streamed* the same way instead of being back-propagated through the history: the gradient
passed to the current call's own statistic is ``beta_long G_L + beta_short G_S + beta_current g``,
where ``g`` is the current call's gradient with respect to ``s_hat``, ``G_S`` the average of
those gradients over the window so far (the current one included) and ``G_L`` their running
average over windows (``grad_momentum``).

This module holds the per-channel bookkeeping, as a :class:`StatisticsRule` for
:func:`lightning_whiten.functional.lp_normalize`, which applies it to the batch mean ``m`` and
the p-th absolute moment ``d = mean |x - c|^p`` around the mixed center ``c``. Choices the paper
leaves open, or where this code differs from the authors' (later, PyTorch) implementation
``liaoq/StreamingNorm``, are listed in :class:`lightning_whiten.StreamingNorm`.

Everything stays on the statistics' device: finite checks are ``torch.where`` guards (a
non-finite statistic or gradient never enters an average), with no host synchronization.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .lp import StatisticsRule

__all__ = ["StreamingState", "StreamingStatistics", "close_window"]


class StreamingState(NamedTuple):
    """The per-channel state of one streaming layer (its buffers, updated in place).

    Attributes:
        running_mean, running_moment: long-term statistics ``L`` (mean and p-th moment), the
            eval statistics.
        short_mean, short_moment: short-term averages ``S`` over the open window.
        short_count: 0-dim float, calls averaged into ``S`` (finite ones).
        grad_running_mean, grad_running_moment: long-term gradients ``G_L``.
        grad_short_mean, grad_short_moment: short-term gradient averages ``G_S``.
        grad_short_count: 0-dim float, backward calls averaged into ``G_S``.
        grad_windows: 0-dim long, windows folded into ``G_L`` (0: ``G_L`` not set yet).
        num_batches_tracked: 0-dim long, windows folded into ``L``.
    """

    running_mean: Tensor
    running_moment: Tensor
    short_mean: Tensor
    short_moment: Tensor
    short_count: Tensor
    grad_running_mean: Tensor
    grad_running_moment: Tensor
    grad_short_mean: Tensor
    grad_short_moment: Tensor
    grad_short_count: Tensor
    grad_windows: Tensor
    num_batches_tracked: Tensor


class StreamingStatistics(StatisticsRule):
    """The streaming rule for one forward call of a layer (see the module docstring).

    Forward (``center`` then ``moment``): the call's batch mean ``m`` and moment ``d`` join the
    short-term averages (only when both are finite), and the mixes
    ``alpha L + (1 - alpha) S`` are returned. Backward (``moment_grad`` then ``center_grad``):
    the gradients with respect to the mixed statistics join the short-term gradient averages
    (only when both are finite) and ``beta_long G_L + beta_short G_S + beta_current g`` is
    returned; before the first window has closed ``G_L`` is taken as ``G_S`` (as in the
    authors' code).

    Args:
        state: the layer's :class:`StreamingState`.
        alpha: weight of the long-term statistics in the forward mix.
        beta_long, beta_short, beta_current: weights of the long-term, short-term and current
            gradients in the streamed gradient.
        on_backward: called after ``center_grad`` (the end of the call's backward).
    """

    identity = False

    def __init__(
        self,
        state: StreamingState,
        alpha: float,
        beta_long: float,
        beta_short: float,
        beta_current: float,
        on_backward: Callable[[], None] | None = None,
    ) -> None:
        self.state = state
        self.alpha = alpha
        self.betas = (beta_long, beta_short, beta_current)
        self.on_backward = on_backward
        #: 0-dim bool: whether this call's statistics were finite (set by ``moment``).
        self.finite: Tensor | None = None
        self._pending: tuple[Tensor, ...] = ()

    # The new short-term averages are formed first and written back only once both statistics
    # (or both gradients) are known to be finite: one guard per call, no host sync.
    def center(self, mean: Tensor) -> Tensor:
        s = self.state
        short = s.short_mean + (mean - s.short_mean) / (s.short_count + 1)
        self._pending = (mean, short)
        return torch.lerp(short, s.running_mean.to(short.dtype), self.alpha).to(mean.dtype)

    def moment(self, moment: Tensor) -> Tensor:
        s = self.state
        mean, short_mean = self._pending
        short_moment = s.short_moment + (moment - s.short_moment) / (s.short_count + 1)
        finite = torch.isfinite(mean + moment).all()
        s.short_mean.copy_(torch.where(finite, short_mean, s.short_mean))
        s.short_moment.copy_(torch.where(finite, short_moment, s.short_moment))
        s.short_count.add_(finite)
        self.finite = finite
        long = s.running_moment.to(short_moment.dtype)
        return torch.lerp(short_moment, long, self.alpha).to(moment.dtype)

    def _streamed(self, long: Tensor, short: Tensor, grad: Tensor, has_long: Tensor) -> Tensor:
        b_long, b_short, b_current = self.betas
        # Before the first window closes there is no long-term gradient: use the short-term one.
        mixed = torch.where(has_long, long, short).mul_(b_long).add_(short, alpha=b_short)
        return mixed.to(grad.dtype).add_(grad, alpha=b_current)

    def moment_grad(self, grad: Tensor) -> Tensor:
        s = self.state
        short = s.grad_short_moment + (grad - s.grad_short_moment) / (s.grad_short_count + 1)
        has_long = s.grad_windows > 0
        self._pending = (grad, short, has_long)
        return self._streamed(s.grad_running_moment, short, grad, has_long)

    def center_grad(self, grad: Tensor) -> Tensor:
        s = self.state
        grad_moment, short_moment, has_long = self._pending
        short = s.grad_short_mean + (grad - s.grad_short_mean) / (s.grad_short_count + 1)
        finite = torch.isfinite(grad + grad_moment).all()
        s.grad_short_mean.copy_(torch.where(finite, short, s.grad_short_mean))
        s.grad_short_moment.copy_(torch.where(finite, short_moment, s.grad_short_moment))
        s.grad_short_count.add_(finite)
        out = self._streamed(s.grad_running_mean, short, grad, has_long)
        self._pending = ()
        if self.on_backward is not None:
            self.on_backward()
        return out


@torch.no_grad()
def close_window(state: StreamingState, momentum: float | None, grad_momentum: float) -> None:
    """End the open window: fold the short-term averages into the long-term ones and clear them.

    ``L <- lerp(L, S, momentum)`` (``momentum=None``: ``1 / windows``, a cumulative average) if
    the window had a finite call; ``G_L <- lerp(G_L, G_S, grad_momentum)`` (``G_L <- G_S`` for
    the first window with gradients) if it had a finite backward call. No host synchronization:
    an empty window interpolates with weight 0.
    """
    s = state
    dtype = s.running_mean.dtype
    has = s.short_count > 0
    s.num_batches_tracked.add_(has)
    if momentum is None:
        weight = has / s.num_batches_tracked.clamp_min(1).to(dtype)
    else:
        weight = has.to(dtype) * float(momentum)
    s.running_mean.lerp_(s.short_mean, weight)
    s.running_moment.lerp_(s.short_moment, weight)
    has_grad = s.grad_short_count > 0
    first = s.grad_windows == 0
    gm = float(grad_momentum)
    gweight = has_grad.to(dtype) * (first.to(dtype) * (1.0 - gm) + gm)  # 1 for the first window
    s.grad_running_mean.lerp_(s.grad_short_mean, gweight)
    s.grad_running_moment.lerp_(s.grad_short_moment, gweight)
    s.grad_windows.add_(has_grad)
    for t in (s.short_mean, s.short_moment, s.short_count, s.grad_short_mean,
              s.grad_short_moment, s.grad_short_count):  # fmt: skip
        t.zero_()
