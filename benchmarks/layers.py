"""Layer level: forward + backward time and peak memory next to BatchNorm and plain autograd."""

from __future__ import annotations

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
    device: torch.device, quick: bool = False, channels_last: bool = False
) -> list[dict[str, Any]]:
    rows = []
    repeats = 5 if quick else 20
    for shape in SHAPES:
        x = torch.randn(shape, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        grad = torch.randn_like(x)
        results: dict[str, dict[str, float]] = {}
        for name, make in candidates(shape[1]).items():
            layer = make().to(device).train()

            def step(layer=layer, x=x, grad=grad):
                x.grad = None
                layer.zero_grad(set_to_none=True)
                layer(x).backward(grad)

            results[name] = {
                "ms": median_ms(step, device, warmup=2 if quick else 5, repeats=repeats),
                "peak_mb": peak_memory_bytes(step, device) / 2**20,
            }
        bn = results["BatchNorm2d"]
        for name, r in results.items():
            plain = results.get(f"plain {name}")
            rows.append({
                "shape": "x".join(map(str, shape)),
                "layer": name,
                "ms": r["ms"],
                "vs_bn": r["ms"] / bn["ms"],
                "vs_plain": plain["ms"] / r["ms"] if plain else None,
                "peak_mb": r["peak_mb"],
                "mem_vs_bn": r["peak_mb"] / bn["peak_mb"] if bn["peak_mb"] else None,
            })  # fmt: skip
    return rows
