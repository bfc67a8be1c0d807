"""Normalization layers: whitening drop-in replacements for BatchNorm, and their fused
activation counterparts. Each layer file registers its family (see :mod:`lightning_whiten.registry`)."""

from .base import RunningWhiteningNorm, WhiteningNorm, layer_options
from .dbn import DBN, DBNAct
from .iternorm import IterNorm, IterNormAct
from .norm_act import NormActMixin, norm_act_class
from .swbn import SWBN, SWBNAct

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
    "layer_options",
    "norm_act_class",
]
