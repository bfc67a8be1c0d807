"""Run the benchmarks: ``python -m benchmarks.run [--device cuda] [--quick] [--only layers,models]``.

Prints rich tables, writes ``benchmarks/results/<device>-<section>.json`` and a markdown summary
``benchmarks/results/<device>.md`` (the tables in the README come from there). Every figure is a
median of repeated runs after warm-up, and every comparison is a ratio measured in the same
process, in interleaved rounds (each variant once per round) so that slow drifts of a shared
machine hit all variants alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .common import RESULTS, environment, print_table, write_json

SECTIONS = ("layers", "models", "monitor", "ddp")


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _markdown(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    env = environment(device)
    sections_md: dict[str, list[str]] = {}

    if "layers" in sections:
        from . import layers

        start = time.time()
        rows = layers.run(device, quick=args.quick)
        write_json(f"{device.type}-layers", {"environment": env, "rows": rows})
        columns = [
            "shape",
            "layer",
            "ms",
            "x BN",
            "plain autograd / ours",
            "ours / authors'",
            "GEMMs ms",
            "floor ms",
            "ours / floor",
            "peak MB",
            "memory x BN",
        ]
        table = [
            [
                r["shape"],
                r["layer"],
                r["ms"],
                r["vs_bn"],
                r["vs_plain"],
                r["vs_authors"],
                r["gemm_ms"],
                r["floor_ms"],
                r["vs_floor"],
                r["peak_mb"],
                r["mem_vs_bn"],
            ]
            for r in rows
        ]
        print_table(
            f"layers: forward + backward ({device.type}, {time.time() - start:.0f}s)",
            columns,
            table,
        )
        sections_md["layers"] = ["### Layers: forward + backward", "", _markdown(columns, table)]

    if "models" in sections:
        from . import models

        start = time.time()
        rows = models.run(device, quick=args.quick, batch_scale=1 if device.type == "cpu" else 8)
        write_json(f"{device.type}-models", {"environment": env, "rows": rows})
        columns = ["model", "normalization", "step ms", "x BN", "peak MB", "memory x BN"]
        table = [
            [r["model"], r["layer"], r["ms"], r["vs_bn"], r["peak_mb"], r["mem_vs_bn"]]
            for r in rows
        ]
        print_table(
            f"models: training step ({device.type}, {time.time() - start:.0f}s)", columns, table
        )
        sections_md["models"] = [
            "### Models: a training step (forward, backward, SGD)",
            "",
            _markdown(columns, table),
        ]

    if "monitor" in sections:
        from . import monitor

        rows = monitor.run(device, quick=args.quick)
        write_json(f"{device.type}-monitor", {"environment": env, "rows": rows})
        columns = ["what", "ms", "cost per step %"]
        table = [[r["config"], r["ms_per_step"], r["overhead_pct"]] for r in rows]
        print_table("WhiteningMonitor cost", columns, table)
        sections_md["monitor"] = ["### WhiteningMonitor cost", "", _markdown(columns, table)]

    if "ddp" in sections and device.type == "cpu":
        from . import ddp_sync

        rows = ddp_sync.run(quick=args.quick)
        write_json("cpu-ddp", {"environment": env, "rows": rows})
        columns = ["model", "sync", "ms / step", "overhead %", "collectives / step", "KiB / step"]
        table = [
            [r["model"], r["sync"], r["ms"], r["overhead_pct"], r["calls"], r["kib"]] for r in rows
        ]
        print_table("DDP covariance sync (2 gloo processes)", columns, table)
        sections_md["ddp"] = [
            "### DDP covariance sync (2 CPU processes, gloo)",
            "",
            _markdown(columns, table),
        ]

    # One markdown file per section, and a summary assembled from every section measured so far.
    header = (
        f"Measured on {env['cpu'] if device.type == 'cpu' else env.get('gpu')} ({env['threads']} threads), "
        f"torch {env['torch']}, with `python -m benchmarks.run"
        f"{' --device ' + args.device if device.type != 'cpu' else ''}`."
    )
    for name, lines in sections_md.items():
        (Path(RESULTS) / f"{device.type}-{name}.md").write_text(
            header + "\n\n" + "\n".join(lines) + "\n"
        )
    parts = [(Path(RESULTS) / f"{device.type}-{name}.md") for name in SECTIONS]
    summary = [p.read_text() for p in parts if p.exists()]
    path = Path(RESULTS) / f"{device.type}.md"
    path.write_text("\n".join(summary))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
