"""SWBN's whitening rate: how white its output gets within a short run (issue #29).

    python -m benchmarks.swbn_rate digits   [--steps 150] [--seeds 0] [--variants ...]
    python -m benchmarks.swbn_rate finetune [--steps 90]  [--seeds 0 1] [--variants ...]

timm ``resnet18`` (``pretrained=False``) on scikit-learn's bundled Digits at 32 px, every
BatchNorm converted (``lw.convert``, groups of 16 channels), plain SGD loop on one thread. Every
``--every`` steps the inputs of every normalization layer are captured during the training
step and, after it, the monitor's measures are taken on them: output whiteness
``||Cov(F(x)) - I||_F / d`` per group of 16 (:func:`lightning_whiten.diagnostics.whiteness`,
BN measured in the same groups) and, for SWBN, ``||W - I||_F / sqrt(d)`` (mean over layers).

* ``digits``: from scratch, 10 classes, SGD lr 0.05 momentum 0.9, batch 64 (the issue's setting).
* ``finetune``: a BN resnet18 "pretrained" for ``--pretrain`` steps on digits 0-4 (the proxy for
  hub weights, which are not available offline), then its head replaced and the model converted
  and fine-tuned on digits 5-9 (SGD lr 0.02 momentum 0.9, cosine); validation accuracy on
  held-out digits 5-9.

Variants: ``bn``, ``iternorm``, ``swbn-<kl|fro>-<rate>`` (a number, or ``auto``: the layer's
default rule).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import Tensor, nn

import lightning_whiten as lw
from lightning_whiten.data import Digits
from lightning_whiten.diagnostics import whiteness
from lightning_whiten.layers import SWBN

GROUP = 16
DIGITS = ("bn", "swbn-kl-1e-5", "swbn-kl-auto", "swbn-fro-auto", "iternorm")


def _split(classes: range, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    images, labels = Digits.tensors(32)
    gen = torch.Generator().manual_seed(seed)
    tr, va = [], []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = round(0.2 * len(idx))
        va.append(idx[:n_val])
        tr.append(idx[n_val:])
    tr, va = torch.cat(tr), torch.cat(va)
    offset = classes.start
    return images[tr], labels[tr] - offset, images[va], labels[va] - offset


def _model(num_classes: int) -> nn.Module:
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes)


def _convert(model: nn.Module, variant: str) -> None:
    if variant == "bn":
        return
    if variant == "iternorm":
        lw.convert(model, "iternorm", group_size=GROUP)
        return
    _, criterion, rate = variant.split("-", 2)
    options = {"group_size": GROUP, "criterion": criterion}
    if rate != "auto":
        options["whitening_rate"] = float(rate)
    lw.convert(model, "swbn", **options)


def _norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = (nn.modules.batchnorm._BatchNorm, lw.layers.base.WhiteningNorm)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def _measure(norms, captured) -> dict[str, float]:
    white, dist = [], []
    for name, module in norms:
        x = captured.get(name)
        if x is None:
            continue
        white.append(float(whiteness(module, x, group_size=GROUP).error.mean()))
        if isinstance(module, SWBN):
            w = module.whitening.double()
            d = w.shape[-1]
            eye = torch.eye(d, dtype=w.dtype)
            dist.append(float(torch.linalg.matrix_norm(w - eye).mean() / math.sqrt(d)))
    out = {"whiteness": sum(white) / len(white)}
    if dist:
        out["w_distance"] = sum(dist) / len(dist)
        out["w_distance_max"] = max(dist)
    return out


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def train(model, data, steps, lr, every, seed, cosine=False, batch=64):
    x_tr, y_tr, x_va, y_va = data
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    norms = _norms(model)
    captured: dict[str, Tensor] = {}
    capture = [False]

    def hook(name):
        def pre(module, args):
            if capture[0]:
                captured[name] = args[0].detach().clone()

        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in norms]
    gen = torch.Generator().manual_seed(seed)
    curve, losses = [], []
    model.train()
    t0 = time.perf_counter()
    perm, pos = torch.randperm(len(x_tr), generator=gen), 0
    for step in range(steps + 1):
        if pos + batch > len(perm):
            perm, pos = torch.randperm(len(x_tr), generator=gen), 0
        idx = perm[pos : pos + batch]
        pos += batch
        capture[0] = step % every == 0
        loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
        capture[0] = False
        if step < steps:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
        losses.append(float(loss))
        if step % every == 0:
            curve.append({"step": step, "loss": float(loss), **_measure(norms, captured)})
            captured.clear()
    for h in handles:
        h.remove()
    diverged = sum(int(getattr(m, "diverged_batches", 0)) for _, m in norms)
    return {
        "curve": curve,
        "final_loss": sum(losses[-10:]) / 10,
        "val_acc": _accuracy(model, x_va, y_va),
        "diverged_batches": diverged,
        "finite": all(math.isfinite(v) for v in losses),
        "seconds": time.perf_counter() - t0,
    }


def run_digits(variants, steps, seeds, every):
    data = _split(range(10))
    results = {}
    for variant in variants:
        for seed in seeds:
            torch.manual_seed(seed)
            model = _model(10)
            _convert(model, variant)
            results[f"{variant}/s{seed}"] = train(model, data, steps, 0.05, every, seed)
            _print(variant, seed, results[f"{variant}/s{seed}"])
    return results


def run_finetune(variants, steps, seeds, every, pretrain):
    results = {}
    for seed in seeds:
        torch.manual_seed(100 + seed)
        base = _model(5)
        pre = train(base, _split(range(5), seed), pretrain, 0.05, pretrain, seed)
        print(f"pretrain seed {seed}: val acc on digits 0-4 {pre['val_acc']:.3f}", flush=True)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        data = _split(range(5, 10), seed)
        for variant in variants:
            torch.manual_seed(seed)
            model = _model(5)
            model.load_state_dict(state)
            model.reset_classifier(5)
            _convert(model, variant)
            results[f"{variant}/s{seed}"] = train(
                model, data, steps, 0.02, every, seed, cosine=True
            )
            _print(variant, seed, results[f"{variant}/s{seed}"])
    return results


def _print(variant, seed, r):
    pts = " ".join(
        f"{p['step']}:{p['whiteness']:.3f}"
        + (f"/{p['w_distance']:.3f}" if "w_distance" in p else "")
        for p in r["curve"]
    )
    print(
        f"{variant:18s} s{seed} acc {r['val_acc']:.3f} loss {r['final_loss']:.3f} "
        f"div {r['diverged_batches']} {r['seconds']:.0f}s | {pts}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("setting", choices=("digits", "finetune"))
    parser.add_argument("--variants", nargs="+", default=list(DIGITS))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--pretrain", type=int, default=150)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.setting == "digits":
        results = run_digits(args.variants, args.steps or 150, args.seeds, args.every)
    else:
        results = run_finetune(
            args.variants, args.steps or 90, args.seeds, args.every, args.pretrain
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
