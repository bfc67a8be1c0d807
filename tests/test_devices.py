"""The layers, surgery and a Lightning fit on every available device (CPU always, CUDA when
present), and numerics that do not depend on the user's matmul precision settings."""

from __future__ import annotations

import contextlib
import copy

import pytest
import reference as ref
import timm
import torch
import torchvision
from torch import nn

import lightning_whiten as lw
from lightning_whiten.functional import _backend

MAPS = {
    "iternorm": (lambda **kw: lw.IterNorm(40, group_size=16, iterations=5, **kw),
                 lambda c: ref.newton_inverse_sqrt(c, 5, 1e-5)),
    "dbn": (lambda **kw: lw.DBN(40, group_size=16, **kw), lambda c: ref.zca_inverse_sqrt(c, 1e-5)),
    "swbn": (lambda **kw: lw.SWBN(40, group_size=16, eps=1e-5, **kw),
             lambda c: torch.diag((c.diagonal() + 1e-5).rsqrt())),
}  # fmt: skip


def layer_on(name: str, device: torch.device, dtype=torch.float32) -> nn.Module:
    layer = MAPS[name][0](device=device, dtype=dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    return layer


def against_reference(layer: nn.Module, name: str, x: torch.Tensor) -> tuple[float, float]:
    """Relative errors of the layer's training output and input gradient against the float64
    reference of the paper's formulas."""
    xd = x.detach().double().cpu().requires_grad_()
    weight = layer.weight.detach().double().cpu().requires_grad_()
    bias = layer.bias.detach().double().cpu().requires_grad_()
    y_ref = ref.whiten(xd, 16, MAPS[name][1], weight, bias)
    grad = torch.randn(y_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y_ref.backward(grad)
    xl = x.detach().clone().requires_grad_()
    y = layer(xl)
    y.backward(grad.to(y.dtype).to(y.device))
    out = float((y.double().cpu() - y_ref).norm() / y_ref.norm())
    dx = float((xl.grad.double().cpu() - xd.grad).norm() / xd.grad.norm())
    return out, dx


@pytest.mark.parametrize("name", list(MAPS))
def test_forward_and_backward_match_the_float64_reference(device, name):
    x = ref.correlated((8, 40, 4, 4)).float().to(device)
    out, dx = against_reference(layer_on(name, device), name, x)
    assert out < 1e-5 and dx < 1e-4, (out, dx)


@pytest.mark.parametrize("name", list(MAPS))
def test_from_batchnorm_keeps_eval_output(device, name):
    bn = nn.BatchNorm2d(40).to(device)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
    bn.eval()
    x = torch.randn(4, 40, 3, 3, device=device)
    layer = type(MAPS[name][0]()).from_batchnorm(bn, group_size=16)
    assert layer.running_mean.device.type == device.type
    torch.testing.assert_close(layer(x), bn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MAPS))
def test_chunked_eager_path_equals_the_traceable_path(device, name, monkeypatch):
    # The two implementations of the activation-sized passes (chosen in one place).
    x = (ref.correlated((16, 40, 6, 6)).float() * 2 + 3).to(device)
    monkeypatch.setattr(_backend, "_CHUNK_BYTES", 4096)  # many chunks
    results = []
    for ops in (_backend._Eager, _backend._Traceable):
        monkeypatch.setattr(_backend, "ops", lambda ops=ops: ops)
        layer = layer_on(name, device)
        torch.manual_seed(0)
        with torch.no_grad():
            layer.weight.fill_(1.25)
            layer.bias.fill_(0.5)
        xl = x.clone().requires_grad_()
        y = layer(xl)
        y.backward(torch.ones_like(y) * torch.linspace(-1, 1, y.numel(), device=device).view_as(y))
        results.append((y, xl.grad, layer.weight.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(MAPS))
def test_autocast_keeps_statistics_in_float32(device, name, dtype):
    if device.type == "cpu" and dtype == torch.float16:
        pytest.skip("float16 autocast is a CUDA feature")
    x = ref.correlated((8, 40, 4, 4)).float().to(device)
    layer = layer_on(name, device)
    reference = copy.deepcopy(layer)
    conv = nn.Conv2d(40, 40, 1).to(device)
    with torch.autocast(device.type, dtype=dtype):
        h = conv(x)  # an autocast op: h is in the low precision
        y = layer(h)
    assert h.dtype == dtype and y.dtype == dtype
    assert layer.running_mean.dtype == torch.float32
    y32 = reference(h.float())
    assert float((y.float() - y32).norm() / y32.norm()) < 2e-2


@pytest.mark.parametrize("name", list(MAPS))
def test_channels_last_in_channels_last_out(device, name):
    x = torch.randn(4, 40, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = layer_on(name, device)(x)
    y.sum().backward()
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_compiled_layers_equal_eager(device):
    torch._dynamo.reset()
    try:
        model = nn.Sequential(nn.Conv2d(3, 16, 3), lw.IterNorm(16, group_size=8), nn.ReLU(),
                              nn.Conv2d(16, 16, 3), lw.SWBN(16, group_size=8)).to(device)  # fmt: skip
        compiled_model = copy.deepcopy(model)
        compiled = torch.compile(compiled_model, fullgraph=True)
        x = torch.randn(4, 3, 10, 10, device=device)
        for _ in range(2):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
            compiled(x).sum().backward()
            model(x).sum().backward()
        torch.testing.assert_close(
            compiled_model[0].weight.grad, model[0].weight.grad, rtol=1e-3, atol=1e-4
        )
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: timm.create_model("resnet18", num_classes=10), id="timm-resnet18"),
        pytest.param(
            lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
            id="tv-mobilenet_v3_small",
        ),
    ],
)
def test_surgery_on_models(device, build):
    torch.manual_seed(0)
    model = build().to(device).eval()
    x = torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad():
        before = model(x)
    report = lw.convert(model, "iternorm", group_size=16, example_input=x)
    assert report.num_replaced > 0 and report.trace == "traced"
    assert all(p.device.type == device.type for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    model.train()
    loss = model(torch.randn(8, 3, 64, 64, device=device)).logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)


