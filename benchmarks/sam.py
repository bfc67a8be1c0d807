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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

import lightning_whiten as lw

from .common import RESULTS, environment, median_ms, print_table, write_json

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


def run(device: torch.device, quick: bool = False, batch: int = 32, size: int = 128) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=100).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    steps = _steps(model, images, labels)
    times: dict[str, list[float]] = {k: [] for k in steps}
    rounds = 2 if quick else 7
    for _ in range(rounds):
        for label, step in steps.items():
            times[label].append(median_ms(step, device, warmup=1, repeats=2 if quick else 3))
    plain = times["plain step"]
    rows = []
    for label, values in times.items():
        ratios = [a / b for a, b in zip(values, plain, strict=True)]
        rows.append({
            "model": f"resnet18 b{batch} {size}px",
            "variant": label,
            "ms": statistics.median(values),
            "vs_plain": statistics.median(ratios),
            "vs_plain_min": min(ratios),
            "vs_plain_max": max(ratios),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    batch_scale = 1 if device.type == "cpu" else 8
    rows = run(device, quick=args.quick, batch=32 * batch_scale)
    write_json(f"{device.type}-sam", {"environment": env, "target": TARGET, "rows": rows})
    columns = ["model", "variant", "step ms", "x plain step", "range over rounds"]
    table = [
        [r["model"], r["variant"], r["ms"], r["vs_plain"], f"{r['vs_plain_min']:.2f}-{r['vs_plain_max']:.2f}"]
        for r in rows
    ]  # fmt: skip
    print_table(f"NormSAM: a training step ({device.type})", columns, table)
    lines = [
        f"Measured on {env['cpu'] if device.type == 'cpu' else env.get('gpu')} "
        f"({env['threads']} threads), torch {env['torch']}, with `python -m benchmarks.sam"
        f"{' --device ' + args.device if device.type != 'cpu' else ''}`.",
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
