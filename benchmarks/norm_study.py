"""Normalization study: why each normalizer helps or hurts, measured.

    python -m benchmarks.norm_study [--quick]

Data: scikit-learn's bundled Digits (1797 8x8 grey images, offline) at their own 8x8
resolution, standardized and repeated to 3 channels (``lightning_whiten.data.Digits.tensors(8)``);
8x8 keeps a ResNet-56 affordable on two CPU cores.

1. **At initialization** (Lubana et al., *Beyond BatchNorm*, NeurIPS 2021): on one batch of 256
   digits, for a ResNet-56 (post-activation basic blocks, widths 32/64/128, 3 x 9 blocks, as the
   authors' ``ResNet56``) and a 20-convolution VGG-style network without residuals (the depth
   of the authors' ``cfg_20``, widths 32-128), with every normalizer in
   :data:`NORMALIZERS`: activation variance, sample cosine similarity and stable rank after
   every ReLU, activation-gradient norm at every convolution
   (:func:`lightning_whiten.diagnostics.init_probes`). Checks the paper's three claims.
2. **During training** (Santurkar et al., NeurIPS 2018): a 10-convolution VGG-style network with
   BN, no normalization, IterNorm, DBN and SWBN, SGD with momentum; training loss against steps
   over 3 seeds, and for seed 0 every few steps the loss range, gradient predictiveness and
   effective beta-smoothness along the gradient and the internal covariate shift
   (:func:`~lightning_whiten.diagnostics.landscape`,
   :func:`~lightning_whiten.diagnostics.covariate_shift`).
3. The cost of these measurements against a training step (what ``NormalizationAnalysis``
   adds).

Writes ``benchmarks/results/norm_study.{json,md}`` and ``norm_study_init.png``,
``norm_study_training.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import lightning_whiten as lw
from lightning_whiten import diagnostics as D
from lightning_whiten.data import Digits

from .common import RESULTS, environment


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each position (ConvNeXt's / timm's ``LayerNorm2d``)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


#: Normalizer name -> factory ``(num_channels) -> nn.Module`` (a BatchNorm2d-like constructor).
#: The whitening layers use their defaults: IterNorm and SWBN 64 channels per group (clamped to
#: the layer's width), DBN 16.
NORMALIZERS: dict[str, Callable[[int], nn.Module]] = {
    "none": lambda c: nn.Identity(),
    "BN": nn.BatchNorm2d,
    # GroupNorm with one group normalizes each sample over (C, H, W): Lubana et al.'s LayerNorm.
    "GN 1 group (LN)": lambda c: nn.GroupNorm(1, c),
    "GN 8 groups": lambda c: nn.GroupNorm(8, c),
    "GN 32 groups": lambda c: nn.GroupNorm(32, c),
    "LayerNorm2d": LayerNorm2d,
    "IN": lambda c: nn.InstanceNorm2d(c, affine=True),
    "IterNorm T1": lambda c: lw.IterNorm(c, iterations=1),
    "IterNorm T5": lambda c: lw.IterNorm(c, iterations=5),
    "DBN": lw.DBN,
    "SWBN": lw.SWBN,
}
# The Lp and streaming normalization layers (constructor like BatchNorm2d(num_features)): one
# line each, taken in as soon as the package has them.
for _name in ("LpNorm", "StreamingNorm"):
    if hasattr(lw, _name):
        NORMALIZERS[_name] = getattr(lw, _name)

#: The normalizers of the training comparison.
TRAINING = ("BN", "none", "IterNorm T5", "DBN", "SWBN")
#: In training, the whitening layers keep BatchNorm in the stem (as the recipes do): the stem's
#: 16 channels come from 3x3 convolutions of one grey channel (repeated three times), so their
#: covariance has rank 9 and DBN's exact inverse square root gives the 7 empty directions a
#: gain of 1/sqrt(eps) in training. The study also runs DBN in the stem (``dbn_stem``) and
#: reports its eval accuracy next to batch statistics.
WHITENING = ("IterNorm T1", "IterNorm T5", "DBN", "SWBN")


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")  # as the authors
    return conv


class BasicBlock(nn.Module):
    """Post-activation block: relu(norm(conv(relu(norm(conv(x))))) + shortcut(x))."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1, self.norm1, self.relu1 = _conv(cin, cout, stride), norm(cout), nn.ReLU()
        self.conv2, self.norm2, self.relu2 = _conv(cout, cout), norm(cout), nn.ReLU()
        self.shortcut = (
            nn.Sequential(_conv(cin, cout, stride), norm(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.norm1(self.conv1(x)))
        return self.relu2(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self, norm: Callable[[int], nn.Module], widths=(32, 64, 128), blocks: int = 9
    ) -> None:
        super().__init__()
        self.conv1, self.norm1, self.relu1 = _conv(3, widths[0]), norm(widths[0]), nn.ReLU()
        stages, cin = [], widths[0]
        for i, width in enumerate(widths):
            stage = []
            for j in range(blocks):
                stage.append(BasicBlock(cin, width, 2 if i > 0 and j == 0 else 1, norm))
                cin = width
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(cin, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.norm1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def resnet56(norm: Callable[[int], nn.Module]) -> nn.Module:
    return ResNet(norm, (32, 64, 128), 9)


#: ``width`` or ``(width, stride)`` per convolution: 20 convolutions without residuals, the
#: authors' ``cfg_20`` depth at a quarter of its width, two stride-2 convolutions (8x8 digits end
#: at 2x2, as ``cfg_20`` on 32x32 CIFAR).
VGG20 = [32, 32, 32, 32, (64, 2), 64, 64, 64, (128, 2), *[128] * 11]
#: The smaller network of the training comparison (10 convolutions).
VGG10 = [16, 16, (32, 2), 32, 32, (64, 2), 64, 64, 128, 128]


class VGG(nn.Module):
    """Convolution-norm-ReLU layers, global average pooling, a linear classifier;
    ``stem_norm`` replaces the first normalization layer."""

    def __init__(
        self,
        norm: Callable[[int], nn.Module],
        config=VGG20,
        stem_norm: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, item in enumerate(config):
            width, stride = item if isinstance(item, tuple) else (item, 1)
            layer_norm = stem_norm if i == 0 and stem_norm is not None else norm
            layers += [_conv(cin, width, stride), layer_norm(width), nn.ReLU()]
            cin = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean((2, 3)))


ARCHITECTURES: dict[str, Callable[[Callable[[int], nn.Module]], nn.Module]] = {
    "ResNet-56": resnet56,
    "VGG-20": lambda norm: VGG(norm, VGG20),
}


# ---------------------------------------------------------------------------------------------
# 1. at initialization
# ---------------------------------------------------------------------------------------------
def init_study(images: Tensor, labels: Tensor, batch_size: int, quick: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    index = torch.randperm(len(images), generator=gen)[:batch_size]
    batch = (images[index], labels[index])
    names = list(NORMALIZERS) if not quick else ["none", "BN", "GN 1 group (LN)", "IN", "DBN"]
    out: dict = {}
    for arch, build in ARCHITECTURES.items():
        out[arch] = {}
        for name in names:
            torch.manual_seed(0)
            model = build(NORMALIZERS[name])
            start = time.perf_counter()
            probes = D.init_probes(model, batch, nn.functional.cross_entropy)
            result = probes.to_dict()
            result["seconds"] = time.perf_counter() - start
            out[arch][name] = result
            s = result["summary"]
            print(
                f"  {arch:9s} {name:16s} growth {s['activation_growth']:10.3g}  "
                f"final cos {s['final_cosine_similarity']:.3f}  rank {s['final_stable_rank']:6.2f}"
                f"  grad first/last {s['gradient_ratio']:9.3g}  ({result['seconds']:.1f}s)",
                flush=True,
            )
    return out


# ---------------------------------------------------------------------------------------------
# 2. during training
# ---------------------------------------------------------------------------------------------
def split(images: Tensor, labels: Tensor, held_out: int = 297) -> tuple:
    gen = torch.Generator().manual_seed(1234)
    perm = torch.randperm(len(images), generator=gen)
    val, train = perm[:held_out], perm[held_out:]
    return (images[train], labels[train]), (images[val], labels[val])


def train_run(
    name: str,
    seed: int,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    steps: int,
    batch_size: int,
    lr: float,
    measure_every: int,
    step_sizes: tuple[float, ...],
    whiten_stem: bool = False,
) -> dict:
    torch.manual_seed(seed)
    stem = nn.BatchNorm2d if name in WHITENING and not whiten_stem else None
    model = VGG(NORMALIZERS[name], VGG10, stem_norm=stem)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.functional.cross_entropy
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = train
    order: list[int] = []
    losses, measured = [], []
    step_seconds = 0.0
    for step in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(x_all), generator=gen).tolist()
        index, order = order[:batch_size], order[batch_size:]
        x, y = x_all[index], y_all[index]
        if measure_every and step % measure_every == 0:
            t0 = time.perf_counter()
            smooth = D.landscape(model, loss_fn, (x, y), step_sizes)
            t1 = time.perf_counter()
            shift = D.covariate_shift(model, loss_fn, (x, y), optimizer)
            t2 = time.perf_counter()
            measured.append({
                "step": step,
                "landscape": smooth,
                "covariate_shift": shift,
                "landscape_ms": (t1 - t0) * 1e3,
                "covariate_shift_ms": (t2 - t1) * 1e3,
            })  # fmt: skip
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_seconds += time.perf_counter() - t0
        losses.append(loss.item())
    with torch.no_grad():
        model.eval()
        accuracy = float((model(val[0]).argmax(1) == val[1]).float().mean())
        model.train()  # normalized with the held-out batch's own statistics
        batch_stats = float((model(val[0]).argmax(1) == val[1]).float().mean())
    return {
        "losses": losses,
        "val_accuracy": accuracy,
        "val_accuracy_batch_stats": batch_stats,
        "step_ms": 1e3 * step_seconds / steps,
        "measured": measured,
    }


def training_study(
    images: Tensor, labels: Tensor, steps: int, seeds: int, measure_every: int
) -> dict:
    train, val = split(images, labels)
    settings = {
        "network": "VGG-10 (widths 16-128)",
        "batch_size": 128,
        "lr": 0.05,
        "momentum": 0.9,
        "steps": steps,
        "seeds": seeds,
        "measure_every": measure_every,
        "step_sizes": list(D.DEFAULT_STEP_SIZES),
        "stem": "BatchNorm for the whitening layers",
        "train_samples": len(train[0]),
        "held_out_samples": len(val[0]),
    }
    out: dict = {"settings": settings, "runs": {}}
    for name in TRAINING:
        runs = []
        for seed in range(seeds):
            start = time.perf_counter()
            run = train_run(
                name, seed, train, val, steps, settings["batch_size"], settings["lr"],
                measure_every if seed == 0 else 0, tuple(settings["step_sizes"]),
            )  # fmt: skip
            run["seconds"] = time.perf_counter() - start
            runs.append(run)
            print(
                f"  {name:12s} seed {seed}: final loss {statistics.mean(run['losses'][-10:]):.4f}"
                f"  val acc {run['val_accuracy']:.3f}  ({run['seconds']:.1f}s)",
                flush=True,
            )
        out["runs"][name] = runs
    if "DBN" in TRAINING:  # the stem whitened too (see WHITENING)
        run = train_run(
            "DBN", 0, train, val, steps, settings["batch_size"], settings["lr"], 0,
            tuple(settings["step_sizes"]), whiten_stem=True,
        )  # fmt: skip
        out["dbn_stem"] = {k: run[k] for k in ("val_accuracy", "val_accuracy_batch_stats")}
        out["dbn_stem"]["final_loss"] = statistics.mean(run["losses"][-10:])
        print(f"  DBN with a DBN stem: {out['dbn_stem']}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# 3. cost
# ---------------------------------------------------------------------------------------------
def cost_study(training: dict) -> dict:
    """Measurement time against training-step time, from the runs above (same process)."""
    out = {}
    for name, runs in training["runs"].items():
        measured = runs[0]["measured"]
        if not measured:
            continue
        step_ms = statistics.median(r["step_ms"] for r in runs)
        landscape_ms = statistics.median(m["landscape_ms"] for m in measured)
        shift_ms = statistics.median(m["covariate_shift_ms"] for m in measured)
        out[name] = {
            "step_ms": step_ms,
            "landscape_ms": landscape_ms,
            "covariate_shift_ms": shift_ms,
            "steps_per_measurement": (landscape_ms + shift_ms) / step_ms,
            "callback_default_pct": 100 * (landscape_ms + shift_ms) / (500 * step_ms),
        }
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _losses(runs: list[dict]) -> tuple[list[float], list[float], list[float]]:
    per_step = list(zip(*(r["losses"] for r in runs), strict=True))
    return (
        [statistics.mean(v) for v in per_step],
        [min(v) for v in per_step],
        [max(v) for v in per_step],
    )


def _smooth_curve(values: list[float], window: int = 10) -> list[float]:
    return [statistics.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def claims(init: dict) -> list[str]:
    """The paper's three claims, checked on our numbers (wording follows the result)."""
    lines = []
    res = init["ResNet-56"]
    if "none" in res and "BN" in res:
        g_none = res["none"]["summary"]["activation_growth"]
        g_bn = res["BN"]["summary"]["activation_growth"]
        holds = g_none > 100 * max(g_bn, 1.0)
        lines.append(
            f"1. **Activation growth without normalization in ResNets**: "
            f"{'holds' if holds else 'does not hold'}. The activation variance grows "
            f"{g_none:.3g}x from the first to the last ReLU of ResNet-56 without a normalizer, "
            f"{g_bn:.3g}x with BN."
        )
    order = [n for n in ("BN", "IN", "GN 32 groups", "GN 8 groups", "GN 1 group (LN)") if n in res]
    for arch in ARCHITECTURES:
        sims = {n: init[arch][n]["summary"]["final_cosine_similarity"] for n in order}
        group_order = [n for n in order if n != "BN"]
        rising = all(sims[a] <= sims[b] + 1e-3 for a, b in itertools.pairwise(group_order))
        worst = max(group_order, key=lambda n: sims[n])
        lines.append(
            f"2. **Sample similarity rises with group size, LayerNorm worst** ({arch}, cosine "
            f"similarity after the last ReLU): "
            + ", ".join(f"{n} {sims[n]:.3f}" for n in order)
            + f". Monotone in group size: {'yes' if rising else 'no'}; highest: {worst}."
        )
    for arch in ARCHITECTURES:
        ratios = {n: init[arch][n]["summary"]["gradient_ratio"] for n in order}
        small = max(ratios.get("IN", 0), ratios.get("GN 32 groups", 0))
        large = ratios.get("GN 1 group (LN)", float("nan"))
        lines.append(
            f"3. **Large early-layer gradients with small groups** ({arch}, activation-gradient "
            f"norm at the first convolution / at the last): "
            + ", ".join(f"{n} {ratios[n]:.3g}" for n in order)
            + f". Small groups above LayerNorm: {'yes' if small > large else 'no'}."
        )
    return lines


def markdown(result: dict) -> str:
    init, training, cost = result["init"], result["training"], result["cost"]
    lines = [
        "Data: scikit-learn's Digits (offline) at their 8x8 resolution, 3 channels.",
        "",
        f"### At initialization (one batch of {result['init_batch_size']}, training mode)",
        "",
        "Per normalizer: activation variance of the last ReLU over the first (growth), cosine "
        "similarity of the samples and stable rank (out of the batch size) after the last "
        "ReLU, mean similarity over all ReLUs, and the activation-gradient norm at the first "
        "convolution over the last. SWBN starts as BatchNorm (its whitening matrix is the "
        "identity until the first update), so its numbers equal BN's; in ResNet-56's first stage "
        "(32 channels) GroupNorm with 32 groups is InstanceNorm.",
        "",
    ]
    for arch, rows in init.items():
        lines += [
            f"**{arch}**",
            "",
            "| normalizer | act. growth | final cos. sim. | mean cos. sim. | final stable rank | "
            "grad first/last |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            s = r["summary"]
            lines.append(
                f"| {name} | {s['activation_growth']:.3g} | {s['final_cosine_similarity']:.3f} | "
                f"{s['mean_cosine_similarity']:.3f} | {s['final_stable_rank']:.1f} | "
                f"{s['gradient_ratio']:.3g} |"
            )
        lines.append("")
    lines += ["**Lubana et al.'s claims on these numbers**", "", *claims(init), ""]
    for arch, rows in init.items():
        if "DBN" not in rows:
            continue
        grads = [v["grad_norm"] for v in rows["DBN"]["layers"].values() if v["kind"] == "conv"]
        bn = [v["grad_norm"] for v in rows["BN"]["layers"].values() if v["kind"] == "conv"]
        lines.append(
            f"DBN's first/last gradient ratio ({arch}) comes from the stem, not from its groups: "
            f"activation-gradient norm {grads[0]:.3g} at the first convolution, {grads[1]:.3g} at "
            f"the second (BN: {bn[0]:.3g}, {bn[1]:.3g}). The stem's channels are 3x3 "
            "convolutions of one grey channel, so their covariance has rank 9 and ZCA's backward "
            "multiplies the empty directions by up to 1/sqrt(eps)."
        )
        lines.append("")
    st = training["settings"]
    lines += [
        f"### During training ({st['network']}, batch {st['batch_size']}, SGD lr {st['lr']} "
        f"momentum {st['momentum']}, {st['steps']} steps, {st['seeds']} seeds; the whitening "
        "layers keep BatchNorm in the stem)",
        "",
        "Training loss (mean of the last 10 steps; mean and range over seeds), held-out accuracy "
        f"({st['held_out_samples']} digits), and for seed 0 every {st['measure_every']} steps: "
        "loss range and gradient change along the gradient (step sizes "
        f"{', '.join(str(e) for e in st['step_sizes'])}; the widest range seen), effective "
        "beta-smoothness (median), internal covariate shift (l2 and cosine, mean over layers and "
        "steps).",
        "",
        "| normalizer | final loss | val. acc. | loss range width | max grad change | beta | "
        "ICS l2 | ICS cos | step ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in training["runs"].items():
        finals = [statistics.mean(r["losses"][-10:]) for r in runs]
        accs = [r["val_accuracy"] for r in runs]
        measured = runs[0]["measured"]
        widths = [
            m["landscape"]["loss_range"][1] - m["landscape"]["loss_range"][0] for m in measured
        ]
        changes = [m["landscape"]["gradient_predictiveness"][1] for m in measured]
        betas = [m["landscape"]["beta_smoothness"] for m in measured]
        l2 = [_mean([v["l2"] for v in m["covariate_shift"].values()]) for m in measured]
        cos = [_mean([v["cosine"] for v in m["covariate_shift"].values()]) for m in measured]
        lines.append(
            f"| {name} | {statistics.mean(finals):.4f} ({min(finals):.4f}-{max(finals):.4f}) | "
            f"{statistics.mean(accs):.3f} | {max(widths):.3g} | {max(changes):.3g} | "
            f"{statistics.median(betas):.3g} | {_mean(l2):.3g} | {_mean(cos):.3f} | "
            f"{statistics.median(r['step_ms'] for r in runs):.1f} |"
        )
    if "dbn_stem" in training:
        d = training["dbn_stem"]
        lines += [
            "",
            "The whitening layers keep BatchNorm in the stem: with DBN there too (seed 0), "
            f"training converges as well (final loss {d['final_loss']:.4f}) but held-out "
            f"accuracy in eval mode is {d['val_accuracy']:.3f} ({d['val_accuracy_batch_stats']:.3f}"
            " when the held-out batch is normalized with its own statistics). The stem's 16 "
            "channels have a rank-9 covariance (3x3 convolutions of one grey channel); ZCA gives "
            "the 7 empty directions a gain of up to 1/sqrt(eps) in training. DBN's eval matrix "
            "comes from its running covariance, so eval stays close to batch statistics (a "
            "running average of per-batch matrices, whose empty directions move with the "
            "weights, left eval at chance before).",
        ]
    lines += [
        "",
        "### What the measurements cost (NormalizationAnalysis)",
        "",
        f"Landscape with {len(st['step_sizes'])} step sizes ({len(st['step_sizes']) + 1} forward "
        "and backward passes) and covariate shift of all 11 layers (13 passes and an optimizer "
        "step), against a training step of the same run (medians); the last column is the "
        "share of training time at the callback's default of one measurement every 500 steps.",
        "",
        "| normalizer | step ms | landscape ms | covariate shift ms | steps per measurement | "
        "every 500 steps |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in cost.items():
        lines.append(
            f"| {name} | {c['step_ms']:.1f} | {c['landscape_ms']:.1f} | "
            f"{c['covariate_shift_ms']:.1f} | {c['steps_per_measurement']:.1f} | "
            f"{c['callback_default_pct']:.1f}% |"
        )
    lines += ["", f"Total time {result['seconds']:.0f} s ({result['environment']['cpu']}, "
              f"{result['environment']['threads']} threads)."]  # fmt: skip
    return "\n".join(lines)


def plot(result: dict, prefix: str = "norm_study") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    init = result["init"]
    metrics = [
        ("activation", "activation_variance", "activation variance", "log"),
        ("activation", "cosine_similarity", "cosine similarity of samples", "linear"),
        ("activation", "stable_rank", "stable rank", "linear"),
        ("conv", "grad_norm", "activation-gradient norm at conv", "log"),
    ]
    names = list(next(iter(init.values())))
    colors = {n: plt.cm.tab20(i / max(len(names) - 1, 1)) for i, n in enumerate(names)}
    fig, axes = plt.subplots(len(init), len(metrics), figsize=(20, 4.2 * len(init)), squeeze=False)
    for row, (arch, rows) in enumerate(init.items()):
        for col, (kind, metric, label, scale) in enumerate(metrics):
            ax = axes[row][col]
            for name, r in rows.items():
                values = [v[metric] for v in r["layers"].values() if v["kind"] == kind]
                ls = "--" if name in ("IterNorm T1", "IterNorm T5", "DBN", "SWBN") else "-"
                ax.plot(range(1, len(values) + 1), values, ls, label=name, color=colors[name])
            depth = "ReLU" if kind == "activation" else "convolution"
            ax.set(yscale=scale, xlabel=f"{depth} (forward order)", title=f"{arch}: {label}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"At initialization, one batch of {result['init_batch_size']} digits (Lubana et al.'s "
        "probes)"
    )
    fig.tight_layout()
    fig.savefig(RESULTS / f"{prefix}_init.png", dpi=72)
    plt.close(fig)

    training = result["training"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
    for name, runs in training["runs"].items():
        mean, low, high = _losses(runs)
        steps = range(len(mean))
        (line,) = axes[0][0].plot(steps, _smooth_curve(mean), label=name)
        axes[0][0].fill_between(steps, _smooth_curve(low), _smooth_curve(high), alpha=0.2,
                                color=line.get_color())  # fmt: skip
        measured = runs[0]["measured"]
        at = [m["step"] for m in measured]
        c = line.get_color()
        lo = [m["landscape"]["loss_range"][0] for m in measured]
        hi = [m["landscape"]["loss_range"][1] for m in measured]
        axes[0][1].fill_between(at, lo, hi, alpha=0.3, color=c, label=name)
        glo = [m["landscape"]["gradient_predictiveness"][0] for m in measured]
        ghi = [m["landscape"]["gradient_predictiveness"][1] for m in measured]
        axes[0][2].fill_between(at, glo, ghi, alpha=0.3, color=c, label=name)
        axes[1][0].plot(at, [m["landscape"]["beta_smoothness"] for m in measured], "o-", color=c,
                        label=name)  # fmt: skip
        axes[1][1].plot(at, [_mean([v["l2"] for v in m["covariate_shift"].values()])
                             for m in measured], "o-", color=c, label=name)  # fmt: skip
        axes[1][2].plot(at, [_mean([v["cosine"] for v in m["covariate_shift"].values()])
                             for m in measured], "o-", color=c, label=name)  # fmt: skip
    st = training["settings"]
    axes[0][0].set(title=f"training loss ({st['seeds']} seeds: mean, range; 10-step average)",
                   xlabel="step", yscale="log")  # fmt: skip
    axes[0][1].set(title="loss landscape: L(w - eta g), range over eta", xlabel="step",
                   yscale="log")  # fmt: skip
    axes[0][2].set(title="gradient predictiveness: ||g - grad L(w - eta g)||", xlabel="step",
                   yscale="log")  # fmt: skip
    axes[1][0].set(title="effective beta-smoothness", xlabel="step", yscale="log")
    axes[1][1].set(title="internal covariate shift: l2 (mean over layers)", xlabel="step",
                   yscale="log")  # fmt: skip
    axes[1][2].set(title="internal covariate shift: cosine (mean over layers)", xlabel="step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"During training: {st['network']} on digits, SGD lr {st['lr']} (Santurkar et al.)"
    )
    fig.tight_layout()
    fig.savefig(RESULTS / f"{prefix}_training.png", dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer normalizers and steps; writes norm_study_quick.* (not the committed results)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="redo the markdown and plots from the JSON"
    )
    args = parser.parse_args(argv)
    name = "norm_study_quick" if args.quick else "norm_study"
    if args.report_only:
        result = json.loads((RESULTS / f"{name}.json").read_text())
        (RESULTS / f"{name}.md").write_text(markdown(result) + "\n")
        plot(result, name)
        print(markdown(result))
        return 0
    start = time.perf_counter()
    images, labels = Digits.tensors(8)
    batch_size = 256
    print("1. at initialization", flush=True)
    init = init_study(images, labels, batch_size, args.quick)
    print("2. during training", flush=True)
    steps, seeds = (40, 2) if args.quick else (150, 3)
    training = training_study(images, labels, steps, seeds, 10 if args.quick else 15)
    result = {
        "environment": environment(torch.device("cpu")),
        "init_batch_size": batch_size,
        "init": init,
        "training": training,
        "cost": cost_study(training),
    }
    result["seconds"] = time.perf_counter() - start
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result))
    text = markdown(result)
    (RESULTS / f"{name}.md").write_text(text + "\n")
    plot(result, name)
    print(text)
    print(f"\nwrote {RESULTS}/{name}.{{json,md}}, {name}_{{init,training}}.png "
          f"in {result['seconds']:.0f}s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
