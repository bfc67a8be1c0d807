"""ConvNorm's cost: a ResNet-18 training step with every convolution a ConvNorm2d, against the
plain network, and where the time goes (strided convolutions at full resolution, the FFTs).

    uv run python -m benchmarks.convnorm            # writes benchmarks/results/<device>-convnorm.{json,md}
    uv run python -m benchmarks.convnorm --quick

Everything is timed in one process, interleaved (each variant once per round, medians over
rounds), so that a shared machine's drifts hit all variants alike; ratios are what to read.

Layer rows compare, for one convolution of the CIFAR ResNet-18 (forward + backward):

* ``plain``: ``nn.Conv2d`` at its stride;
* ``ConvNorm2d``: the layer (identity affine, no BN): full convolution at stride 1, rfft2,
  multiply by V, irfft2, crop and subsample;
* ``full-resolution conv``: ``nn.Conv2d`` at stride 1 with padding k - 1 (what ConvNorm must
  compute even for a strided layer: the circular preconditioning needs every output of the
  full convolution, so there is no exact cheaper direct path for k > 1);
* for the 1x1 shortcut, ``authors' 1x1`` (stride 1 then subsample, their code) against the
  layer's direct strided convolution (exact: V is a scalar per channel there);
* ``spectral mixing``: the exact alternative that computes the whole preconditioned
  convolution in the Fourier domain (``irfft2(sum_j V_i A_ij X_j)``, complex batched matmul):
  its cost does not depend on the stride, but it is slower on CPU, so the layer does not use it;
* ``V: autocorrelation`` (the layer) against ``V: FFT of the padded kernel`` (the authors').
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lightning_whiten as lw
from lightning_whiten.functional import convnorm as CF
from lightning_whiten.models import resnet18

from .common import RESULTS, environment, median_ms, write_json


def _interleaved(
    fns: dict[str, Any], device: torch.device, rounds: int, repeats: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for label, fn in fns.items():
            times[label].append(median_ms(fn, device, warmup=1, repeats=repeats))
    return times


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def model_rows(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    rows = []
    import torchvision

    configs = {
        "CIFAR ResNet-18 b32 32px": (lambda: resnet18(10), 32, 32),
        "torchvision resnet18 b16 64px": (
            lambda: torchvision.models.resnet18(num_classes=10),
            16,
            64,
        ),
    }
    for name, (make, batch, size) in configs.items():
        torch.manual_seed(0)
        base = make().to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        variants = {"plain (BN)": copy.deepcopy(base)}
        converted = copy.deepcopy(base)
        n = lw.convert(converted, "convnorm", running_v="cosine").num_replaced  # BNs stay
        variants[f"ConvNorm x{n} + BN"] = converted
        steps = {label: _train_step(model, x, y) for label, model in variants.items()}
        times = _interleaved(steps, device, rounds=2 if quick else 5, repeats=2 if quick else 3)
        base_label = "plain (BN)"
        for label in steps:
            rows.append({
                "model": name, "variant": label, "ms": statistics.median(times[label]),
                "vs_plain": _median_ratio(times[label], times[base_label]),
            })  # fmt: skip
    return rows


def spectral_mixing(
    x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int
) -> torch.Tensor:
    """The whole preconditioned convolution in the Fourier domain (exact; not used by the layer)."""
    k = weight.shape[-1]
    size = CF.full_conv_size(x.shape[-2:], k)
    v = CF.convnorm_preconditioner(weight, size)
    spectrum_x = torch.fft.rfft2(x, s=size)
    spectrum_w = torch.fft.rfft2(weight.flip(-1, -2), s=size) * v[:, None]  # cross-correlation
    mixed = torch.einsum("bjhf,ijhf->bihf", spectrum_x, spectrum_w)
    z = torch.fft.irfft2(mixed, s=size)
    c = k - 1 - padding
    return z[..., c : size[0] - c : stride, c : size[1] - c : stride]


def _layer_fns(
    c_in: int, c_out: int, k: int, stride: int, size: int, batch: int, device: torch.device
) -> dict[str, Any]:
    torch.manual_seed(0)
    padding = (k - 1) // 2
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, bias=False).to(device)
    layer = lw.ConvNorm2d.from_conv(conv)
    x = torch.randn(batch, c_in, size, size, device=device, requires_grad=True)

    def fwd_bwd(fn):
        def run():
            x.grad = None
            fn().sum().backward()

        return run

    fns = {"plain": fwd_bwd(lambda: conv(x)), "ConvNorm2d": fwd_bwd(lambda: layer(x))}
    if k > 1:
        full = nn.Conv2d(c_in, c_out, k, 1, k - 1, bias=False).to(device)
        fns["full-resolution conv"] = fwd_bwd(lambda: full(x))
        if stride > 1:
            mixing = lambda: spectral_mixing(x, conv.weight, stride, padding)  # noqa: E731
            torch.testing.assert_close(mixing(), layer(x), rtol=1e-3, atol=1e-3)  # exact
            fns["spectral mixing"] = fwd_bwd(mixing)
    else:  # the authors compute a strided 1x1 at stride 1 and subsample
        fns["authors' 1x1 (stride 1, subsample)"] = fwd_bwd(
            lambda: CF.convnorm_conv2d(x, conv.weight)[..., ::stride, ::stride]
        )
    w = conv.weight.detach()
    fft_size = CF.full_conv_size((size, size), k)
    fns["V: autocorrelation"] = lambda: CF.convnorm_preconditioner(w, fft_size)
    fns["V: FFT of the padded kernel"] = lambda: (
        (torch.fft.rfft2(w, s=fft_size).abs() ** 2).sum(1) + 1e-5
    ).rsqrt()
    return fns


def layer_rows(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    rows = []
    batch = 32
    shapes = [  # the CIFAR ResNet-18's convolutions: (name, C_in, C_out, k, stride, input size)
        ("layer1 3x3 s1", 64, 64, 3, 1, 32),
        ("layer2.0.conv1 3x3 s2", 64, 128, 3, 2, 32),
        ("layer2.0.shortcut 1x1 s2", 64, 128, 1, 2, 32),
        ("layer3 3x3 s1", 256, 256, 3, 1, 8),
        ("layer4.0.conv1 3x3 s2", 256, 512, 3, 2, 8),
    ]
    for name, c_in, c_out, k, stride, size in shapes:
        fns = _layer_fns(c_in, c_out, k, stride, size, batch, device)
        times = _interleaved(fns, device, rounds=2 if quick else 5, repeats=2 if quick else 5)
        for label in fns:
            rows.append({
                "layer": f"{name} ({c_in}->{c_out}, {size}px, b{batch})", "variant": label,
                "ms": statistics.median(times[label]),
                "vs_plain": _median_ratio(times[label], times["plain"]),
            })  # fmt: skip
    return rows


def markdown(
    env: dict[str, Any], models: list[dict[str, Any]], layers: list[dict[str, Any]]
) -> str:
    lines = [
        f"Measured on {env['cpu'] if env['device'] == 'cpu' else env.get('gpu')} "
        f"({env['threads']} threads), torch {env['torch']}, with `python -m benchmarks.convnorm`.",
        "",
        "### ConvNorm: training step (forward, backward, SGD), every convolution converted",
        "",
        "| model | variant | ms | vs plain |",
        "|---|---|---|---|",
    ]
    for r in models:
        lines.append(f"| {r['model']} | {r['variant']} | {r['ms']:.1f} | {r['vs_plain']:.2f}x |")
    lines += [
        "",
        "### ConvNorm: one layer, forward + backward (V rows: computing V only)",
        "",
        "| layer | variant | ms | vs plain |",
        "|---|---|---|---|",
    ]
    for r in layers:
        lines.append(f"| {r['layer']} | {r['variant']} | {r['ms']:.2f} | {r['vs_plain']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    env = environment(device)
    models = model_rows(device, args.quick)
    layers = layer_rows(device, args.quick)
    text = markdown(env, models, layers)
    print(text)
    write_json(f"{device.type}-convnorm", {"environment": env, "models": models, "layers": layers})
    (RESULTS / f"{device.type}-convnorm.md").write_text(text)


if __name__ == "__main__":
    main()
