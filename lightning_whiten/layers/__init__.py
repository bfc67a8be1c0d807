"""Whitening layers (drop-in replacements for BatchNorm that also decorrelate channels) and
ConvNorm2d (a drop-in for nn.Conv2d with convolutional normalization)."""

from .base import RunningWhiteningNorm, WhiteningNorm
from .convnorm import ConvNorm2d
from .dbn import DBN
from .iternorm import IterNorm
from .norm_act import DBNAct, IterNormAct, NormActMixin, SWBNAct, norm_act_class
from .swbn import SWBN

__all__ = [
    "DBN",
    "SWBN",
    "ConvNorm2d",
    "DBNAct",
    "IterNorm",
    "IterNormAct",
    "NormActMixin",
    "RunningWhiteningNorm",
    "SWBNAct",
    "WhiteningNorm",
    "norm_act_class",
]
