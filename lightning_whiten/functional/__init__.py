"""Tensor math of the normalization layers (plain PyTorch, no module state).

* :mod:`.whitening`: group-wise batch whitening (IterNorm, DBN, SWBN): the fused training op
  :func:`whiten`, the covariance-to-whitening-matrix maps and their building blocks.
"""

from .whitening import (
    BatchMoments,
    GroupLayout,
    IterNormMap,
    IterNormMethod,
    MatrixMap,
    StandardizeMap,
    SWBNCriterion,
    WhitenResult,
    ZCAMap,
    _no_autocast,
    batch_covariance,
    canonicalize,
    group_layout,
    grouped_affine,
    iternorm_matrix,
    newton_residual,
    standardize_matrix,
    swbn_update,
    valid_mask,
    whiten,
    whitening_error,
    zca_matrix,
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
