"""Lightning callbacks: thin adapters over the plain-PyTorch core."""

from .whitening import CHECKPOINT_KEY, WhiteningCallback

__all__ = ["CHECKPOINT_KEY", "WhiteningCallback"]
