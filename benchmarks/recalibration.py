"""Eval accuracy with the running statistics left as training made them vs re-estimated by
``lw.recalibrate`` at the final weights, after fast training, SWA and EMA (issue 23, items 1-3).

Setup (the issue's): a CIFAR ResNetV2-20 on scikit-learn's digits at 16 px (grey copied to
RGB), every BatchNorm converted (group size 16), SGD lr 0.1 momentum 0.9, batch 64,
``--steps`` steps; held-out 20% of the digits for eval.

    OMP_NUM_THREADS=1 uv run --locked python benchmarks/recalibration.py --steps 100 --seeds 0

Prints one table row per (family, seed): eval accuracy with the running statistics ("left"),
recalibrated on N training batches with the averaged covariance ("cov N") and with averaged
per-batch matrices ("matrix 20"), with batch statistics in eval ("batch"), and the SWA / EMA
models left vs recalibrated; plus the cost of recalibration relative to a training epoch.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import lightning_whiten as lw
from lightning_whiten.data import Digits
from lightning_whiten.models.cifar import CIFAR_MODELS

LAYERS = {
    "dbn": {"group_size": 16},
    "iternorm": {"group_size": 16},
    "swbn": {"group_size": 16},
    "bn": None,
}


def data(size: int, seed: int = 0):
    x, y = Digits.tensors(size)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen)
    cut = int(0.8 * len(y))
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])


def batches(x, y, batch_size, gen):
    perm = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y) - batch_size + 1, batch_size):
        idx = perm[i : i + batch_size]
        yield x[idx], y[idx]


@torch.no_grad()
def accuracy(model, x, y, batch_stats=False) -> float:
    model.eval()
    if batch_stats:  # every norm layer with batch statistics, no update
        saved = copy.deepcopy(model.state_dict())
        for m in model.modules():
            if hasattr(m, "running_mean") or isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()
        out = torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])
        model.load_state_dict(saved)
        model.eval()
    else:
        out = torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])
    return float((out.argmax(1) == y).float().mean())


def build(layer: str, seed: int):
    torch.manual_seed(seed)
    model = CIFAR_MODELS["resnetv2_20"](num_classes=10)
    if LAYERS[layer] is not None:
        lw.convert(model, layer, **LAYERS[layer])
    return model


def run(layer: str, seed: int, steps: int, size: int, n_values, swa_from: float, ema_decay: float):
    (xt, yt), (xv, yv) = data(size)
    model = build(layer, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    swa = AveragedModel(model)  # parameters only (use_buffers=False), as Lightning's SWA
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
    gen = torch.Generator().manual_seed(seed)
    step, t_train = 0, 0.0
    while step < steps:
        for xb, yb in batches(xt, yt, 64, gen):
            model.train()
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            t_train += time.perf_counter() - t0
            step += 1
            ema.update_parameters(model)
            if step >= swa_from * steps:
                swa.update_parameters(model)
            if step >= steps:
                break
    epoch_steps = len(yt) // 64
    row = {"left": accuracy(model, xv, yv), "batch": accuracy(model, xv, yv, batch_stats=True)}
    calib = list(batches(xt, yt, 64, torch.Generator().manual_seed(seed + 1)))
    t_cal = {}
    for n in n_values:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        lw.recalibrate(m, calib, num_batches=n)
        t_cal[n] = time.perf_counter() - t0
        row[f"cov {n}"] = accuracy(m, xv, yv)
    m = copy.deepcopy(model)
    lw.recalibrate(m, calib, num_batches=20, whitening_estimate="matrix")
    row["matrix 20"] = accuracy(m, xv, yv)
    # SWA: averaged parameters, the last iterate's buffers (what Lightning's SWA leaves when
    # it finds no _BatchNorm to update); EMA: averaged parameters and buffers.
    swa_model = copy.deepcopy(model)
    swa_model.load_state_dict(swa.module.state_dict(), strict=False)
    for p, q in zip(swa_model.parameters(), swa.module.parameters(), strict=True):
        p.data.copy_(q.data)
    row["swa left"] = accuracy(swa_model, xv, yv)
    lw.recalibrate(swa_model, calib, num_batches=20)
    row["swa recal"] = accuracy(swa_model, xv, yv)
    ema_model = copy.deepcopy(ema.module)
    row["ema left"] = accuracy(ema_model, xv, yv)
    lw.recalibrate(ema_model, calib, num_batches=20)
    row["ema recal"] = accuracy(ema_model, xv, yv)
    cost = {n: t / (t_train / step * epoch_steps) for n, t in t_cal.items()}
    return row, cost


def estimates(layer: str, seed: int, steps: int, size: int, calib_sizes, n: int) -> dict:
    """IterNorm's two estimates of the eval matrix at several calibration batch sizes (the
    per-batch covariance is noisier in smaller batches)."""
    (xt, yt), (xv, yv) = data(size)
    model = build(layer, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    while step < steps:
        for xb, yb in batches(xt, yt, 64, gen):
            model.train()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    row = {}
    for b in calib_sizes:
        calib = list(batches(xt, yt, b, torch.Generator().manual_seed(seed + 1)))
        for estimate in ("covariance", "matrix"):
            m = copy.deepcopy(model)
            lw.recalibrate(m, calib, num_batches=n * 64 // b, whitening_estimate=estimate)
            row[f"{estimate[:3]} b{b}"] = accuracy(m, xv, yv)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS))
    parser.add_argument("--n", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--swa-from", type=float, default=0.75)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument(
        "--estimates",
        type=int,
        nargs="*",
        default=None,
        help="compare IterNorm's covariance/matrix estimates at these calibration "
        "batch sizes (same number of samples: N * 64) instead",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = None
    if args.estimates:
        for seed in args.seeds:
            row = estimates("iternorm", seed, args.steps, args.size, args.estimates, args.n[0])
            if header is None:
                header = list(row)
                print("| layer | seed | " + " | ".join(header) + " |")
                print("|---" * (len(header) + 2) + "|")
            cells = " | ".join(f"{row[k]:.3f}" for k in header)
            print(f"| iternorm | {seed} | {cells} |", flush=True)
        return
    for layer in args.layers:
        for seed in args.seeds:
            row, cost = run(
                layer, seed, args.steps, args.size, args.n, args.swa_from, args.ema_decay
            )
            if header is None:
                header = list(row)
                print("| layer | seed | " + " | ".join(header) + " | cost (epochs) |")
                print("|---" * (len(header) + 3) + "|")
            costs = ", ".join(f"N={n}: {c:.2f}" for n, c in cost.items())
            cells = " | ".join(f"{row[k]:.3f}" for k in header)
            print(f"| {layer} | {seed} | {cells} | {costs} |", flush=True)


if __name__ == "__main__":
    main()
