"""Diagnostics of normalization layers and of the models that use them (plain PyTorch).

* :mod:`.whitening`: SND and whiteness of one layer, non-finite batch counters.
"""

from .whitening import Whiteness, batch_transform, nonfinite_batches, snd, whiteness

__all__ = ["Whiteness", "batch_transform", "nonfinite_batches", "snd", "whiteness"]
