"""Tensor math of the normalization layers (plain PyTorch, no module state).

* :mod:`.whitening`: group-wise batch whitening (IterNorm, DBN, SWBN): the fused training op
  :func:`whiten`, the covariance-to-whitening-matrix maps and their building blocks.
* :mod:`.lp`: per-channel Lp normalization (LpNorm): the fused training op :func:`lp_normalize`
  with a pluggable :class:`StatisticsRule`, :func:`channel_affine`, :func:`gaussian_abs_moment`.
* :mod:`.streaming`: streaming normalization statistics (StreamingNorm):
  :class:`StreamingStatistics`, :class:`StreamingState`, :func:`close_window`.
"""

from .lp import (
    LpResult,
    StatisticsRule,
    channel_affine,
    gaussian_abs_moment,
    lp_inference_scale,
    lp_normalize,
)
from .streaming import StreamingState, StreamingStatistics, close_window
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
from .whitening import (
    _no_autocast as _no_autocast,
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
    "gaussian_abs_moment",
    "group_layout",
    "grouped_affine",
    "iternorm_matrix",
    "lp_inference_scale",
    "lp_normalize",
    "newton_residual",
    "standardize_matrix",
    "swbn_update",
    "valid_mask",
    "whiten",
    "whitening_error",
    "zca_matrix",
]
