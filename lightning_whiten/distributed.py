"""Cross-process synchronization of whitening statistics (plain ``torch.distributed``).

Under data parallelism each rank sees only its slice of the global batch. With ``sync="batch"``
every whitening layer reduces its per-group sums (``sum x``, ``sum x x^T``, ``count``) across the
ranks with one ``all_reduce`` per layer and training step, so that every rank whitens with the
statistics of the concatenated batch; uneven per-rank batch sizes are weighted by their counts.
The backward pass all-reduces the (small) gradients of the mean and covariance, so input
gradients equal those of one process holding the whole batch.

This works with any backend that supports ``all_reduce`` (gloo on CPU, NCCL on GPU), unlike
``torch.nn.SyncBatchNorm`` which only runs on GPUs.
"""

from __future__ import annotations

from typing import Literal

import torch.distributed as dist

__all__ = ["SYNC_MODES", "SyncMode", "resolve_process_group"]

SyncMode = Literal["batch", "none"]
SYNC_MODES: tuple[str, ...] = ("batch", "none")


def resolve_process_group(
    sync: SyncMode, process_group: dist.ProcessGroup | None = None
) -> dist.ProcessGroup | None:
    """The process group to reduce statistics over, or ``None`` when there is nothing to sync.

    Args:
        sync: ``"batch"`` synchronizes whenever ``torch.distributed`` is initialized with more
            than one process in ``process_group``; ``"none"`` never does.
        process_group: the group to reduce over (default: the world).
    """
    if sync == "none":
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group
