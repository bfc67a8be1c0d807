"""LpNorm: batch normalization by the p-th absolute central moment (Liao et al. 2016)."""

from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
import torchvision
from lp_reference import channel_dims, lp_norm
from torch import nn

import lightning_whiten as lw
from lightning_whiten import functional as F
from lightning_whiten.layers import PerChannelNorm

LAYERS = {
    "lpnorm": lambda c, **kw: lw.LpNorm(c, **kw),
    "streaming": lambda c, **kw: lw.StreamingNorm(c, **kw),
}

SHAPES = [(7, 5), (4, 5, 6), (3, 5, 4, 3), (2, 5, 3, 2, 3)]


def _cl(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_forward_and_backward_match_float64_reference(p, shape, channels_last):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    x = (_cl(x) if channels_last else x).requires_grad_()
    layer = lw.LpNorm(5, p=p, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    y = layer(x)
    grad = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, layer.weight, layer.bias), grad)

    xr = x.detach().clone().requires_grad_()
    w, b = (t.detach().clone().requires_grad_() for t in (layer.weight, layer.bias))
    yr = lp_norm(xr, p, 1e-3, w, b)
    rx, rw, rb = torch.autograd.grad(yr, (xr, w, b), grad)
    for got, want in ((y, yr), (gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert y.is_contiguous(memory_format=torch.channels_last) == (channels_last and x.dim() == 4)


def test_p1_ties_take_sign_zero_and_match_autograd_of_abs():
    # x = mean exactly for the middle element: d|r|/dr at r = 0 is taken as 0 (autograd's abs)
    x = torch.tensor([[-1.0], [0.0], [1.0], [3.0], [-3.0]], dtype=torch.float64)
    x.requires_grad_()
    layer = lw.LpNorm(1, p=1, eps=1e-3, dtype=torch.float64)
    grad = torch.tensor([[0.3], [1.0], [-0.2], [0.5], [0.1]], dtype=torch.float64)
    (gx,) = torch.autograd.grad(layer(x), x, grad)
    xr = x.detach().clone().requires_grad_()
    (rx,) = torch.autograd.grad(lp_norm(xr, 1, 1e-3, torch.ones(1), torch.zeros(1)), xr, grad)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [1.0, 1.5, 3.0])
def test_gradcheck_float64(p):
    torch.manual_seed(0)
    layer = lw.LpNorm(4, p=p, eps=1e-2, dtype=torch.float64)
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    assert torch.autograd.gradcheck(
        lambda t, w, b: F.lp_normalize(t, p, 1e-2, w, b).output,
        (x, layer.weight.detach().requires_grad_(), layer.bias.detach().requires_grad_()),
    )


def test_p2_is_batchnorm_including_running_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6, momentum=0.2)
    lp = lw.LpNorm(6, p=2, momentum=0.2)
    for _ in range(3):
        x = torch.randn(4, 6, 3, 3) * 3 + 1
        xb, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
        yb, yl = bn(xb), lp(xl)
        grad = torch.randn_like(yb)
        yb.backward(grad)
        yl.backward(grad)
        torch.testing.assert_close(yl, yb)
        torch.testing.assert_close(xl.grad, xb.grad)
    torch.testing.assert_close(lp.running_mean, bn.running_mean)
    torch.testing.assert_close(lp.running_moment, bn.running_var)
    torch.testing.assert_close(lp.weight.grad, bn.weight.grad)
    bn.eval(), lp.eval()
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(lp(x), bn(x))


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_running_statistics_average_the_corrected_batch_moments(p):
    torch.manual_seed(0)
    layer = lw.LpNorm(3, p=p, momentum=0.25, dtype=torch.float64)
    mean, moment = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(5, 3, 2, dtype=torch.float64) * 2 - 1
        layer(x)
        dims = channel_dims(x)
        m = x.mean(dims)
        n = x.numel() // 3
        d = (x - m.view(1, -1, 1)).abs().pow(p).mean(dims) * (n / (n - 1)) ** (p / 2)
        mean, moment = 0.75 * mean + 0.25 * m, 0.75 * moment + 0.25 * d
    torch.testing.assert_close(layer.running_mean, mean)
    torch.testing.assert_close(layer.running_moment, moment)
    assert int(layer.num_batches_tracked) == 3


