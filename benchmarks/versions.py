"""Before/after: this checkout's layers against another commit's, interleaved in one process.

``python -m benchmarks.versions --before /path/to/other/checkout [--threads 1] [--rounds 25]
[--model-rounds 7]``

The other checkout's package is copied to a temporary directory as ``lightning_whiten_before``
(its absolute imports renamed), so both versions run in the same process, each candidate once
per round: the ratios (after / before, x BN, / floor, / the authors' formulation) do not depend
on how loaded the machine is from one run to the next. Writes
``benchmarks/results/cpu-versions.json``.
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .baselines import PlainIterNorm
from .common import environment, write_json
from .layers import SHAPES, floor_step


def _import_before(checkout: Path) -> Any:
    target = Path(tempfile.mkdtemp()) / "lightning_whiten_before"
    shutil.copytree(checkout / "lightning_whiten", target)
    for path in target.rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\blightning_whiten\b", "lightning_whiten_before", text))
    sys.path.insert(0, str(target.parent))
    import lightning_whiten_before  # type: ignore[import-not-found]

    return lightning_whiten_before


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _interleaved(steps: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def layers(before: Any, rounds: int) -> list[dict[str, Any]]:
    import lightning_whiten as after

    rows = []
    for shape in SHAPES:
        c = shape[1]
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn(shape)
        modules: dict[str, nn.Module] = {"BN": nn.BatchNorm2d(c)}
        for lib, tag in ((before, "before"), (after, "after")):
            modules[f"IterNorm g16 {tag}"] = lib.IterNorm(c, group_size=16)
            modules[f"IterNorm g64 {tag}"] = lib.IterNorm(c, group_size=64)
            modules[f"DBN g16 {tag}"] = lib.DBN(c, group_size=16)
            modules[f"SWBN g64 {tag}"] = lib.SWBN(c, group_size=64)
            modules[f"LpNorm p1 {tag}"] = lib.LpNorm(c, p=1)
            modules[f"StreamingNorm p1 {tag}"] = lib.StreamingNorm(c, p=1)
        modules["authors IterNorm g16"] = PlainIterNorm(c, 16, 5)
        modules["authors IterNorm g64"] = PlainIterNorm(c, 64, 5)
        steps = {}
        for name, module in modules.items():

            def step(module=module, x=x, grad=grad):
                x.grad = None
                module.zero_grad(set_to_none=True)
                module(x).backward(grad)

            steps[name] = step
        # the floors: this checkout's GEMM kernels alone (plus BN's time, below)
        steps["GEMMs g16 (5)"] = floor_step(x, grad, 16, 5)
        steps["GEMMs g64 (5)"] = floor_step(x, grad, 64, 5)
        steps["GEMMs g64 (4)"] = floor_step(x, grad, 64, 4)
        times = _interleaved(steps, rounds)
        bn = times["BN"]

        def ratio(name: str, reference: list[float], times=times) -> float:
            return _median([a / b for a, b in zip(times[name], reference, strict=True)])

        for name in modules:
            if name == "BN":
                continue
            family, group, *tag = name.replace("authors ", "").split()
            gemms = 4 if family == "SWBN" else 5
            # (Lp/Streaming normalization has no GEMM: BN itself is its floor)
            floor_key = f"GEMMs {group} ({gemms})"
            floor = (
                [a + b for a, b in zip(times[floor_key], bn, strict=True)]
                if floor_key in times
                else bn
            )
            authors = times.get(f"authors IterNorm {group}") if family == "IterNorm" else None
            other = {"before": "after", "after": "before"}.get(tag[0] if tag else "")
            rows.append({
                "shape": "x".join(map(str, shape)),
                "layer": name,
                "ms": _median(times[name]) * 1e3,
                "vs_bn": ratio(name, bn),
                "vs_floor": ratio(name, floor) if not name.startswith("authors") else None,
                "vs_authors": ratio(name, authors) if authors and tag else None,
                "after_vs_before": ratio(name, times[f"{family} {group} before"]) if other == "before" else None,
                "bn_ms": _median(bn) * 1e3,
                "gemm_ms": _median(times[floor_key]) * 1e3 if floor_key in times else None,
            })  # fmt: skip
    return rows


def model(before: Any, rounds: int) -> dict[str, Any]:
    """ResNet-50 (timm, 100 classes) at 128 px, batch 16, every BN converted to IterNorm g64."""
    import timm

    import lightning_whiten as after

    torch.manual_seed(0)
    base = timm.create_model("resnet50", pretrained=False, num_classes=100)
    images, labels = torch.randn(16, 3, 128, 128), torch.randint(0, 100, (16,))
    models = {"BN": copy.deepcopy(base)}
    for lib, tag in ((before, "before"), (after, "after")):
        converted = copy.deepcopy(base)
        lib.convert(converted, "iternorm", group_size=64, iterations=5)
        models[f"IterNorm g64 {tag}"] = converted
    steps = {}
    for name, m in models.items():
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

        def step(m=m, opt=opt):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(images), labels).backward()
            opt.step()

        steps[name] = step
    times = _interleaved(steps, rounds)
    return {
        "model": "resnet50 b16 128px",
        "ms": {k: _median(v) * 1e3 for k, v in times.items()},
        "vs_bn": {
            k: _median([a / b for a, b in zip(v, times["BN"], strict=True)])
            for k, v in times.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", type=Path, required=True, help="another checkout's root")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--model-rounds", type=int, default=7, help="0 skips the model step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    before = _import_before(args.before)
    payload: dict[str, Any] = {"environment": environment(torch.device("cpu"))}
    payload["layers"] = layers(before, args.rounds)
    for r in payload["layers"]:
        print(r)
    if args.model_rounds:
        payload["model"] = model(before, args.model_rounds)
        print(payload["model"])
    print(write_json("cpu-versions", payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
