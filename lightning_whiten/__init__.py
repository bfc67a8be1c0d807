"""lightning-whiten: batch whitening (IterNorm, DBN, SWBN) for PyTorch and PyTorch Lightning."""

from . import adversarial, diagnostics, functional, schedules
from .checkpoint import load_converted
from .layers import DBN, SWBN, ConvNorm2d, DBNAct, IterNorm, IterNormAct, SWBNAct, WhiteningNorm
from .surgery import ConversionReport, convert, export

__version__ = "0.1.0"

__all__ = [
    "DBN",
    "SWBN",
    "ConvNorm2d",
    "ConversionReport",
    "DBNAct",
    "ImageClassifier",
    "IterNorm",
    "IterNormAct",
    "SWBNAct",
    "WhiteningCallback",
    "WhiteningMonitor",
    "WhiteningNorm",
    "__version__",
    "adversarial",
    "convert",
    "diagnostics",
    "export",
    "functional",
    "load_converted",
    "schedules",
]


def __getattr__(name: str):
    # The Lightning adapters are imported on first use: the core stays plain PyTorch.
    if name in ("WhiteningCallback", "WhiteningMonitor"):
        from . import callbacks

        return getattr(callbacks, name)
    if name == "ImageClassifier":
        from .models import ImageClassifier

        return ImageClassifier
    raise AttributeError(f"module 'lightning_whiten' has no attribute {name!r}")