def test_correction_makes_the_running_moment_unbiased_for_gaussian_data():
    # E[mean |x - m|^p] = ((n-1)/n)^(p/2) E|x - mu|^p for Gaussian x: with the correction the
    # average over many small batches is the population moment sqrt(2/pi) (p = 1, sigma = 1).
    torch.manual_seed(0)
    layer = lw.LpNorm(1, p=1, momentum=None, dtype=torch.float64)
    for _ in range(400):
        layer(torch.randn(4, 1, dtype=torch.float64))
    assert abs(float(layer.running_moment) - math.sqrt(2 / math.pi)) < 0.03


def test_momentum_none_is_a_cumulative_average():
    torch.manual_seed(0)
    layer = lw.LpNorm(2, momentum=None, dtype=torch.float64)
    xs = [torch.randn(6, 2, dtype=torch.float64) + i for i in range(3)]
    for x in xs:
        layer(x)
    torch.testing.assert_close(layer.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))


def test_eval_applies_the_inference_map_of_the_running_buffers():
    torch.manual_seed(0)
    layer = lw.LpNorm(4, p=1)
    for _ in range(3):
        layer(torch.randn(8, 4, 5, 5) * 2 + 1)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    layer.eval()
    x = torch.randn(3, 4, 5, 5)
    matrices, offset = layer.inference_map()
    assert matrices.shape == (4, 1, 1) and offset.shape == (4,)
    shape = (1, -1, 1, 1)
    expected = layer.weight.view(shape) * (matrices.view(shape) * (x - offset.view(shape)))
    expected = expected + layer.bias.view(shape)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(
        matrices.view(-1), (layer.running_moment + layer.eps).reciprocal(), rtol=0, atol=0
    )


def test_no_running_stats_uses_batch_statistics_in_eval():
    layer = lw.LpNorm(3, track_running_stats=False).eval()
    x = torch.randn(5, 3)
    torch.testing.assert_close(layer(x), lp_norm(x, 1.0, layer.eps, torch.ones(3), torch.zeros(3)))
    assert layer.running_mean is None


# ------------------------------------------------------------------------------------------
# from_batchnorm and conversion of whole models
# ------------------------------------------------------------------------------------------
def _trained_bn(bn: nn.Module, shape) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.2, 3)
        if getattr(bn, "weight", None) is not None:
            bn.weight.normal_(1, 0.3)
            bn.bias.normal_(0, 0.3)
    return bn.eval()


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("p", [1.0, 2.0, 1.5])
@pytest.mark.parametrize(
    ("bn_cls", "shape"),
    [
        (nn.BatchNorm1d, (4, 6)),
        (nn.BatchNorm1d, (4, 6, 5)),
        (nn.BatchNorm2d, (3, 6, 4, 4)),
        (nn.BatchNorm3d, (2, 6, 2, 3, 3)),
        (nn.SyncBatchNorm, (3, 6, 4, 4)),
    ],
)
def test_from_batchnorm_preserves_eval_output(name, p, bn_cls, shape):
    bn = _trained_bn(bn_cls(6, eps=1e-3, momentum=0.05), shape)
    x = torch.randn(shape)
    layer = LAYERS[name](6, p=p).from_batchnorm(bn, p=p)
    assert not layer.training and layer.momentum == 0.05
    torch.testing.assert_close(layer(x), bn(x), rtol=1e-5, atol=1e-5)
    # The Gaussian factor: the running moment is that of a Gaussian with BN's variance.
    factor = F.gaussian_abs_moment(p) ** (1 / p)
    torch.testing.assert_close(layer.weight, bn.weight * factor)
    torch.testing.assert_close(
        (layer.running_moment + layer.eps) ** (1 / p), factor * (bn.running_var + 1e-3).sqrt()
    )


