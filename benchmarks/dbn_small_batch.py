"""DBN at small batches: how large parameters get after two SGD steps, by samples per channel.

Every BatchNorm of a model (random running statistics, as pretrained weights have) becomes DBN
with groups of 16; two SGD steps (lr 0.01, random labels) at 64 px; the largest parameter and
whether eval stays finite are printed for each ``min_samples_per_channel`` (the cap of the
whitened group: ``m // k`` channels for ``m`` samples per channel; ``off`` whitens whole groups
whatever the batch, as before the cap). Run::

    OMP_NUM_THREADS=1 uv run --locked python -m benchmarks.dbn_small_batch
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import lightning_whiten as lw
from benchmarks.zoo import make_model, randomize_batchnorms

MODELS = [("timm", "mobilenetv2_050"), ("timm", "fbnetc_100"), ("torchvision", "regnet_x_400mf")]


def run(source: str, name: str, ratio: float | None, batch: int, size: int, steps: int = 2):
    torch.manual_seed(0)
    model = make_model(source, name)
    randomize_batchnorms(model, seed=1)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(3))
    previous = lw.DBN.min_samples_per_channel
    lw.DBN.min_samples_per_channel = 1e-9 if ratio is None else ratio
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lw.convert(model, "dbn", group_size=16, example_input=x[:2])
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            model.train()
            losses = []
            for _ in range(steps):
                loss = torch.nn.functional.cross_entropy(model(x), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss))
            model.eval()
            with torch.no_grad():
                out = model(x)
    finally:
        lw.DBN.min_samples_per_channel = previous
    largest = max(float(p.detach().abs().max()) for p in model.parameters())
    return largest, losses, bool(torch.isfinite(out).all())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    args = parser.parse_args()
    print("| model | batch | min samples/channel | max abs param | losses | eval finite | s |")
    print("|---|---|---|---|---|---|---|")
    for source, name in MODELS:
        for batch in args.batches:
            ratios = [None, 1.0, 2.0, 4.0] if batch == min(args.batches) else [None, 2.0]
            for ratio in ratios:
                start = time.perf_counter()
                largest, losses, finite = run(source, name, ratio, batch, args.size)
                label = "off" if ratio is None else f"{ratio:g}"
                loss_text = " -> ".join(f"{v:.3g}" for v in losses)
                print(
                    f"| {name} | {batch} | {label} | {largest:.3g} | {loss_text} | {finite} | "
                    f"{time.perf_counter() - start:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
