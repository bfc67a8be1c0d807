"""The cost of WhiteningMonitor on a training run (it must stay under 2% of training time)."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_whiten as lw


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = timm.create_model("resnet18", pretrained=False, num_classes=10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class _StepClock(pl.Callback):
    """Wall time of the training steps after ``skip`` warm-up steps (all hooks included)."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.start: float | None = None
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.skip and self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.steps += 1

    def on_train_end(self, trainer, pl_module):
        self.end = time.perf_counter()

    @property
    def ms_per_step(self) -> float:
        return (self.end - self.start) / self.steps * 1e3


def _fit(device: torch.device, monitor: pl.Callback | None, steps: int, per_epoch: int) -> float:
    torch.manual_seed(0)
    data = TensorDataset(
        torch.randn(per_epoch * 16, 3, 64, 64), torch.randint(0, 10, (per_epoch * 16,))
    )
    clock = _StepClock(skip=5)
    callbacks: list[pl.Callback] = [
        clock,
        lw.WhiteningCallback("iternorm", layer_options={"group_size": 64}, log_report=False),
    ]
    if monitor is not None:
        callbacks.append(monitor)
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, max_steps=steps, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(_Classifier(), DataLoader(data, batch_size=16))
    return clock.ms_per_step


class _TimedMonitor(lw.WhiteningMonitor):
    """The monitor, timing its own epoch-end work (SND and whiteness)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epoch_end_ms: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module):
        start = time.perf_counter()
        super().on_train_epoch_end(trainer, pl_module)
        self.epoch_end_ms.append((time.perf_counter() - start) * 1e3)


class _StepStart(pl.Callback):
    def __init__(self) -> None:
        self.start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()


class _StepEnd(pl.Callback):
    """Placed last: each step's duration, every other callback's hooks included."""

    def __init__(self, start: _StepStart) -> None:
        self.start_clock = start
        self.durations: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.durations.append((time.perf_counter() - self.start_clock.start) * 1e3)


def direct(device: torch.device, quick: bool = False, every: int = 10) -> dict[str, float]:
    """Measure the monitor's costs inside one run: sampled vs other steps, and the SND pass."""
    steps, per_epoch = (60, 30) if quick else (300, 150)
    torch.manual_seed(0)
    data = TensorDataset(
        torch.randn(per_epoch * 16, 3, 64, 64), torch.randint(0, 10, (per_epoch * 16,))
    )
    monitor = _TimedMonitor(every_n_steps=every, summary=False)
    start = _StepStart()
    end = _StepEnd(start)
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, max_steps=steps, logger=False,
        callbacks=[start, lw.WhiteningCallback("iternorm", layer_options={"group_size": 64}, log_report=False), monitor, end],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(_Classifier(), DataLoader(data, batch_size=16))
    sampled = [d for i, d in enumerate(end.durations) if (i + 1) % every == 0 and i > 5]
    others = [d for i, d in enumerate(end.durations) if (i + 1) % every != 0 and i > 5]
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {
        "step_ms": median(others),
        "sampled_extra_ms": median(sampled) - median(others),
        "snd_ms": sum(monitor.epoch_end_ms) / max(len(monitor.epoch_end_ms), 1),
        "per_epoch": per_epoch,
        "layers": len(monitor.layers),
    }


def run(device: torch.device, quick: bool = False) -> list[dict[str, Any]]:
    d = direct(device, quick)
    rows = []
    for every, epoch_steps in ((50, d["per_epoch"]), (50, 500), (200, 500)):
        cost = d["sampled_extra_ms"] / every + d["snd_ms"] / epoch_steps
        rows.append({
            "config": f"overhead every {every} steps, SND every epoch of {epoch_steps} steps",
            "ms_per_step": cost,
            "overhead_pct": 100 * cost / d["step_ms"],
        })  # fmt: skip
    rows.insert(
        0,
        {
            "config": f"measured: step (resnet18, IterNorm x{d['layers']}, b16 64px)",
            "ms_per_step": d["step_ms"],
            "overhead_pct": None,
        },
    )
    rows.insert(
        1,
        {
            "config": "measured: extra time of a sampled step (timing hooks)",
            "ms_per_step": d["sampled_extra_ms"],
            "overhead_pct": None,
        },
    )
    rows.insert(
        2,
        {
            "config": "measured: SND + whiteness of all layers, once per epoch",
            "ms_per_step": d["snd_ms"],
            "overhead_pct": None,
        },
    )
    return rows
