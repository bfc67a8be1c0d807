"""Tensor math of the normalization layers (plain PyTorch, no module state).

* :mod:`.whitening`: group-wise batch whitening (IterNorm, DBN, SWBN): the fused training op
  :func:`whiten`, the covariance-to-whitening-matrix maps and their building blocks.
* :mod:`.convnorm`: convolutional normalization (ConvNorm): the Fourier-domain preconditioner
  :func:`convnorm_preconditioner` and the preconditioned convolution :func:`convnorm_conv2d`.
"""

from .convnorm import (
    convnorm_conv2d,
    convnorm_preconditioner,
    full_conv_size,
    kernel_autocorrelation,
    power_spectrum,
    precondition,
)
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
    "convnorm_conv2d",
    "convnorm_preconditioner",
    "full_conv_size",
    "group_layout",
    "grouped_affine",
    "iternorm_matrix",
    "kernel_autocorrelation",
    "newton_residual",
    "power_spectrum",
    "precondition",
    "standardize_matrix",
    "swbn_update",
    "valid_mask",
    "whiten",
    "whitening_error",
    "zca_matrix",
]