def test_l1_conversion_uses_the_gaussian_mad_factor_sqrt_2_over_pi():
    assert F.gaussian_abs_moment(1) == pytest.approx(math.sqrt(2 / math.pi))
    assert F.gaussian_abs_moment(2) == pytest.approx(1.0)
    # Gaussian activations: after conversion, the L1 layer in training continues at BN's scale.
    bn = _trained_bn(nn.BatchNorm2d(8), None).train()
    layer = lw.LpNorm.from_batchnorm(bn, p=1)
    x = torch.randn(64, 8, 8, 8) * 1.7 + 0.4
    torch.testing.assert_close(layer(x), bn(x), rtol=0.03, atol=0.03)


@pytest.mark.parametrize("name", list(LAYERS))
def test_from_batchnorm_timm_batchnormact_and_frozen(name):
    from timm.layers import BatchNormAct2d
    from torchvision.ops import FrozenBatchNorm2d

    x = torch.randn(2, 6, 3, 3)
    bna = _trained_bn(BatchNormAct2d(6, apply_act=False), None)
    layer = LAYERS[name](6).from_batchnorm(bna)
    torch.testing.assert_close(layer(x), bna(x), rtol=1e-5, atol=1e-5)

    frozen = FrozenBatchNorm2d(6)
    frozen.running_mean.normal_()
    frozen.running_var.uniform_(0.5, 2)
    frozen.weight.normal_()
    layer = LAYERS[name](6).from_batchnorm(frozen)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    torch.testing.assert_close(layer.eval()(x), frozen(x), rtol=1e-5, atol=1e-5)


def _replace_batchnorms(model: nn.Module, make) -> int:
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, child_name, make(child))
                count += 1
    return count


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize(
    "make_model",
    [
        lambda: torchvision.models.resnet18(num_classes=10),
        lambda: timm.create_model("resnet18", num_classes=10),
    ],
    ids=["torchvision-resnet18", "timm-resnet18"],
)
def test_every_batchnorm_of_a_model_converts_with_the_same_eval_output(name, make_model):
    torch.manual_seed(0)
    model = make_model()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _trained_bn(m, None)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    cls = lw.LpNorm if name == "lpnorm" else lw.StreamingNorm
    assert _replace_batchnorms(model, lambda bn: cls.from_batchnorm(bn, p=1)) == 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    model.train()  # and it trains: one step changes the eval output
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_from_batchnorm_without_affine_needs_a_weight_for_the_gaussian_factor():
    bn = _trained_bn(nn.BatchNorm2d(3, affine=False), None)
    with pytest.raises(ValueError, match=r"LpNorm.from_batchnorm.*affine=True"):
        lw.LpNorm.from_batchnorm(bn, p=1)
    layer = lw.LpNorm.from_batchnorm(bn, p=1, affine=True)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(layer(x), bn(x), rtol=1e-5, atol=1e-5)
    exact = lw.LpNorm.from_batchnorm(bn, p=2)
    assert exact.weight is None
    torch.testing.assert_close(exact(x), bn(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Numerics and module plumbing (both layers)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYERS))
def test_non_finite_batch_never_enters_running_statistics(name):
    torch.manual_seed(0)
    layer = LAYERS[name](3)
    layer(torch.randn(4, 3, 2, 2)).sum().backward()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"non-finite.*left unchanged"):
        y = layer(x)
    y.sum().backward()
    for key, value in layer.state_dict().items():
        if key != "num_batches_tracked" and not key.startswith("grad_"):
            torch.testing.assert_close(value, before[key], msg=key, equal_nan=False)
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_moment).all()
    assert int(layer.nonfinite_batches) == 1


