"""Tensor math of the normalization layers (plain PyTorch, no module state).

Group-wise batch whitening (IterNorm, DBN, SWBN):

* :func:`whiten`: the fused training op ``y = weight * (W (x - mean)) + bias`` with
  ``W = fn(cov)``, one autograd node with a hand-written backward;
* the covariance-to-whitening-matrix maps :class:`IterNormMap`, :class:`ZCAMap`,
  :class:`StandardizeMap` (subclass :class:`MatrixMap` for your own) and their standalone forms
  :func:`iternorm_matrix`, :func:`zca_matrix`, :func:`standardize_matrix`;
* building blocks for custom layers: :func:`batch_covariance` and :func:`grouped_affine`;
* :func:`swbn_update` (SWBN's online step) and the diagnostics :func:`whitening_error`,
  :func:`newton_residual`;
* the channel-group layout: :func:`group_layout`, :func:`valid_mask`, :func:`canonicalize`,
  and :func:`full_precision`, the context every layer runs its statistics in.
"""

from ._backend import GroupLayout, canonicalize, full_precision, group_layout, valid_mask
from .maps import (
    IterNormMap,
    IterNormMethod,
    MatrixMap,
    StandardizeMap,
    SWBNCriterion,
    ZCAMap,
    iternorm_matrix,
    standardize_matrix,
    zca_matrix,
)
from .whitening import (
    BatchMoments,
    WhitenResult,
    batch_covariance,
    grouped_affine,
    newton_residual,
    swbn_update,
    whiten,
    whitening_error,
)

__all__ = [
    "BatchMoments",
    "GroupLayout",
    "IterNormMap",
    "IterNormMethod",
    "MatrixMap",
    "SWBNCriterion",
    "StandardizeMap",
    "WhitenResult",
    "ZCAMap",
    "batch_covariance",
    "canonicalize",
    "full_precision",
    "group_layout",
    "grouped_affine",
    "iternorm_matrix",
    "newton_residual",
    "standardize_matrix",
    "swbn_update",
    "valid_mask",
    "whiten",
    "whitening_error",
    "zca_matrix",
]
