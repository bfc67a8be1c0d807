"""The zoo: every registered family on timm and torchvision models nobody chose for the package.

For each model (``pretrained=False``, random BatchNorm running statistics as pretrained weights
have, a small input) and each family: convert -> eval output unchanged -> two SGD steps finite
-> export with the eval output unchanged -> the trained converted state loads strictly into a
freshly converted model; and whether the export loads strictly into the original
architecture. ``tests/test_zoo.py`` runs the same cases; this script prints the family x outcome
summary table (``docs/guide/export.md``)::

    OMP_NUM_THREADS=1 uv run --locked python -m benchmarks.zoo [--models resnet10t ...]
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

import lightning_whiten as lw
from lightning_whiten.registry import families

# (source, name, input size). Small variants of as many architecture families as fit in a
# few CPU minutes; 48 px unless a model needs more (at 32 px the last stage of an ImageNet model
# is 1x1 and batch 4 gives 4 samples per channel: even plain BatchNorm took EfficientNet-Lite0's
# gradients to 2700 in one step; at 48-64 px the last stage is 2x2, 16 samples).
MODELS: list[tuple[str, str, int]] = [
    ("timm", "test_resnet", 48),
    ("timm", "test_efficientnet", 48),
    ("timm", "test_byobnet", 48),
    ("timm", "resnet10t", 48),
    ("timm", "resnetv2_18", 48),  # pre-activation
    ("timm", "mobilenetv2_035", 48),
    ("timm", "mobilenetv3_small_050", 48),
    ("timm", "mobilenetv4_conv_small_035", 48),
    ("timm", "efficientnet_lite0", 48),
    ("timm", "regnetx_002", 48),
    ("timm", "regnety_002", 48),
    ("timm", "rexnet_100", 48),
    ("timm", "ghostnet_050", 48),
    ("timm", "repghostnet_050", 48),  # identity-branch BatchNorms
    ("timm", "lcnet_035", 48),
    ("timm", "tinynet_e", 48),
    ("timm", "hardcorenas_a", 48),
    ("timm", "mixnet_s", 48),  # MixedConv2d: concatenated producers
    ("timm", "fbnetc_100", 48),
    ("timm", "mnasnet_small", 48),
    ("timm", "semnasnet_050", 48),
    ("timm", "spnasnet_100", 48),
    ("timm", "ese_vovnet19b_slim_dw", 48),  # concatenations
    ("timm", "dla46_c", 64),  # its tree aggregation needs >= 64 px
    ("timm", "dpn48b", 48),  # pre-activation + concatenations
    ("timm", "densenet121", 48),  # pre-activation after concatenations
    ("timm", "repvgg_a0", 48),  # identity-branch BatchNorms
    ("timm", "cs3darknet_s", 48),
    ("timm", "efficientvit_b0", 48),
    ("timm", "resnest14d", 48),  # split attention
    ("timm", "fastvit_t8", 64),  # re-parameterizable identity branches
    # BatchNorm on attention layers. At 64 px its last stage is 1x1 (4 samples per channel at
    # batch 4) and even plain BatchNorm's gradients reach 1.4e3 in two steps (96 px: 70), so
    # whether DBN or LpNorm stayed bounded there depended on float summation order (thread
    # count, GEMM layout): a coin toss, not a check.
    ("timm", "efficientvit_m0", 96),
    ("timm", "lcnet_050", 48),
    ("torchvision", "resnet18", 48),
    ("torchvision", "mobilenet_v3_small", 48),
    ("torchvision", "shufflenet_v2_x0_5", 48),
    ("torchvision", "mnasnet0_5", 48),
    ("torchvision", "regnet_x_400mf", 48),
    ("torchvision", "efficientnet_b0", 48),
    ("torchvision", "googlenet", 48),
]

#: Training batch: the issue's. At batch 2 and 32 px the last stages see 2 samples per channel
#: and even plain BatchNorm took RegNetY-200MF's parameters to 2e4 in two steps.
BATCH = 4


def make_model(source: str, name: str) -> nn.Module:
    """A freshly initialized model with 10 classes (no weights are downloaded)."""
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)
    import torchvision

    extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return torchvision.models.get_model(name, weights=None, num_classes=10, **extra)


def randomize_batchnorms(model: nn.Module, seed: int) -> None:
    """Running statistics and affine parameters as a trained model has them (fresh models have
    mean 0, var 1, weight 1, bias 0, under which many conversion mistakes cancel out)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "running_var", None) is None:
                continue
            c = module.running_var.numel()
            module.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
            if getattr(module, "weight", None) is not None:
                module.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=generator))
                module.bias.copy_(0.1 * torch.randn(c, generator=generator))


@dataclass
class Outcome:
    """What happened to one (model, family) case."""

    model: str
    family: str
    status: str  # "ok", "refused", "failed"
    detail: str = ""
    converted: int = 0
    exported_original: bool | None = None  # the export loads strictly into the original class
    checks: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def label(self) -> str:
        if self.status == "ok":
            return "ok, original architecture" if self.exported_original else "ok, 1x1 maps"
        return f"{self.status}: {self.detail}"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max().clamp_min(1.0))
    return float((a - b).abs().max()) / scale