@pytest.mark.parametrize("name", list(LAYERS))
def test_half_precision_module_keeps_float32_statistics(name):
    layer = LAYERS[name](4).half()
    assert layer.weight.dtype == torch.float16
    assert all(b.dtype in (torch.float32, torch.long) for b in layer.buffers())
    x = torch.randn(6, 4, 3, 3, dtype=torch.float16)
    y = layer(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


@pytest.mark.parametrize("name", list(LAYERS))
def test_bf16_autocast_keeps_statistics_in_float32(name):
    torch.manual_seed(0)
    layer = LAYERS[name](4)
    x = torch.randn(6, 4, 3, 3) * 5 + 20
    reference = LAYERS[name](4)
    expected = reference(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert layer.running_mean.dtype == torch.float32
    # statistics from the bf16 input, computed in float32: close to the float32 run
    torch.testing.assert_close(layer.running_mean, reference.running_mean, rtol=1e-2, atol=0.05)
    torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", list(LAYERS))
def test_state_dict_round_trip_and_extra_repr(name):
    torch.manual_seed(0)
    layer = LAYERS[name](3, p=1.5, eps=1e-4)
    for _ in range(2):
        layer(torch.randn(5, 3)).sum().backward()
    copy = LAYERS[name](3, p=1.5, eps=1e-4)
    copy.load_state_dict(layer.state_dict())
    layer.eval(), copy.eval()
    x = torch.randn(4, 3)
    torch.testing.assert_close(copy(x), layer(x))
    text = repr(layer)
    assert f"{type(layer).__name__}(3, p=1.5, eps=0.0001" in text
    assert "affine=True" in text and "momentum=" in text


@pytest.mark.parametrize("name", list(LAYERS))
def test_bad_options_and_inputs_name_the_layer_and_the_option(name):
    make = LAYERS[name]
    cls = type(make(2)).__name__
    for bad in (0.5, 0, -1, float("nan"), "1", True):
        with pytest.raises(ValueError, match=rf"{cls}: p must be a real number >= 1"):
            make(3, p=bad)
    with pytest.raises(ValueError, match=rf"{cls}: eps must be a positive"):
        make(3, eps=0)
    with pytest.raises(ValueError, match=rf"{cls}: momentum must be"):
        make(3, momentum=1.5)
    with pytest.raises(ValueError, match=rf"{cls}: num_features"):
        make(0)
    layer = make(3)
    with pytest.raises(ValueError, match=rf"{cls}: eps must be a positive"):
        layer.eps = -1.0  # a schedule setting it later is validated too
    with pytest.raises(ValueError, match=rf"{cls}: momentum must be"):
        layer.momentum = 2
    with pytest.raises(AttributeError, match=rf"{cls}: p is fixed"):
        layer.p = 2
    with pytest.raises(ValueError, match=rf"{cls}\(3, p=1\): expected 3 channels"):
        layer(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"expected an input of shape"):
        layer(torch.randn(4))
    with pytest.raises(TypeError, match=r"floating-point"):
        layer(torch.ones(4, 3, dtype=torch.long))
    assert set(layer.schedulable) >= {"eps", "momentum"}
    assert all(hasattr(layer, attribute) for attribute in layer.schedulable)


def test_lpnorm_refuses_one_sample_per_channel_in_training():
    layer = lw.LpNorm(3)
    with pytest.raises(
        ValueError,
        match=r"LpNorm\(3, p=1\): batch statistics need more than one sample.*StreamingNorm",
    ):
        layer(torch.randn(1, 3))
    layer(torch.randn(1, 3, 2, 2))  # one image, four positions: a batch of four samples
    layer.eval()(torch.randn(1, 3))  # eval: fine


def test_not_converted_by_convert_sync_batchnorm():
    model = nn.Sequential(lw.LpNorm(3), lw.StreamingNorm(3), nn.BatchNorm1d(3))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[0], lw.LpNorm) and isinstance(converted[1], lw.StreamingNorm)
    assert isinstance(converted[2], nn.SyncBatchNorm)
    assert all(isinstance(m, PerChannelNorm) for m in converted[:2])


def test_warning_free_normal_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = lw.LpNorm(3)
        layer(torch.randn(4, 3, 2)).sum().backward()
        layer.eval()(torch.randn(2, 3, 2))


# ------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_lpnorm_equals_eager_without_graph_breaks():
    # fullgraph: a graph break raises; about 30 s of compilation on 2 CPU cores
    p = 1.0
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = lw.LpNorm(6, p=p)
    compiled_layer = lw.LpNorm(6, p=p)
    compiled = torch.compile(compiled_layer, fullgraph=True)
    for step in range(2):
        x = (torch.randn(4, 6, 3, 3) * 2 + 1).contiguous(memory_format=torch.channels_last)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        grad = torch.randn_like(ye)
        ye.backward(grad)
        yc.backward(grad)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5, msg=f"output, step {step}")
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            compiled_layer.weight.grad, eager.weight.grad, rtol=1e-4, atol=1e-5
        )
    torch.testing.assert_close(compiled_layer.running_moment, eager.running_moment)
    eager.eval(), compiled_layer.eval()
    x = torch.randn(3, 6, 3, 3)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(LAYERS))
