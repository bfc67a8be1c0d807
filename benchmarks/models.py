"""Model level: a full training step (forward, backward, SGD) with every BN converted."""

from __future__ import annotations

import copy
from typing import Any

import timm
import torch
from torch import nn

import lightning_whiten as lw

from .common import median_ms, peak_memory_bytes

MODELS = {
    # name: (timm name, batch, image size) -- CPU-sized; GPU runs use larger batches
    "resnet18": ("resnet18", 32, 128),
    "resnet50": ("resnet50", 16, 128),
}
LAYERS = {
    "BatchNorm (baseline)": None,
    "IterNorm g64 T5": ("iternorm", {"group_size": 64, "iterations": 5}),
    "IterNorm g16 T5": ("iternorm", {"group_size": 16, "iterations": 5}),
    "SWBN g64": ("swbn", {"group_size": 64}),
    "DBN g16": ("dbn", {"group_size": 16}),
}


def _step_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    return step


def run(
    device: torch.device,
    quick: bool = False,
    batch_scale: int = 1,
    models: list[str] | None = None,
    layers: list[str] | None = None,
) -> list[dict[str, Any]]:
    """A training step of each model with every BN converted, interleaved with BN's;
    ``models``/``layers`` pick a subset of :data:`MODELS`/:data:`LAYERS` (BN always runs)."""
    rows = []
    for name, (arch, batch, size) in MODELS.items():
        if models is not None and name not in models:
            continue
        torch.manual_seed(0)
        base = timm.create_model(arch, pretrained=False, num_classes=100).to(device)
        images = torch.randn(batch * batch_scale, 3, size, size, device=device)
        labels = torch.randint(0, 100, (batch * batch_scale,), device=device)
        steps = {}
        for label, spec in LAYERS.items():
            if spec is not None and layers is not None and label not in layers:
                continue
            model = copy.deepcopy(base).train()
            if spec is not None:
                lw.convert(model, spec[0], **spec[1])
            steps[label] = _step_fn(model, images, labels)
        # interleaved rounds: every variant once per round, so slow drifts hit all alike
        times: dict[str, list[float]] = {k: [] for k in steps}
        rounds = 2 if quick else 5
        for _ in range(rounds):
            for label, step in steps.items():
                times[label].append(median_ms(step, device, warmup=1, repeats=2 if quick else 3))
        memory = {label: peak_memory_bytes(step, device) for label, step in steps.items()}
        bn_ms = sorted(times["BatchNorm (baseline)"])[len(times["BatchNorm (baseline)"]) // 2]
        for label in steps:
            ms = sorted(times[label])[len(times[label]) // 2]
            ratios = sorted(
                a / b for a, b in zip(times[label], times["BatchNorm (baseline)"], strict=True)
            )
            rows.append({
                "model": f"{name} b{batch * batch_scale} {size}px",
                "layer": label,
                "ms": ms,
                "vs_bn": ratios[len(ratios) // 2],
                "peak_mb": memory[label] / 2**20,
                "mem_vs_bn": memory[label] / memory["BatchNorm (baseline)"],
            })  # fmt: skip
        del bn_ms
    return rows