def test_lightning_fit_a_few_steps(device, tmp_path):
    from lightning.pytorch import Trainer, seed_everything

    seed_everything(0)
    model = lw.ImageClassifier("cifar/resnetv2_20", num_classes=4, lr=0.05)
    data = lw.data.SyntheticImages(
        num_classes=4, image_size=16, num_train=32, num_val=8, batch_size=8
    )
    callback = lw.WhiteningCallback("iternorm", layer_options={"group_size": 16})
    trainer = Trainer(
        accelerator=device.type, devices=1, max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[callback],
    )  # fmt: skip
    trainer.fit(model, data)
    assert callback.report.num_replaced == 19
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


# -- numerics independent of the user's matmul precision ----------------------------------------
@contextlib.contextmanager
def matmul_precision(setting: str):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("setting", ["high", "medium"])
@pytest.mark.parametrize("name", list(MAPS))
def test_numerics_ignore_reduced_matmul_precision(device, name, setting):
    # "medium" runs bfloat16 GEMMs on CPUs with AMX (and on GPUs); "high" runs TF32 on Ampere
    # and later. Covariances, iterations and whitening GEMMs must stay at full float32.
    x = (ref.correlated((16, 40, 6, 6)).float() * 3 + 1).to(device)
    layer = layer_on(name, device)
    baseline = against_reference(copy.deepcopy(layer), name, x)
    with matmul_precision(setting):
        out, dx = against_reference(layer, name, x)
        assert torch.get_float32_matmul_precision() == setting  # the user's setting stays
    assert out < 1e-5 and dx < 1e-4, (setting, out, dx, baseline)
    # eval too: the running map is applied with a full-precision GEMM
    layer.eval()
    expected = layer(x)
    with matmul_precision(setting):
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
