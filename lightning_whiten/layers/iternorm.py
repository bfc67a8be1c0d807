"""IterNorm: group-wise whitening by Newton iterations (Huang et al., CVPR 2019)."""

from __future__ import annotations

from typing import Any

import torch

from ..functional import IterNormMap, IterNormMethod, MatrixMap
from ..registry import NormFamily, register_family
from .base import RunningWhiteningNorm
from .norm_act import NormActMixin

__all__ = ["IterNorm", "IterNormAct"]


class IterNorm(RunningWhiteningNorm):
    r"""Iterative Normalization: whitening without eigendecomposition.

    Per group of ``group_size`` channels, in training::

        X_c     = X - mean(X)
        Sigma   = X_c X_c^T / m + eps I
        Sigma_N = Sigma / tr(Sigma)
        P_0 = I,  P_k = (3 P_{k-1} - P_{k-1}^3 Sigma_N) / 2,   k = 1..T
        Y = P_T / sqrt(tr(Sigma)) X_c,   then  weight * Y + bias (per channel)

    Gradients are the exact gradients of the ``T`` truncated steps. With the paper's ``T = 5``
    the output is deliberately not fully white (for an isotropic input its variance is about
    0.97 at ``d = 16`` and 0.59 at ``d = 64``); ``iterations`` controls the degree of whitening.
    The running whitening matrix is averaged with ``momentum``:
    ``running_whitening <- (1 - momentum) running_whitening + momentum W``; eval applies
    ``running_whitening (x - running_mean)`` with no iterations.

    Args:
        num_features: channels ``C``.
        group_size: channels per group (default 64, the paper's); the last group is smaller when
            it does not divide ``num_features``; clamped to ``num_features``.
        iterations: Newton steps ``T`` (default 5); at least 1.
        method: ``"newton"`` (the paper's iteration, at most 8 steps: in float32 the
            single-variable form diverges from 9 steps on rank-deficient input) or
            ``"coupled"`` (coupled Newton-Schulz: equal in exact arithmetic, stable for any
            ``T``). A batch whose iteration diverges anyway (``W Sigma W^T`` far above its
            bound) is kept out of the running statistics and counted in ``diverged_batches``.
        eps: added to the covariance diagonal.
        momentum: running-average factor, or ``None`` for a cumulative average.
        affine: learn per-channel ``weight`` and ``bias``.
        track_running_stats: keep running mean and whitening matrix for eval; without them eval
            uses batch statistics.
        sync: ``"batch"`` reduces statistics across processes under ``torch.distributed``
            (no-op in a single process); ``"none"`` keeps them per process.
        check_finite: warn when a training batch is non-finite (its statistics are dropped
            and counted in ``nonfinite_batches`` either way); at once on CPU, once per epoch
            through :class:`~lightning_whiten.WhiteningCallback` on accelerators.
        device, dtype: of the parameters and buffers (running buffers stay at least float32).

    ``eps``, ``momentum``, ``affine``, ``track_running_stats``, ``sync``, ``check_finite``,
    ``device`` and ``dtype`` are keyword-only (passed on to :class:`WhiteningNorm`).

    Shape:
        Input ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``; output the same
        shape, dtype and memory format.
    """

    schedulable = ("eps", "momentum", "iterations")
    #: The most iterations of ``method="newton"``: beyond, float32 round-off grows with every
    #: step on ill-conditioned or rank-deficient input (measured: 9 steps diverge there).
    max_newton_iterations = 8

    def __init__(
        self,
        num_features: int,
        group_size: int | None = 64,
        iterations: int = 5,
        method: IterNormMethod = "newton",
        **kwargs: Any,
    ) -> None:
        if method not in ("newton", "coupled"):
            raise ValueError(f"IterNorm: method must be 'newton' or 'coupled', got {method!r}")
        _check_iterations(iterations, method)
        super().__init__(num_features, group_size=group_size, **kwargs)
        self.method = method
        self.iterations = iterations

    def __setattr__(self, name: str, value: Any) -> None:
        # Schedules change ``iterations`` during training: validate every assignment.
        if name == "iterations":
            _check_iterations(value, self.__dict__.get("method", "newton"))
        super().__setattr__(name, value)

    def _diverged(self, stats, matrix):
        # The exact truncated iteration gives W (cov + eps I) W^T = P^2 Sigma_N with
        # eigenvalues in (0, 1] (P is a polynomial in Sigma_N), so its Frobenius norm is at most
        # sqrt(d). A diverged iterate is finite but far beyond: twice d for the squared norm
        # catches it without a false alarm, on the device (no host synchronization).
        d = matrix.shape[-1]
        sigma = stats.cov + self.eps * torch.eye(d, dtype=matrix.dtype, device=matrix.device)
        m = matrix @ sigma @ matrix.transpose(-1, -2)
        return (m.square().sum((-1, -2)) > 2.0 * d).any()

    def _divergence_hint(self) -> str:
        return (
            f"the Newton iteration (method={self.method!r}, iterations={self.iterations}) "
            "diverged on this batch (W Sigma W^T is far from its bound); use fewer iterations or "
            "method='coupled'"
        )

    def _matrix_map(self) -> MatrixMap:
        return IterNormMap(self.iterations, self.eps, self.method, self.group_mask)

    def _extra_repr_options(self) -> list[str]:
        return [f"iterations={self.iterations}", f"method={self.method!r}"]


def _check_iterations(iterations: Any, method: str) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"IterNorm: iterations must be an integer >= 1, got {iterations!r}")
    limit = IterNorm.max_newton_iterations
    if method == "newton" and iterations > limit:
        raise ValueError(
            f"IterNorm: iterations={iterations} with method='newton' is numerically unstable in "
            f"float32 (the single-variable Newton iteration diverges beyond {limit} steps on "
            "ill-conditioned or rank-deficient input); use method='coupled' (the same iteration "
            f"in exact arithmetic, stable for any number of steps) or iterations <= {limit}"
        )


class IterNormAct(NormActMixin, IterNorm):
    """:class:`IterNorm` followed by ``drop`` and ``act`` (replaces timm's ``BatchNormAct2d``)."""


register_family(NormFamily("iternorm", IterNorm, act_layer=IterNormAct, description=__doc__))
