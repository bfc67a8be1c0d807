"""Normalization layers: whitening (IterNorm, DBN, SWBN), Lp and streaming normalization."""

from .base import RunningWhiteningNorm, WhiteningNorm
from .dbn import DBN
from .iternorm import IterNorm
from .lpnorm import LpNorm, PerChannelNorm
from .norm_act import DBNAct, IterNormAct, NormActMixin, SWBNAct, norm_act_class
from .streaming import StreamingNorm, close_windows
from .swbn import SWBN

__all__ = [
    "DBN",
    "SWBN",
    "DBNAct",
    "IterNorm",
    "IterNormAct",
    "LpNorm",
    "NormActMixin",
    "PerChannelNorm",
    "RunningWhiteningNorm",
    "SWBNAct",
    "StreamingNorm",
    "WhiteningNorm",
    "close_windows",
    "norm_act_class",
]
