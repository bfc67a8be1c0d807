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


def _push_(average: Tensor, value: Tensor, count: Tensor, finite: Tensor) -> None:
    """``average <- average + (value - average) / (count + 1)`` where ``finite`` (no sync)."""
    step = (value.to(average.dtype) - average) / (count + 1).to(average.dtype)
    average.copy_(torch.where(finite, average + step, average))


class StreamingStatistics(StatisticsRule):
    """The streaming rule for one forward call of a layer (see the module docstring).

    Forward (``center`` then ``moment``): the call's batch mean ``m`` and moment ``d`` join the
    short-term averages (only when both are finite), and the mixes
    ``alpha L + (1 - alpha) S`` are returned. Backward (``moment_grad`` then ``center_grad``):
    the gradients with respect to the mixed statistics join the short-term gradient averages
    (only when finite) and ``beta_long G_L + beta_short G_S + beta_current g`` is returned; before
    the first window has closed ``G_L`` is taken as ``G_S`` (as in the authors' code).

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
        self._mean_finite: Tensor | None = None
        self._previous: Tensor | None = None
        self._grad_finite: Tensor | None = None

    def _mix(self, long: Tensor, short: Tensor, like: Tensor) -> Tensor:
        return (self.alpha * long + (1.0 - self.alpha) * short).to(like.dtype)

    def center(self, mean: Tensor) -> Tensor:
        s = self.state
        self._mean_finite = torch.isfinite(mean).all()
        self._previous = s.short_mean.clone()
        _push_(s.short_mean, mean, s.short_count, self._mean_finite)
        return self._mix(s.running_mean, s.short_mean, mean)

    def moment(self, moment: Tensor) -> Tensor:
        s = self.state
        finite = self._mean_finite & torch.isfinite(moment).all()
        _push_(s.short_moment, moment, s.short_count, finite)
        # The mean was pushed on its own finiteness: take it back if the moment was not finite.
        s.short_mean.copy_(torch.where(finite, s.short_mean, self._previous))
        s.short_count.add_(finite.to(s.short_count.dtype))
        self.finite = finite
        return self._mix(s.running_moment, s.short_moment, moment)

    def _streamed(self, long: Tensor, short: Tensor, grad: Tensor) -> Tensor:
        b_long, b_short, b_current = self.betas
        # Before the first window closes there is no long-term gradient: use the short-term one.
        long = torch.where(self.state.grad_windows > 0, long, short)
        return (b_long * long + b_short * short).to(grad.dtype) + b_current * grad

    def moment_grad(self, grad: Tensor) -> Tensor:
        s = self.state
        self._grad_finite = torch.isfinite(grad).all()
        self._previous = s.grad_short_moment.clone()
        _push_(s.grad_short_moment, grad, s.grad_short_count, self._grad_finite)
        return self._streamed(s.grad_running_moment, s.grad_short_moment, grad)

    def center_grad(self, grad: Tensor) -> Tensor:
        s = self.state
        finite = self._grad_finite & torch.isfinite(grad).all()
        _push_(s.grad_short_mean, grad, s.grad_short_count, finite)
        s.grad_short_moment.copy_(torch.where(finite, s.grad_short_moment, self._previous))
        s.grad_short_count.add_(finite.to(s.grad_short_count.dtype))
        out = self._streamed(s.grad_running_mean, s.grad_short_mean, grad)
        if self.on_backward is not None:
            self.on_backward()
        return out


@torch.no_grad()
def close_window(state: StreamingState, momentum: float | None, grad_momentum: float) -> None:
    """End the open window: fold the short-term averages into the long-term ones and clear them.

    ``L <- lerp(L, S, momentum)`` (``momentum=None``: ``1 / windows``, a cumulative average) if
    the window had a finite call; ``G_L <- lerp(G_L, G_S, grad_momentum)`` (``G_L <- G_S`` for
    the first window with gradients) if it had a finite backward call. No host synchronization.
    """
    s = state
    has = s.short_count > 0
    s.num_batches_tracked.add_(has.to(s.num_batches_tracked.dtype))
    dtype = s.running_mean.dtype
    if momentum is None:
        factor = 1.0 / s.num_batches_tracked.clamp_min(1).to(dtype)
    else:
        factor = torch.full((), float(momentum), dtype=dtype, device=s.running_mean.device)
    for long, short in ((s.running_mean, s.short_mean), (s.running_moment, s.short_moment)):
        long.copy_(torch.where(has, torch.lerp(long, short, factor), long))
        short.zero_()
    s.short_count.zero_()

    has_grad = s.grad_short_count > 0
    gfactor = torch.where(
        s.grad_windows > 0,
        torch.full((), float(grad_momentum), dtype=dtype, device=s.running_mean.device),
        torch.ones((), dtype=dtype, device=s.running_mean.device),
    )
    pairs = (
        (s.grad_running_mean, s.grad_short_mean),
        (s.grad_running_moment, s.grad_short_moment),
    )
    for long, short in pairs:
        long.copy_(torch.where(has_grad, torch.lerp(long, short, gfactor), long))
        short.zero_()
    s.grad_windows.add_(has_grad.to(s.grad_windows.dtype))
    s.grad_short_count.zero_()