def _eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x).double()


def run_family(
    original: nn.Module, family: str, x: torch.Tensor, model_name: str = "", tol: float = 1e-4
) -> Outcome:
    """One family on one model: ``original`` (eval mode, random BN statistics) is not changed."""
    out = Outcome(model_name, family, "ok")
    fam = families()[family]
    model = copy.deepcopy(original)
    reference = _eval(original, x)
    report = lw.convert(model, family, example_input=x)
    out.converted = len(report.replaced)
    if not out.converted:
        return Outcome(model_name, family, "refused", "nothing converted", 0)
    after = _eval(model, x)
    out.checks["convert"] = _relative(after, reference)
    if fam.targets == "batchnorm" and out.checks["convert"] > tol:
        return Outcome(model_name, family, "failed", f"eval changed by {out.checks['convert']:.3g}")

    # Two SGD steps on random labels.
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    labels = torch.arange(x.shape[0]) % 10
    for _ in range(2):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.flatten(1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    largest = max(float(p.detach().abs().max()) for p in model.parameters())
    out.checks["max_param"] = largest
    trained = _eval(model, x)
    if not (torch.isfinite(loss) and largest < 1e3 and torch.isfinite(trained).all()):
        return Outcome(model_name, family, "failed", f"training: max |param| {largest:.3g}")

    # The trained state loads strictly into a freshly converted model.
    fresh = copy.deepcopy(original)
    lw.convert(fresh, report.spec, example_input=x)
    fresh.load_state_dict(model.state_dict(), strict=True)
    out.checks["reload"] = _relative(_eval(fresh, x), trained)
    if out.checks["reload"] > tol:
        return Outcome(model_name, family, "failed", "reload differs")

    if not fam.folds:
        with_reason = fam.export.split(":")[0]
        try:
            lw.export(model, example_input=x)
        except ValueError as err:
            if fam.export in str(err):
                return Outcome(
                    model_name, family, "refused", f"export ({with_reason})", out.converted
                )
            raise
        return Outcome(model_name, family, "failed", "export did not refuse")
    exported = lw.export(model, example_input=x)
    out.checks["export"] = _relative(_eval(exported, x), trained)
    if out.checks["export"] > tol:
        # Trained eval activations can be large enough to amplify float32 rounding beyond any
        # tolerance: then the same export in float64 must be exact.
        model64 = copy.deepcopy(model).double()
        exported64 = lw.export(model64, example_input=x.double(), check=False)
        out.checks["export64"] = _relative(
            _eval(exported64, x.double()), _eval(model64, x.double())
        )
    if out.checks.get("export64", out.checks["export"]) > tol:
        return Outcome(
            model_name, family, "failed", f"export differs by {out.checks['export']:.3g}"
        )
    restored = copy.deepcopy(original)
    try:
        restored.load_state_dict(exported.state_dict(), strict=True)
    except RuntimeError:
        out.exported_original = False
    else:  # the same modules and weights: the same output, whatever the rounding
        out.exported_original = _relative(_eval(restored, x), _eval(exported, x)) <= 1e-6
    return out


def run_model(source: str, name: str, size: int, family_names: list[str] | None = None):
    """Every family (or ``family_names``) on one model; warnings are silenced."""
    torch.manual_seed(0)
    original = make_model(source, name)
    randomize_batchnorms(original, seed=1)
    original.eval()
    x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(2))
    outcomes = []
    for family in family_names or sorted(families()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            try:
                outcome = run_family(original, family, x, name)
            except Exception as err:
                message = f"{type(err).__name__}: {err}".splitlines()[0][:120]
                outcome = Outcome(name, family, "failed", message)
            outcome.seconds = time.perf_counter() - start
            outcomes.append(outcome)
    return outcomes


def summary(outcomes: list[Outcome]) -> str:
    """A markdown table: family x outcome, counted over models."""
    labels = Counter((o.family, o.label) for o in outcomes)
    lines = ["| family | outcome | models |", "|---|---|---|"]
    for (family, label), n in sorted(labels.items()):
        lines.append(f"| {family} | {label} | {n} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", help="names to run (default: all)")
    parser.add_argument("--families", nargs="*", help="families to run (default: all)")
    parser.add_argument("--verbose", action="store_true", help="one line per case")
    args = parser.parse_args()
    outcomes: list[Outcome] = []
    start, cpu = time.perf_counter(), time.process_time()
    for source, name, size in MODELS:
        if args.models and name not in args.models:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        rows = run_model(source, name, size, args.families)
        outcomes += rows
        if args.verbose:
            print(f"  {name}: {time.process_time() - c0:.1f} s CPU", flush=True)
            for o in rows:
                checks = {k: f"{v:.2g}" for k, v in o.checks.items()}
                print(
                    f"{name:28s} {o.family:10s} {o.seconds:5.1f}s {o.label}  {checks}", flush=True
                )
            print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    print(summary(outcomes))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"\n{len(outcomes)} cases in {wall:.0f} s ({cpu:.0f} s CPU)")


if __name__ == "__main__":
    main()
