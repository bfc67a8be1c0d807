"""GPU benchmarks for ``benchmarks/gpu_check.sh``: ``python -m benchmarks.gpu [--quick]``.

Writes ``benchmarks/results/gpu-*.json`` and ``benchmarks/results/gpu.md``:

* layers: forward + backward at the issue's shapes, fp32 and bf16 autocast, as ratios to
  ``nn.BatchNorm2d`` (cuDNN) measured in interleaved rounds in this process;
* resnet50 training step with every BN converted, per layer, and its peak memory;
* torch.compile: the IterNorm resnet50 step compiled against eager;
* CUDA graphs: capture and replay of a whole IterNorm training step (needs a step without
  host synchronization).

``--device cpu --quick`` runs the same code on tiny shapes: a dry run of the script's logic.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Any

import timm
import torch
from torch import nn

import lightning_whiten as lw

from . import layers, models
from .common import RESULTS, environment, median_ms, print_table, write_json
from .run import _markdown

TARGET_SHAPE = (64, 256, 56, 56)


def _train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer):
    def step():
        optimizer.zero_grad(set_to_none=False)
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    return step


def compile_rows(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    arch, batch, size = ("resnet18", 4, 32) if quick else ("resnet50", 64, 224)
    torch.manual_seed(0)
    base = timm.create_model(arch, num_classes=100).to(device)
    lw.convert(base, "iternorm", group_size=64, iterations=5)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    eager = copy.deepcopy(base)
    compiled_model = copy.deepcopy(base)
    compiled = torch.compile(compiled_model)
    steps = {
        "eager": _train_step(eager, images, labels, torch.optim.SGD(eager.parameters(), lr=0.01)),
        "torch.compile": _train_step(
            compiled, images, labels, torch.optim.SGD(compiled_model.parameters(), lr=0.01)
        ),
    }
    start = time.time()
    steps["torch.compile"]()  # compilation
    compile_s = time.time() - start
    times = {
        k: median_ms(step, device, warmup=2, repeats=3 if quick else 10)
        for k, step in steps.items()
    }
    return [
        {"model": f"{arch} IterNorm g64 b{batch} {size}px", "mode": k, "ms": v,
         "vs_eager": v / times["eager"], "compile_s": compile_s if k != "eager" else None}
        for k, v in times.items()
    ]  # fmt: skip


def cuda_graph_rows(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    """Capture a whole training step in a CUDA graph and replay it (fails if any op syncs)."""
    if device.type != "cuda":
        return [
            {"model": "-", "capture": "skipped (needs CUDA)", "eager_ms": None, "graph_ms": None}
        ]
    arch, batch, size = ("resnet18", 8, 64) if quick else ("resnet50", 64, 224)
    rows = []
    for layer, options in (("iternorm", {"group_size": 64}), ("swbn", {"group_size": 64})):
        torch.manual_seed(0)
        model = timm.create_model(arch, num_classes=100).to(device)
        lw.convert(model, layer, **options)
        images = torch.randn(batch, 3, size, size, device=device)
        labels = torch.randint(0, 100, (batch,), device=device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        step = _train_step(model, images, labels, optimizer)
        eager_ms = median_ms(step, device, warmup=3, repeats=5)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                step()
            status = "captured"
            graph_ms = median_ms(graph.replay, device, warmup=3, repeats=10)
        except Exception as err:  # report what broke the capture
            status = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            graph_ms = None
        rows.append({"model": f"{arch} {layer} b{batch}", "capture": status,
                     "eager_ms": eager_ms, "graph_ms": graph_ms})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    tag = "gpu" if device.type == "cuda" else "gpu-dryrun"
    shapes = [(2, 32, 8, 8)] if args.quick else [TARGET_SHAPE, *layers.SHAPES]
    md = [f"Measured on {env.get('gpu', env['cpu'])}, torch {env['torch']}, with `bash benchmarks/gpu_check.sh`.", ""]  # fmt: skip
    sections: dict[str, Any] = {"environment": env}

    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        rows = layers.run(device, quick=args.quick, shapes=shapes, dtype=dtype, plain=False)
        sections[f"layers_{label}"] = rows
        columns = ["shape", "layer", "ms", "x BN", "peak MB", "memory x BN"]
        table = [[r["shape"], r["layer"], r["ms"], r["vs_bn"], r["peak_mb"], r["mem_vs_bn"]] for r in rows]  # fmt: skip
        print_table(f"layers, {label}: forward + backward", columns, table)
        md += [f"### Layers ({label}): forward + backward", "", _markdown(columns, table), ""]

    if args.quick:
        models.MODELS = {"resnet18": ("resnet18", 4, 32)}
    else:
        models.MODELS = {"resnet50": ("resnet50", 64, 224)}
    rows = models.run(device, quick=args.quick)
    sections["models"] = rows
    columns = ["model", "normalization", "step ms", "x BN", "peak MB", "memory x BN"]
    table = [[r["model"], r["layer"], r["ms"], r["vs_bn"], r["peak_mb"], r["mem_vs_bn"]] for r in rows]  # fmt: skip
    print_table("models: training step", columns, table)
    md += [
        "### Models: a training step (forward, backward, SGD)",
        "",
        _markdown(columns, table),
        "",
    ]

    rows = compile_rows(device, args.quick)
    sections["compile"] = rows
    columns = ["model", "mode", "step ms", "x eager", "compile s"]
    table = [[r["model"], r["mode"], r["ms"], r["vs_eager"], r["compile_s"]] for r in rows]
    print_table("torch.compile", columns, table)
    md += ["### torch.compile (default mode)", "", _markdown(columns, table), ""]

    rows = cuda_graph_rows(device, args.quick)
    sections["cuda_graphs"] = rows
    columns = ["model", "capture", "eager ms", "graph replay ms"]
    table = [[r["model"], r["capture"], r["eager_ms"], r["graph_ms"]] for r in rows]
    print_table("CUDA graphs: a whole training step", columns, table)
    md += ["### CUDA graphs: capture of a whole training step", "", _markdown(columns, table), ""]

    write_json(tag, sections)
    (RESULTS / f"{tag}.md").write_text("\n".join(md))
    print(f"wrote {RESULTS / (tag + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
