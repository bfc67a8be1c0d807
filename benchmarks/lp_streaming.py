"""Lp and streaming normalization next to BatchNorm: ``python -m benchmarks.lp_streaming``.

Forward + backward of one layer in training mode on the shapes of the layer benchmark
(:mod:`benchmarks.layers`), for ``nn.BatchNorm2d``, :class:`LpNorm` (p = 1, 2), :class:`StreamingNorm`
(p = 1, 2; every step closes its window, as in an online loop) and the straightforward autograd
composition of L1 normalization. Times are medians over interleaved rounds (every candidate once
per round, in a shuffled order), ratios are taken per round against BatchNorm measured in the
same round, so slow drifts of a shared machine hit all candidates alike. Writes
``benchmarks/results/<device>-lp_streaming.json`` and ``.md``.

Options: ``--device cuda``, ``--quick`` (fewer rounds), ``--channels-last``, ``--threads N``.
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import lightning_whiten as lw

from .common import RESULTS, environment, median_ms, peak_memory_bytes, print_table, write_json
from .layers import SHAPES

TARGETS = {"LpNorm p=1": 1.2, "StreamingNorm p=1": 1.5}


class PlainL1Norm(nn.Module):
    """L1 normalization as the obvious autograd composition (the baseline of the fused op)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean((0, 2, 3), keepdim=True)
        centered = x - mean
        mad = centered.abs().mean((0, 2, 3), keepdim=True)
        return centered / (mad + self.eps) * self.weight.view(1, -1, 1, 1) + self.bias.view(
            1, -1, 1, 1
        )


def candidates(channels: int) -> dict[str, Callable[[], nn.Module]]:
    return {
        "BatchNorm2d": lambda: nn.BatchNorm2d(channels),
        "LpNorm p=1": lambda: lw.LpNorm(channels, p=1),
        "LpNorm p=2": lambda: lw.LpNorm(channels, p=2),
        "StreamingNorm p=1": lambda: lw.StreamingNorm(channels, p=1),
        "StreamingNorm p=2": lambda: lw.StreamingNorm(channels, p=2),
        "plain autograd L1": lambda: PlainL1Norm(channels),
    }


def run(
    device: torch.device, quick: bool = False, channels_last: bool = False
) -> list[dict[str, Any]]:
    rows = []
    rounds = 7 if quick else 31
    for shape in SHAPES:
        x = torch.randn(shape, device=device) * 2 + 0.5
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        grad = torch.randn_like(x)
        steps = {}
        for name, make in candidates(shape[1]).items():
            layer = make().to(device).train()

            def step(layer=layer, x=x, grad=grad):
                x.grad = None
                layer.zero_grad(set_to_none=True)
                layer(x).backward(grad)

            steps[name] = step
        times: dict[str, list[float]] = {name: [] for name in steps}
        for step in steps.values():
            median_ms(step, device, warmup=3, repeats=1)
        order = list(steps)
        shuffle = random.Random(0)
        for _ in range(rounds):
            shuffle.shuffle(order)  # no candidate always runs right after another
            for name in order:
                times[name].append(median_ms(steps[name], device, warmup=0, repeats=1))
        memory = {name: peak_memory_bytes(step, device) / 2**20 for name, step in steps.items()}
        bn = times["BatchNorm2d"]
        plain = times["plain autograd L1"]
        for name, values in times.items():
            ratios = [a / b for a, b in zip(values, bn, strict=True)]
            rows.append({
                "shape": "x".join(map(str, shape)),
                "layer": name,
                "ms": statistics.median(values),
                "vs_bn": statistics.median(ratios),
                "vs_bn_quartiles": statistics.quantiles(ratios, n=4)[::2],
                "plain_vs_ours": (
                    statistics.median([p / a for p, a in zip(plain, values, strict=True)])
                    if name == "LpNorm p=1" else None
                ),
                "peak_mb": memory[name],
                "mem_vs_bn": memory[name] / memory["BatchNorm2d"],
                "target": TARGETS.get(name),
            })  # fmt: skip
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, list):
        return "-".join(f"{u:.2f}" for u in v)
    return str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    rows = run(device, quick=args.quick, channels_last=args.channels_last)
    suffix = "-channels_last" if args.channels_last else ""
    write_json(f"{device.type}-lp_streaming{suffix}", {"environment": env, "rows": rows})
    columns = ["shape", "layer", "ms", "x BN", "x BN (quartiles)", "plain / ours", "peak MB",
               "memory x BN", "target x BN"]  # fmt: skip
    table = [
        [r["shape"], r["layer"], r["ms"], r["vs_bn"], r["vs_bn_quartiles"], r["plain_vs_ours"],
         r["peak_mb"], r["mem_vs_bn"], r["target"]]
        for r in rows
    ]  # fmt: skip
    print_table(
        "Lp / streaming normalization: forward + backward",
        columns,
        [[_fmt(v) if isinstance(v, list) or v is None else v for v in r] for r in table],
    )
    lines = [
        f"Environment: {env}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(_fmt(v) for v in r) + " |" for r in table),
    ]
    (RESULTS / f"{device.type}-lp_streaming{suffix}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
