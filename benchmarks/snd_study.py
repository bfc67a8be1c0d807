"""SND study: how much a sample's normalized output depends on its mini-batch.

    python -m benchmarks.snd_study [--quick]

Trains a small BatchNorm network on the Digits data (scikit-learn, offline) for a few epochs,
captures the inputs of its 64-channel normalization layer, and measures SND (IterNorm paper,
Huang et al. 2019) of BatchNorm, DBN and IterNorm on those real activations over batch sizes,
group sizes and iteration counts, with the whiteness of the output for context. Writes
``benchmarks/results/snd_study.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn

import lightning_whiten as lw
from lightning_whiten.data import Digits
from lightning_whiten.diagnostics import snd, whiteness

from .common import RESULTS


def capture_activations(epochs: int = 4, samples: int = 1024, seed: int = 0) -> torch.Tensor:
    """Inputs of the last normalization layer (64 channels, 8x8) of a CNN trained on Digits."""
    torch.manual_seed(seed)
    images, labels = Digits.tensors(32)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for idx in torch.randperm(len(images)).split(64):
            loss = nn.functional.cross_entropy(net(images[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    captured = []
    hook = net[7].register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    net.eval()
    with torch.no_grad():
        net(images[:samples])
    hook.remove()
    return captured[0]


def run(quick: bool = False) -> dict:
    start = time.time()
    acts = capture_activations(epochs=2 if quick else 4, samples=512 if quick else 1024)
    c = acts.shape[1]
    probes, batches = (8, 8) if quick else (16, 16)

    def measure(layer: nn.Module, batch: int, relative: bool = False) -> float:
        value = snd(
            layer,
            acts,
            batch_size=batch,
            num_batches=batches,
            probes=probes,
            seed=0,
            relative=relative,
        )
        return float(value)

    result: dict = {"activations": list(acts.shape), "probes": probes, "num_batches": batches}
    sizes = [4, 8, 16, 32, 64, 128]
    methods = {
        "BN": lambda: nn.BatchNorm2d(c),
        "IterNorm g16 T5": lambda: lw.IterNorm(c, group_size=16, iterations=5),
        "IterNorm g64 T5": lambda: lw.IterNorm(c, group_size=64, iterations=5),
        "DBN g16": lambda: lw.DBN(c, group_size=16),
        "DBN g64": lambda: lw.DBN(c, group_size=64),
    }
    result["batch_size"] = {
        name: {str(m): measure(make(), m) for m in sizes} for name, make in methods.items()
    }
    groups = [1, 4, 8, 16, 32, 64]
    result["group_size"] = {
        "DBN": {str(g): measure(lw.DBN(c, group_size=g), 32) for g in groups},
        "IterNorm T5": {str(g): measure(lw.IterNorm(c, group_size=g), 32) for g in groups},
        "DBN (relative)": {str(g): measure(lw.DBN(c, group_size=g), 32, True) for g in groups},
        "IterNorm T5 (relative)": {
            str(g): measure(lw.IterNorm(c, group_size=g), 32, True) for g in groups
        },
    }
    iterations = [1, 2, 3, 5, 7, 10, 15]
    result["iterations"] = {
        "IterNorm g64": {
            str(t): {
                "snd": measure(lw.IterNorm(c, group_size=64, iterations=t, method="coupled"), 32),
                "relative": measure(
                    lw.IterNorm(c, group_size=64, iterations=t, method="coupled"), 32, True
                ),
                "whiteness": whiteness(
                    lw.IterNorm(c, group_size=64, iterations=t, method="coupled"), acts
                ).summary()["whiteness"],
            }
            for t in iterations
        },
        "DBN g64 (T = inf)": {
            "snd": measure(lw.DBN(c, group_size=64), 32),
            "relative": measure(lw.DBN(c, group_size=64), 32, True),
            "whiteness": whiteness(lw.DBN(c, group_size=64), acts).summary()["whiteness"],
        },
        "BN": {
            "snd": measure(nn.BatchNorm2d(c), 32),
            "relative": measure(nn.BatchNorm2d(c), 32, True),
            "whiteness": whiteness(nn.BatchNorm2d(c), acts, group_size=64).summary()["whiteness"],
        },
    }
    result["seconds"] = time.time() - start
    return result


def markdown(result: dict) -> str:
    lines = [
        f"SND on the inputs of a 64-channel layer of a CNN trained on Digits ({result['activations']}), "
        f"{result['probes']} probes x {result['num_batches']} mini-batches.",
        "",
        "**SND vs batch size**",
        "",
    ]
    sizes = list(next(iter(result["batch_size"].values())))
    lines.append("| method | " + " | ".join(f"m={s}" for s in sizes) + " |")
    lines.append("|---|" + "---|" * len(sizes))
    for name, values in result["batch_size"].items():
        lines.append(f"| {name} | " + " | ".join(f"{values[s]:.3f}" for s in sizes) + " |")
    groups = list(next(iter(result["group_size"].values())))
    lines += ["", "**SND vs group size** (batch 32)", ""]
    lines.append("| method | " + " | ".join(f"d={g}" for g in groups) + " |")
    lines.append("|---|" + "---|" * len(groups))
    for name, values in result["group_size"].items():
        lines.append(f"| {name} | " + " | ".join(f"{values[g]:.3f}" for g in groups) + " |")
    its = result["iterations"]["IterNorm g64"]
    lines += ["", "**IterNorm (g64) vs iterations T** (batch 32): disturbance and whitening", ""]
    lines.append("| | " + " | ".join(f"T={t}" for t in its) + " | DBN (T=inf) | BN |")
    lines.append("|---|" + "---|" * (len(its) + 2))
    dbn, bn = result["iterations"]["DBN g64 (T = inf)"], result["iterations"]["BN"]
    lines.append(
        "| SND | "
        + " | ".join(f"{v['snd']:.3f}" for v in its.values())
        + f" | {dbn['snd']:.3f} | {bn['snd']:.3f} |"
    )
    lines.append(
        "| relative SND | "
        + " | ".join(f"{v['relative']:.3f}" for v in its.values())
        + f" | {dbn['relative']:.3f} | {bn['relative']:.3f} |"
    )
    lines.append(
        "| ‖Cov(Y) − I‖/d | "
        + " | ".join(f"{v['whiteness']:.3f}" for v in its.values())
        + f" | {dbn['whiteness']:.3f} | {bn['whiteness']:.3f} |"
    )
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, values in result["batch_size"].items():
        axes[0].plot([int(k) for k in values], list(values.values()), marker="o", label=name)
    axes[0].set(xscale="log", xlabel="batch size m", ylabel="SND", title="SND vs batch size")
    for name, values in result["group_size"].items():
        if "relative" in name:
            axes[1].plot(
                [int(k) for k in values],
                list(values.values()),
                marker="o",
                label=name.replace(" (relative)", ""),
            )
    axes[1].set(
        xscale="log",
        xlabel="channels per group d",
        ylabel="SND / ||E F(x)||",
        title="relative SND vs group size (m=32)",
    )
    its = result["iterations"]["IterNorm g64"]
    t = [int(k) for k in its]
    axes[2].plot(t, [v["snd"] for v in its.values()], marker="o", label="IterNorm g64: SND")
    axes[2].axhline(
        result["iterations"]["DBN g64 (T = inf)"]["snd"], ls="--", color="gray", label="DBN g64 SND"
    )
    ax2 = axes[2].twinx()
    ax2.plot(
        t, [v["whiteness"] for v in its.values()], marker="s", color="tab:red", label="‖Cov(Y)−I‖/d"
    )
    ax2.set_ylabel("‖Cov(Y) − I‖/d", color="tab:red")
    axes[2].set(
        xlabel="iterations T", ylabel="SND", title="IterNorm: stochasticity vs whitening (m=32)"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = run(quick=args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "snd_study.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "snd_study.md").write_text(markdown(result) + "\n")
    plot(result, RESULTS / "snd_study.png")
    print(markdown(result))
    print(f"\nwrote {RESULTS}/snd_study.{{json,md,png}} in {result['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
