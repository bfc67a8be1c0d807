"""Layer level: forward + backward time and peak memory next to BatchNorm, plain autograd (the
authors' formulation) and the layer's floor.

The floor of a whitening layer is the time of the activation-sized GEMMs its exact forward +
backward cannot avoid, run alone on the same shapes, layouts and precision (``floor_step``),
plus BatchNorm's own time (the elementwise passes and allocations every normalization pays):

* IterNorm and DBN: the covariance ``sum x x^T``, the whitening ``W x``, and in the backward
  ``sum dy x^T``, ``A^T dy`` and ``S x`` (two GEMMs accumulated into one ``dx``): 5 GEMMs of
  ``2 N C L d`` FLOPs each;
* SWBN: the same without ``S x`` (its covariance gradient is diagonal: a per-channel scale): 4.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

import lightning_whiten as lw
from lightning_whiten.functional import _backend as FW

from .baselines import PlainDBN, PlainIterNorm, PlainSWBN
from .common import median_ms, peak_memory_bytes

SHAPES = [(64, 64, 32, 32), (64, 256, 16, 16), (32, 512, 8, 8)]


def candidates(channels: int) -> dict[str, Any]:
    return {
        "BatchNorm2d": lambda: nn.BatchNorm2d(channels),
        "IterNorm g16 T5": lambda: lw.IterNorm(channels, group_size=16, iterations=5),
        "IterNorm g64 T5": lambda: lw.IterNorm(channels, group_size=64, iterations=5),
        "SWBN g16": lambda: lw.SWBN(channels, group_size=16),
        "SWBN g64": lambda: lw.SWBN(channels, group_size=64),
        "DBN g16": lambda: lw.DBN(channels, group_size=16),
        "plain IterNorm g16 T5": lambda: PlainIterNorm(channels, 16, 5),
        "plain IterNorm g64 T5": lambda: PlainIterNorm(channels, 64, 5),
        "plain SWBN g64": lambda: PlainSWBN(channels, 64),
        "plain DBN g16": lambda: PlainDBN(channels, 16),
    }


#: The activation-sized GEMMs of each family's training step (see the module docstring).
FLOOR_GEMMS = {"IterNorm": 5, "DBN": 5, "SWBN": 4}


def floor_step(x: torch.Tensor, grad: torch.Tensor, group_size: int, gemms: int):
    """A step of the ``gemms`` (4 or 5) activation-sized GEMMs of a whitening layer alone: the
    same backend kernels, views, layouts and cache-sized chunks as the layer, each GEMM in a
    pass of its own, into preallocated outputs (no statistics, no elementwise work)."""
    layout = FW.group_layout(x.shape[1], group_size)
    v, kind = FW._as_view(x.detach())
    g = FW._in_view_of(grad, kind)
    d = layout.group_size
    mats = torch.eye(d, dtype=x.dtype, device=x.device).repeat(layout.num_groups, 1, 1)
    mats = mats + 0.01 * torch.randn_like(mats)
    y, dx = torch.empty_like(v), torch.empty_like(v)
    chunks = FW._chunks(v)
    # The covariance GEMM as the layer runs it: on a channels-first chunk centered into a
    # group-major (C, n, L) buffer, one bmm over the groups (see FW._group_major_gram).
    group_major = None
    if kind == "cf" and FW._group_major_gram(layout) and x.device.type == "cpu":
        group_major = [
            v[rows].transpose(0, 1).contiguous().view(layout.num_groups, d, -1) for rows in chunks
        ]

    def step() -> None:
        if group_major is not None:
            for xg in group_major:  # covariance
                torch.bmm(xg, xg.transpose(1, 2))
        else:
            for rows in chunks:  # covariance
                FW._gram(v[rows], v[rows], kind, layout)
        for rows in chunks:  # whitening
            FW._gmm(mats, v[rows], kind, layout, y[rows])
        for rows in chunks:  # backward: sum dy x^T
            FW._gram(g[rows], v[rows], kind, layout)
        for rows in chunks:  # backward: A^T dy (+ S x into the same chunk of dx)
            FW._gmm(mats, g[rows], kind, layout, dx[rows])
            if gemms == 5:
                FW._gmm(mats, v[rows], kind, layout, dx[rows], accumulate=True)

    return step


def _floor_key(name: str) -> tuple[str, int] | None:
    """``("IterNorm", 16)`` for "IterNorm g16 T5" (ours, not the plain baselines)."""
    family, *rest = name.split()
    if family not in FLOOR_GEMMS or not rest or not rest[0].startswith("g"):
        return None
    return family, int(rest[0][1:])


def run(
    device: torch.device,
    quick: bool = False,
    channels_last: bool = False,
    shapes: list[tuple[int, ...]] | None = None,
    dtype: torch.dtype | None = None,
    plain: bool = True,
) -> list[dict[str, Any]]:
    """Forward + backward of every candidate next to ``nn.BatchNorm2d`` on each shape.

    ``dtype`` (``torch.bfloat16``/``float16``) runs the step under autocast with the input in
    that dtype (BatchNorm then runs cuDNN's mixed-precision kernel); ``plain=False`` leaves out
    the plain-autograd baselines.
    """
    rows = []
    rounds = 5 if quick else 25
    for shape in shapes or SHAPES:
        x = torch.randn(shape, device=device, dtype=dtype or torch.float32)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        grad = torch.randn_like(x)
        steps = {}
        cast = (
            (lambda: torch.autocast(device.type, dtype=dtype))
            if dtype is not None
            else contextlib.nullcontext
        )
        for name, make in candidates(shape[1]).items():
            if name.startswith("plain") and not plain:
                continue
            layer = make().to(device).train()

            def step(layer=layer, x=x, grad=grad, cast=cast):
                x.grad = None
                layer.zero_grad(set_to_none=True)
                with cast():
                    y = layer(x)
                y.backward(grad.to(y.dtype))

            steps[name] = step
        # The floors' GEMMs, timed in the same rounds (only in float32, the layer's precision).
        floors = {}
        if dtype is None:
            for name in list(steps):
                key = _floor_key(name)
                if key is not None:
                    label = f"floor GEMMs {key[0]} g{key[1]}"
                    floors[name] = label
                    if label not in steps:
                        steps[label] = floor_step(x, grad, key[1], FLOOR_GEMMS[key[0]])
        # Interleaved rounds (every candidate once per round): slow drifts of a shared machine
        # hit all candidates alike, and ratios are taken per round.
        times: dict[str, list[float]] = {name: [] for name in steps}
        for step in steps.values():
            median_ms(step, device, warmup=2, repeats=1)
        for _ in range(rounds):
            for name, step in steps.items():
                times[name].append(median_ms(step, device, warmup=0, repeats=1))
        memory = {
            name: peak_memory_bytes(step, device) / 2**20
            for name, step in steps.items()
            if not name.startswith("floor")
        }

        def median(values: list[float]) -> float:
            return sorted(values)[len(values) // 2]

        bn = times["BatchNorm2d"]
        for name, values in times.items():
            if name.startswith("floor"):
                continue
            plain_times = times.get(f"plain {name}")
            # floor = GEMMs alone + BatchNorm, per round
            floor = (
                [f + b for f, b in zip(times[floors[name]], bn, strict=True)]
                if name in floors
                else None
            )
            rows.append({
                "shape": "x".join(map(str, shape)),
                "layer": name,
                "ms": median(values),
                "vs_bn": median([a / b for a, b in zip(values, bn, strict=True)]),
                "vs_plain": median([p / a for p, a in zip(plain_times, values, strict=True)]) if plain_times else None,
                "vs_authors": median([a / p for p, a in zip(plain_times, values, strict=True)]) if plain_times else None,
                "gemm_ms": median(times[floors[name]]) if floor else None,
                "floor_ms": median(floor) if floor else None,
                "vs_floor": median([a / f for a, f in zip(values, floor, strict=True)]) if floor else None,
                "peak_mb": memory[name],
                "mem_vs_bn": memory[name] / memory["BatchNorm2d"],
            })  # fmt: skip
    return rows
