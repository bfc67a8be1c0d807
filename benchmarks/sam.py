"""NormSAM's cost: one training step of resnet18, plain vs SAM-ON vs full SAM, same run.

    python -m benchmarks.sam [--device cuda] [--quick]

Variants (every one on its own copy of the same model, SGD with momentum):

* plain step: forward, backward, SGD;
* NormSAM (SAM-ON), closure form: the first pass differentiates only the normalization
  parameters (``torch.autograd.grad``: the convolutions' weight gradients are skipped);
* NormSAM (SAM-ON), two-step form: a full first backward (``first_step``/``second_step``);
* full SAM (``params="all"``), closure form: the first pass needs every gradient.

Interleaved rounds (each variant once per round) so that slow drifts of a shared machine hit
all alike; ratios are medians of the per-round ratios against the plain step. Writes
``benchmarks/results/<device>-sam.json`` and ``<device>-sam.md``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

import lightning_whiten as lw

from .common import RESULTS, environment, print_table, sync, write_json

#: The lead's target: a SAM-ON step costs at most this many plain steps.
TARGET = 1.75


def _steps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    def loss_of(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(images), labels)

    def make(kind: str) -> Callable[[], None]:
        m = copy.deepcopy(model).train()
        optimizer = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        if kind == "plain":

            def step() -> None:
                optimizer.zero_grad(set_to_none=True)
                loss_of(m).backward()
                optimizer.step()

            return step
        params = "all" if kind == "sam_all" else "norm"
        sam = lw.NormSAM(m, optimizer, rho=0.05, params=params)
        if kind == "sam_on_two_step":

            def step() -> None:
                optimizer.zero_grad(set_to_none=True)
                loss_of(m).backward()
                sam.first_step(zero_grad=True)
                loss_of(m).backward()
                sam.second_step(zero_grad=True)

            return step

        def step() -> None:
            sam.step(lambda: loss_of(m))

        return step

    return {
        "plain step": make("plain"),
        "NormSAM (SAM-ON), closure form": make("sam_on"),
        "NormSAM (SAM-ON), two-step form": make("sam_on_two_step"),
        "full SAM (params='all'), closure form": make("sam_all"),
    }


def _time_ms(step: Callable[[], None], device: torch.device, repeats: int) -> list[float]:
    """Wall time of each of ``repeats`` calls (CUDA events on GPU)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def run(
    device: torch.device, quick: bool = False, batch: int = 32, size: int = 128, rounds: int = 7
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=100).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    steps = _steps(model, images, labels)
    for step in steps.values():  # warm-up: lazily created state, allocator
        step()
        step()
    sync(device)
    times: dict[str, list[list[float]]] = {k: [] for k in steps}
    for _ in range(2 if quick else rounds):
        for label, step in steps.items():
            times[label].append(_time_ms(step, device, 2 if quick else 3))
    plain = times["plain step"]
    rows = []
    for label, per_round in times.items():
        medians = [statistics.median(r) for r in per_round]
        ratios = [a / statistics.median(b) for a, b in zip(medians, plain, strict=True)]
        best = min(min(r) for r in per_round) / min(min(r) for r in plain)
        rows.append({
            "model": f"resnet18 b{batch} {size}px",
            "variant": label,
            "ms": statistics.median(medians),
            "vs_plain": statistics.median(ratios),
            "vs_plain_min": min(ratios),
            "vs_plain_max": max(ratios),
            "vs_plain_best": best,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--batch", type=int, default=None, help="default 32 (CPU), 256 (GPU)")
    parser.add_argument("--size", type=int, default=128, help="image size")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    batch = args.batch or (32 if device.type == "cpu" else 256)
    rows = run(device, quick=args.quick, batch=batch, size=args.size, rounds=args.rounds)
    write_json(f"{device.type}-sam", {"environment": env, "target": TARGET, "rows": rows})
    columns = [
        "model",
        "variant",
        "step ms",
        "x plain step",
        "range over rounds",
        "x plain (fastest runs)",
    ]
    table = [
        [r["model"], r["variant"], r["ms"], r["vs_plain"],
         f"{r['vs_plain_min']:.2f}-{r['vs_plain_max']:.2f}", r["vs_plain_best"]]
        for r in rows
    ]  # fmt: skip
    print_table(f"NormSAM: a training step ({device.type})", columns, table)
    flags = " ".join(argv if argv is not None else sys.argv[1:])
    command = "python -m benchmarks.sam" + (f" {flags}" if flags else "")
    lines = [
        f"Measured on {env['cpu'] if device.type == 'cpu' else env.get('gpu')} "
        f"({env['threads']} threads), torch {env['torch']}, with `{command}`. Ratios: median of "
        "the per-round ratios to the plain step (interleaved rounds), their range, and the "
        "ratio of the fastest runs (least disturbed by other load).",
        "",
        "### NormSAM: a training step (SGD with momentum)",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for r in table:
        lines.append(
            "| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r) + " |"
        )
    path = Path(RESULTS) / f"{device.type}-sam.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
