"""Whitening layers: drop-in replacements for BatchNorm that also decorrelate channels."""

from .base import RunningWhiteningNorm, WhiteningNorm
from .dbn import DBN
from .iternorm import IterNorm
from .norm_act import DBNAct, IterNormAct, NormActMixin, SWBNAct, norm_act_class
from .swbn import SWBN

__all__ = [
    "DBN",
    "SWBN",
    "DBNAct",
    "IterNorm",
    "IterNormAct",
    "NormActMixin",
    "RunningWhiteningNorm",
    "SWBNAct",
    "WhiteningNorm",
    "norm_act_class",
]
