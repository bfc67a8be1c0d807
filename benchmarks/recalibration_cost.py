"""Cost of lw.recalibrate(10 batches) vs a training step, interleaved in one process
(ResNetV2-20, IterNorm g16, 32 px digits, batch 64: the quickstart model).

    OMP_NUM_THREADS=1 uv run --locked python benchmarks/recalibration_cost.py
"""

import time

import torch
import torch.nn.functional as F

import lightning_whiten as lw
from lightning_whiten.data import Digits
from lightning_whiten.models.cifar import CIFAR_MODELS

torch.set_num_threads(1)
torch.manual_seed(0)
x, y = Digits.tensors(32)
m = CIFAR_MODELS["resnetv2_20"](num_classes=10)
lw.convert(m, "iternorm", group_size=16, iterations=5)
opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
bs = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 64 * 10, 64)]


def train(n):
    m.train()
    for xb, yb in bs[:n]:
        loss = F.cross_entropy(m(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()


step_t, cal_t = [], []
for _ in range(3):  # interleaved
    t0 = time.perf_counter()
    train(5)
    step_t.append((time.perf_counter() - t0) / 5)
    t0 = time.perf_counter()
    lw.recalibrate(m, bs, num_batches=10)
    cal_t.append(time.perf_counter() - t0)
s, c = min(step_t), min(cal_t)
print(
    f"train step {s:.3f}s, recalibrate(10) {c:.3f}s = {c / s:.2f} steps = {c / (22 * s):.3f} of a 22-step epoch"
)