def test_inference_map_folds_into_the_producing_convolution(name):
    # What export does: conv -> norm in eval is one convolution with
    # W' = weight * m W, b' = weight * m (b - offset) + bias, (matrices, offset) = inference_map().
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    norm = LAYERS[name](6, p=1.5)
    for _ in range(3):
        norm(conv(torch.randn(4, 3, 8, 8))).sum().backward()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    model = nn.Sequential(conv, norm).eval()
    matrices, offset = norm.inference_map()
    scale = norm.weight * matrices.view(-1)
    folded = nn.Conv2d(3, 6, 3, padding=1)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        folded.bias.copy_(scale * (conv.bias - offset) + norm.bias)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_batchnorm_without_running_statistics():
    bn = nn.BatchNorm2d(3, track_running_stats=False)
    x = torch.randn(4, 3, 2, 2) * 2 + 1
    exact = lw.LpNorm.from_batchnorm(bn, p=2).eval()  # batch statistics in eval, as the BN
    assert exact.running_mean is None
    torch.testing.assert_close(exact(x), bn.eval()(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(
        ValueError, match=r"reproduces only for p=2; pass track_running_stats=False"
    ):
        lw.LpNorm.from_batchnorm(bn, p=1)
    with pytest.raises(ValueError, match=r"StreamingNorm.from_batchnorm: .*long-term statistics"):
        lw.StreamingNorm.from_batchnorm(bn)


# -- the family: converted, exported and scheduled through the same surgery --------------------
@pytest.mark.parametrize("layer", ["lpnorm", "streaming"])
@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_convert_and_export_back_to_the_original_architecture(layer, library):
    import timm
    import torchvision

    torch.manual_seed(0)
    build = (
        (lambda: timm.create_model("resnet18", num_classes=10))
        if library == "timm"
        else (lambda: torchvision.models.resnet18(num_classes=10))
    )
    model = build().double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    options = {"p": 1} if layer == "lpnorm" else {}
    report = lw.convert(model, layer, **options)
    assert report.num_replaced == 20 and not report.skipped
    assert all(r.groups == "" for r in report.replaced)  # per channel: no group caps
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-9, atol=1e-9)  # from_batchnorm
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        loss = model(torch.randn(4, 3, 64, 64, dtype=torch.float64)).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(x)
    exported = lw.export(model, example_input=x)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), trained, rtol=1e-9, atol=1e-9)
    fresh = build().double()
    fresh.load_state_dict(exported.state_dict())  # the original architecture, strictly


def test_callback_converts_to_lpnorm_and_schedules_its_options(tmp_path):
    from lightning.pytorch import Trainer, seed_everything
    from lightning_helpers import TinyClassifier, loader

    seed_everything(0)
    model = TinyClassifier(width=16)
    callback = lw.WhiteningCallback(
        "lpnorm", layer_options={"p": 1}, exclude="aux", schedules={"eps": {"type": "linear", "start": 1e-5, "end": 1e-3, "unit": "step", "begin": 0, "stop": 4}}
    )  # fmt: skip
    Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=4, logger=False,
        enable_checkpointing=True, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback],
    ).fit(model, loader())  # fmt: skip
    layers = [m for m in model.modules() if isinstance(m, lw.LpNorm)]
    assert len(layers) == 2 and all(m.eps == pytest.approx(7.525e-4) for m in layers)
    loaded = lw.load_converted(TinyClassifier, next(tmp_path.rglob("*.ckpt")))
    assert sum(isinstance(m, lw.LpNorm) for m in loaded.modules()) == 2
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model.eval()(x))
