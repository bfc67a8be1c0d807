"""Cross-process covariance sync with gloo on CPU: 2 ranks x B equals 1 process x 2B."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lightning_whiten as lw

pytestmark = pytest.mark.distributed

LAYERS = {
    "iternorm": lambda: lw.IterNorm(24, group_size=8, iterations=5, dtype=torch.float64),
    "dbn": lambda: lw.DBN(24, group_size=8, dtype=torch.float64),
    "swbn": lambda: lw.SWBN(24, group_size=8, whitening_rate=0.1, eps=1e-5, dtype=torch.float64),
}


def _worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        errors = []
        for name, make in LAYERS.items():
            # equal and uneven per-rank batches, and a rank with a single sample (what counts is
            # the synced batch, as for SyncBatchNorm)
            for sizes in ((6, 6), (3, 9), (1, 8)):
                torch.manual_seed(0)
                layer = make()
                with torch.no_grad():
                    layer.weight.uniform_(0.5, 1.5)
                    layer.bias.uniform_(-1, 1)
                    layer.running_mean.normal_()  # the shift used by the sync: any shared value
                reference = make()
                reference.load_state_dict(layer.state_dict())
                reference.sync = "none"
                total = sum(sizes)
                gen = torch.Generator().manual_seed(1)
                x = torch.randn(total, 24, 3, 3, generator=gen, dtype=torch.float64) * 2 + 1
                x[:, 8:16] += 0.8 * x[:, :8]  # correlated channels
                g = torch.randn(total, 24, 3, 3, generator=gen, dtype=torch.float64)
                start = sum(sizes[:rank])
                mine = slice(start, start + sizes[rank])

                for step in range(2):  # two steps: the second uses updated running buffers/W
                    xr = x[mine].clone().requires_grad_()
                    y = layer(xr)
                    (y * g[mine]).sum().backward()
                    grads = [layer.weight.grad.clone(), layer.bias.grad.clone()]
                    for t in grads:
                        dist.all_reduce(t)  # what DDP does (as a sum here: the loss is a sum)
                    xf = x.clone().requires_grad_()
                    yf = reference(xf)
                    (yf * g).sum().backward()
                    checks = {
                        "output": (y, yf[mine]),
                        "input grad": (xr.grad, xf.grad[mine]),
                        "weight grad": (grads[0], reference.weight.grad),
                        "bias grad": (grads[1], reference.bias.grad),
                    }
                    for key, buf in reference.named_buffers():
                        if buf is not None and buf.dtype.is_floating_point:
                            checks[key] = (dict(layer.named_buffers())[key], buf)
                    for what, (a, b) in checks.items():
                        if not torch.allclose(a, b, rtol=1e-8, atol=1e-9):
                            errors.append(
                                f"{name} {sizes} step {step} {what}: {(a - b).abs().max():.3g}"
                            )
                    layer.zero_grad()
                    reference.zero_grad()
        torch.save(errors, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    result = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, init_file, result), nprocs=2, join=True)
    for rank in range(2):
        errors = torch.load(f"{result}.{rank}")
        assert not errors, "\n".join(errors)
    assert os.path.exists(f"{result}.1")
