"""Label noise for the classification datamodules (the ConvNorm paper's noisy-label experiments).

:func:`corrupt_labels` returns noisy labels fixed by a seed:

* ``"symmetric"``: exactly ``round(rate * N)`` samples, chosen uniformly, get a label drawn
  uniformly from the *other* classes, so the fraction of wrong labels is exactly ``rate``.
* ``"uniform"``: the ConvNorm authors' symmetric noise (shengliu66/ConvNorm
  ``data_loader/cifar10.py``): ``ceil(rate * N)`` samples get a label drawn uniformly from *all*
  classes, so about ``rate * (1 - 1/C)`` of the labels end up wrong.
* ``"asymmetric"``: for every class with an entry in ``mapping``, exactly
  ``ceil(rate * n_c)`` of its ``n_c`` samples take the mapped class (the authors' CIFAR-10 map:
  truck -> automobile, bird -> airplane, cat <-> dog, deer -> horse); other classes keep their
  labels.

Plain PyTorch, no Lightning.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "ASYMMETRIC_MAPS",
    "NoiseMode",
    "corrupt_labels",
    "save_noisy_labels",
]

NoiseMode = Literal["symmetric", "uniform", "asymmetric"]
NOISE_MODES = ("symmetric", "uniform", "asymmetric")

#: Class flips of asymmetric noise per dataset. CIFAR-10: the ConvNorm authors' code (after Patrini
#: et al. 2017); digits: Patrini et al.'s MNIST flips (2 -> 7, 3 -> 8, 5 <-> 6, 7 -> 1).
ASYMMETRIC_MAPS: dict[str, dict[int, int]] = {
    "cifar10": {9: 1, 2: 0, 3: 5, 5: 3, 4: 7},
    "digits": {2: 7, 3: 8, 5: 6, 6: 5, 7: 1},
}


def corrupt_labels(
    labels: Tensor,
    num_classes: int,
    rate: float,
    mode: NoiseMode = "symmetric",
    seed: int = 0,
    mapping: dict[int, int] | None = None,
) -> Tensor:
    """Noisy copy of ``labels`` ``(N,)`` (int64, values in ``0..num_classes-1``).

    Args:
        labels: the clean labels.
        num_classes: ``C``.
        rate: noise rate in ``[0, 1]``: the fraction of samples corrupted (of each mapped class
            for ``"asymmetric"``).
        mode: ``"symmetric"``, ``"uniform"`` or ``"asymmetric"`` (see the module docstring).
        seed: the random seed; the same arguments give the same labels.
        mapping: ``{class: noisy class}`` of ``"asymmetric"`` noise.

    Returns:
        ``(N,)`` noisy labels; ``labels`` is not modified.
    """
    if mode not in NOISE_MODES:
        raise ValueError(f"label noise: mode must be one of {NOISE_MODES}, got {mode!r}")
    if not 0 <= rate <= 1:
        raise ValueError(f"label noise: rate must be in [0, 1], got {rate!r}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"label noise: labels must be in 0..{num_classes - 1}")
    gen = torch.Generator().manual_seed(seed)
    noisy = labels.clone()
    n = labels.numel()
    if mode == "symmetric":
        chosen = torch.randperm(n, generator=gen)[: round(rate * n)]
        # an offset in 1..C-1 added modulo C: uniform over the other classes
        offset = torch.randint(1, num_classes, (chosen.numel(),), generator=gen)
        noisy[chosen] = (labels[chosen] + offset) % num_classes
    elif mode == "uniform":
        chosen = torch.randperm(n, generator=gen)[: math.ceil(rate * n)]
        noisy[chosen] = torch.randint(0, num_classes, (chosen.numel(),), generator=gen)
    else:
        if not mapping:
            raise ValueError("label noise: mode 'asymmetric' needs a class mapping")
        for source, target in sorted(mapping.items()):
            if not (0 <= source < num_classes and 0 <= target < num_classes):
                raise ValueError(f"label noise: mapping {source} -> {target} out of range")
            members = (labels == source).nonzero().flatten()
            chosen = members[torch.randperm(members.numel(), generator=gen)]
            noisy[chosen[: math.ceil(rate * members.numel())]] = target
    return noisy


def save_noisy_labels(path: str | Path, indices: Tensor, clean: Tensor, noisy: Tensor) -> Path:
    """Write ``index,clean,noisy`` rows (one per training sample) to a CSV file; returns the
    path. ``indices``: the samples' indices in the source dataset."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "clean", "noisy"])
        writer.writerows(zip(indices.tolist(), clean.tolist(), noisy.tolist(), strict=True))
    return path
