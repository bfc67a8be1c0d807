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


def run(device: torch.device, quick: bool = False) -> list[dict[str, Any]]:
    steps, per_epoch = (60, 30) if quick else (300, 150)
    configs = {
        "no monitor": lambda: None,
        "monitor: overhead every 50 steps": lambda: lw.WhiteningMonitor(
            every_n_steps=50, snd_every_n_epochs=0, summary=False
        ),
        "monitor: defaults (overhead every 50 steps + SND every epoch)": lambda: (
            lw.WhiteningMonitor(summary=False)
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(2):  # interleaved rounds
        for name, make in configs.items():
            times[name].append(_fit(device, make(), steps, per_epoch))
    base = sorted(times["no monitor"])[len(times["no monitor"]) // 2]
    rows = []
    for name, values in times.items():
        ms = sorted(values)[len(values) // 2]
        rows.append(
            {
                "config": f"{name} ({per_epoch} steps/epoch)",
                "ms_per_step": ms,
                "overhead_pct": 100 * (ms / base - 1),
            }
        )
    return rows
