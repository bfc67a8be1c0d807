"""lightning-whiten: batch whitening (IterNorm, DBN, SWBN) for PyTorch and PyTorch Lightning."""

from . import functional
from .layers import DBN, SWBN, DBNAct, IterNorm, IterNormAct, SWBNAct, WhiteningNorm
from .surgery import ConversionReport, convert, export

__version__ = "0.1.0"

__all__ = [
    "DBN",
    "SWBN",
    "ConversionReport",
    "DBNAct",
    "IterNorm",
    "IterNormAct",
    "SWBNAct",
    "WhiteningNorm",
    "__version__",
    "convert",
    "export",
    "functional",
]
