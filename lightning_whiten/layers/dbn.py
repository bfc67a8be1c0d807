"""DBN: group-wise ZCA whitening by eigendecomposition (Huang et al., CVPR 2018)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from ..distributed import SyncMode
from .base import WhiteningNorm, _lerp_

__all__ = ["DBN"]


class DBN(WhiteningNorm):
    r"""Decorrelated Batch Normalization: ZCA whitening per channel group.

    Per group of ``group_size`` channels, in training::

        X_c   = X - mean(X)
        Sigma = X_c X_c^T / m + eps I = U diag(lambda) U^T
        Y     = U diag(lambda)^-1/2 U^T X_c,   then  weight * Y + bias (per channel)

    The output covariance is the identity (up to ``eps``). The backward pass uses the divided
    differences of ``lambda^-1/2`` in closed form, so it stays finite and exact when eigenvalues
    repeat (autograd through ``eigh`` would divide by ``lambda_i - lambda_j``). The running
    whitening matrix is averaged with ``momentum`` and eval applies
    ``running_whitening (x - running_mean)``.

    Args:
        num_features: channels ``C``.
        group_size: channels per group (default 16, the paper's).
        eps, momentum, affine, track_running_stats, sync, check_finite: as in :class:`IterNorm`.

    Shape:
        Input ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``; output the same
        shape, dtype and memory format.

    Note:
        ``torch.linalg.eigh`` synchronizes with the host on CUDA; prefer :class:`IterNorm` or
        :class:`SWBN` where that matters.
    """

    default_group_size = 16

    def __init__(
        self,
        num_features: int,
        group_size: int = 16,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        sync: SyncMode = "batch",
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features,
            group_size,
            eps,
            momentum,
            affine,
            track_running_stats,
            sync,
            check_finite,
            device,
            dtype,
        )
        if track_running_stats:
            factory: dict[str, Any] = {"device": device, "dtype": self.running_mean.dtype}
            self.register_buffer("running_whitening", self._identity_matrices(**factory))
        else:
            self.register_buffer("running_whitening", None)

    def _matrix_map(self) -> F.MatrixMap:
        return F.ZCAMap(self.eps, self.group_mask)

    def _inference_map(self) -> tuple[Tensor, Tensor]:
        return self.running_whitening, self.running_mean

    def _update_state(self, moments, matrix, factor, finite) -> None:
        if self.track_running_stats:
            _lerp_(self.running_whitening, matrix, factor, finite)

    def _set_running_stats(self, mean: Tensor, var: Tensor, eps: float) -> None:
        self.running_mean.copy_(mean)
        self.running_whitening.copy_(self._diag_matrices((var.to(torch.float64) + eps).rsqrt()))
