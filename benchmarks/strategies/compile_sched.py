"""torch.compile with a float schedule: graphs and step time vs eager (tiny CNN, 2 IterNorm g8 T5)."""

import time

import torch
from torch import nn
from torch._dynamo.utils import counters

import lightning_whiten as lw
from lightning_whiten.schedules import LayerScheduler, Linear

torch.set_num_threads(1)


def build():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    )
    lw.convert(m, "iternorm", group_size=8, iterations=5)
    return m


def run(attr, steps=16, compiled=True):
    torch._dynamo.reset()
    counters.clear()
    m = build()
    f = torch.compile(m) if compiled else m
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    sched = LayerScheduler({attr: Linear(0.3, 0.05, stop=steps, unit="step")} if attr else {}).bind(
        m
    )
    times = []
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))
    for s in range(steps):
        t0 = time.perf_counter()
        sched.apply({"step": float(s)})
        loss = nn.functional.cross_entropy(f(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return counters["stats"]["unique_graphs"], sorted(times[-8:])[4]


for attr in (None, "momentum", "eps"):
    g, tc = run(attr)
    _, te = run(attr, compiled=False)
    print(
        f"schedule={attr}: graphs over 16 steps={g}, median step time of the last 8, compiled/eager={tc / te:.2f}"
    )
