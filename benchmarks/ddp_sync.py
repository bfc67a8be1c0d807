"""The cost of the cross-process covariance sync: 2 gloo processes on CPU, one model."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lightning_whiten as lw
from lightning_whiten.layers import WhiteningNorm


def _worker(rank: int, init_file: str, out_file: str, steps: int) -> None:
    torch.set_num_threads(1)  # two processes share the two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    calls = {"n": 0, "bytes": 0}
    original = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls["n"] += 1
        calls["bytes"] += tensor.numel() * tensor.element_size()
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        torch.manual_seed(0)
        model = timm.create_model("resnet18", pretrained=False, num_classes=10)
        lw.convert(model, "iternorm", group_size=64)
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
        x = torch.randn(16, 3, 64, 64)
        y = torch.randint(0, 10, (16,))
        results: dict[str, dict[str, float]] = {}
        layers = [m for m in model.modules() if isinstance(m, WhiteningNorm)]
        times: dict[str, list[float]] = {"batch": [], "none": []}
        counted: dict[str, tuple[int, int]] = {}
        for step in range(steps):
            for mode in ("batch", "none"):  # interleaved
                for m in layers:
                    m.sync = mode
                calls["n"] = calls["bytes"] = 0
                dist.barrier()
                start = time.perf_counter()
                optimizer.zero_grad()
                nn.functional.cross_entropy(ddp(x), y).backward()
                optimizer.step()
                elapsed = time.perf_counter() - start
                if step >= 2:
                    times[mode].append(elapsed * 1e3)
                counted[mode] = (calls["n"], calls["bytes"])
        for mode in times:
            results[mode] = {
                "ms": statistics.median(times[mode]),
                "calls": counted[mode][0],
                "kib": counted[mode][1] / 1024,
                "layers": len(layers),
            }
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.all_reduce = original
        dist.destroy_process_group()


def run(quick: bool = False) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(
            _worker, args=(os.path.join(tmp, "init"), out, 6 if quick else 15), nprocs=2, join=True
        )
        results = torch.load(out)
    base = results["none"]["ms"]
    model = f"resnet18 IterNorm g64 ({results['batch']['layers']} layers), 2 x 16 x 64px"
    return [
        {
            "model": model,
            "sync": mode,
            "ms": r["ms"],
            "overhead_pct": 100 * (r["ms"] / base - 1),
            "calls": r["calls"],
            "kib": r["kib"],
        }
        for mode, r in results.items()
    ]
