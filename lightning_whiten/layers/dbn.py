"""DBN: group-wise ZCA whitening by eigendecomposition (Huang et al., CVPR 2018)."""

from __future__ import annotations

import torch

from .. import functional as F
from ..distributed import SyncMode
from .base import RunningWhiteningNorm

__all__ = ["DBN"]


class DBN(RunningWhiteningNorm):
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
        A training batch needs at least ``group_size`` samples per group (``N*H*W`` for images)
        or its covariance is rank-deficient and ZCA amplifies noise by up to ``1/sqrt(eps)``;
        the layer warns once when that happens.

        ``torch.linalg.eigh`` synchronizes with the host on CUDA; prefer :class:`IterNorm` or
        :class:`SWBN` where that matters.
    """

    default_group_size = 16
    _warns_rank_deficient = True  # an exact inverse square root: see WhiteningNorm

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
        self._register_running_whitening(device)

    def _matrix_map(self) -> F.MatrixMap:
        return F.ZCAMap(self.eps, self.group_mask)
