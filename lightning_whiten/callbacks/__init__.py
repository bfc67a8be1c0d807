"""Lightning callbacks: thin adapters over the plain-PyTorch core."""

from .monitor import WhiteningMonitor
from .whitening import CHECKPOINT_KEY, WhiteningCallback

__all__ = ["CHECKPOINT_KEY", "WhiteningCallback", "WhiteningMonitor"]
