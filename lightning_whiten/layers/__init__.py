"""Normalization layers: whitening (IterNorm, DBN, SWBN), Lp and streaming normalization, and
their fused activation counterparts. Each layer file registers its family (see
:mod:`lightning_whiten.registry`)."""

from .base import RunningWhiteningNorm, WhiteningNorm, layer_options
from .dbn import DBN, DBNAct
from .iternorm import IterNorm, IterNormAct
from .lpnorm import LpNorm, LpNormAct, PerChannelNorm
from .norm_act import NormActMixin, norm_act_class
from .streaming import StreamingNorm, StreamingNormAct, close_windows
from .swbn import SWBN, SWBNAct

__all__ = [
    "DBN",
    "SWBN",
    "DBNAct",
    "IterNorm",
    "IterNormAct",
    "LpNorm",
    "LpNormAct",
    "NormActMixin",
    "PerChannelNorm",
    "RunningWhiteningNorm",
    "SWBNAct",
    "StreamingNorm",
    "StreamingNormAct",
    "WhiteningNorm",
    "close_windows",
    "layer_options",
    "norm_act_class",
]
