"""Layer level: forward + backward time and peak memory next to BatchNorm and plain autograd."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

import lightning_whiten as lw

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
        # Interleaved rounds (every candidate once per round): slow drifts of a shared machine
        # hit all candidates alike, and ratios are taken per round.
        times: dict[str, list[float]] = {name: [] for name in steps}
        for step in steps.values():
            median_ms(step, device, warmup=2, repeats=1)
        for _ in range(rounds):
            for name, step in steps.items():
                times[name].append(median_ms(step, device, warmup=0, repeats=1))
        memory = {name: peak_memory_bytes(step, device) / 2**20 for name, step in steps.items()}

        def median(values: list[float]) -> float:
            return sorted(values)[len(values) // 2]

        bn = times["BatchNorm2d"]
        for name, values in times.items():
            plain_times = times.get(f"plain {name}")
            rows.append({
                "shape": "x".join(map(str, shape)),
                "layer": name,
                "ms": median(values),
                "vs_bn": median([a / b for a, b in zip(values, bn, strict=True)]),
                "vs_plain": median([p / a for p, a in zip(plain_times, values, strict=True)]) if plain_times else None,
                "peak_mb": memory[name],
                "mem_vs_bn": memory[name] / memory["BatchNorm2d"],
            })  # fmt: skip
    return rows
