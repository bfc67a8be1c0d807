"""Normalization layers: whitening (IterNorm, DBN, SWBN), Lp and streaming normalization,
convolutional normalization (ConvNorm2d, a drop-in for nn.Conv2d), and the fused activation
counterparts of the normalizations. Each layer file registers its family (see
:mod:`lightning_whiten.registry`)."""

from .base import RunningWhiteningNorm, WhiteningNorm, layer_options
from .convnorm import ConvNorm2d
from .dbn import DBN, DBNAct
from .iternorm import IterNorm, IterNormAct
from .lpnorm import LpNorm, LpNormAct, PerChannelNorm
from .norm_act import NormActMixin, norm_act_class
from .streaming import StreamingNorm, StreamingNormAct, close_windows
from .swbn import SWBN, SWBNAct

__all__ = [
    "DBN",
    "SWBN",
    "ConvNorm2d",
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
