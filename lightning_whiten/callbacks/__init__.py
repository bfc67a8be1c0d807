"""Lightning callbacks: thin adapters over the plain-PyTorch core."""

from .analysis import NormalizationAnalysis
from .monitor import WhiteningMonitor
from .sam import NormSAMCallback
from .whitening import CHECKPOINT_KEY, WhiteningCallback, convert_in_configure_model

__all__ = [
    "CHECKPOINT_KEY",
    "NormSAMCallback",
    "NormalizationAnalysis",
    "WhiteningCallback",
    "WhiteningMonitor",
    "convert_in_configure_model",
]
