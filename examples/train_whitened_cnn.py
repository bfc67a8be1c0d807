"""Train a small whitened CNN for a few steps on made-up data (CPU, seconds).

    uv run python examples/train_whitened_cnn.py

Shows the layers as drop-in replacements for BatchNorm: the loss falls and the running
statistics are used in eval.
"""

from __future__ import annotations

import torch
from torch import nn

import lightning_whiten as lw


def make_model(norm: str) -> nn.Module:
    def norm_layer(channels: int) -> nn.Module:
        return {
            "bn": lambda: nn.BatchNorm2d(channels),
            "iternorm": lambda: lw.IterNorm(channels, group_size=16, iterations=5),
            "dbn": lambda: lw.DBN(channels, group_size=16),
            "swbn": lambda: lw.SWBN(channels, group_size=16, whitening_rate=1e-3),
        }[norm]()

    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False),
        norm_layer(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False),
        norm_layer(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def main(steps: int = 60) -> None:
    gen = torch.Generator().manual_seed(0)
    # made-up data: 10 classes, each a fixed random image pattern plus noise
    prototypes = torch.randn(10, 3, 16, 16, generator=gen)
    for norm in ("bn", "iternorm", "dbn", "swbn"):
        torch.manual_seed(0)
        model = make_model(norm)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for step in range(steps):
            labels = torch.randint(0, 10, (64,), generator=gen)
            images = prototypes[labels] + torch.randn(64, 3, 16, 16, generator=gen)
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step == 0:
                first = loss.item()
        model.eval()
        with torch.no_grad():
            labels = torch.randint(0, 10, (256,), generator=gen)
            images = prototypes[labels] + torch.randn(256, 3, 16, 16, generator=gen)
            accuracy = (model(images).argmax(1) == labels).float().mean().item()
        print(f"{norm:>8}: loss {first:.3f} -> {loss.item():.3f}, eval accuracy {accuracy:.1%}")


if __name__ == "__main__":
    main()
