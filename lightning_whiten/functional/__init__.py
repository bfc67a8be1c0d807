"""Tensor math of the normalization layers (plain PyTorch, no module state).

* :mod:`.lp`: per-channel Lp normalization (LpNorm): the fused training op :func:`lp_normalize`
  with a pluggable :class:`StatisticsRule`, :func:`channel_affine`, :func:`gaussian_abs_moment`.
* :mod:`.streaming`: streaming normalization statistics (StreamingNorm):
  :class:`StreamingStatistics`, :class:`StreamingState`, :func:`close_window`.
* :mod:`.convnorm`: convolutional normalization (ConvNorm): the Fourier-domain preconditioner
  :func:`convnorm_preconditioner` and the preconditioned convolution :func:`convnorm_conv2d`.

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
from .convnorm import (
    convnorm_conv2d,
    convnorm_preconditioner,
    full_conv_size,
    kernel_autocorrelation,
    power_spectrum,
    precondition,
)
from .lp import (
    LpResult,
    StatisticsRule,
    channel_affine,
    gaussian_abs_moment,
    lp_inference_scale,
    lp_normalize,
)
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
from .streaming import StreamingState, StreamingStatistics, close_window
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
    "LpResult",
    "MatrixMap",
    "SWBNCriterion",
    "StandardizeMap",
    "StatisticsRule",
    "StreamingState",
    "StreamingStatistics",
    "WhitenResult",
    "ZCAMap",
    "batch_covariance",
    "canonicalize",
    "channel_affine",
    "close_window",
    "convnorm_conv2d",
    "convnorm_preconditioner",
    "full_conv_size",
    "full_precision",
    "gaussian_abs_moment",
    "group_layout",
    "grouped_affine",
    "iternorm_matrix",
    "kernel_autocorrelation",
    "lp_inference_scale",
    "lp_normalize",
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
