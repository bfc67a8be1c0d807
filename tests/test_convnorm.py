"""ConvNorm (Liu et al., NeurIPS 2021): the preconditioner, the layer, its running estimate.

References written here, in float64, independently of the package:

* :func:`authors_reference`: the authors' ``PreConv.forward`` (``shengliu66/ConvNorm``,
  ``models/prec_conv.py``) step by step, with ``torch.fft`` in place of the removed
  ``torch.rfft``: full convolution (stride 1, padding k - 1), ``V`` from the rfft2 of the kernel
  zero-padded to the output size, ``exp(-0.5 log(sum_j |.|^2))``, multiply, irfft2, crop
  ``k - 1 - padding``, subsample; dilation by an explicitly dilated kernel (their code is only
  right for dilation 1). One deliberate difference: a conv bias is added after the
  preconditioning (theirs adds it before, scaling it by ``V_i(0)``; none of their models has
  one).
* :func:`circular_reference`: the same operator written as a *direct* circular convolution with
  the spatial kernel ``v_i = IFFT2(V_i)`` (full complex FFT, no rfft layout), one roll per tap.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_whiten as lw
from lightning_whiten.functional import convnorm as CF


def dilate(w: torch.Tensor, dilation: tuple[int, int]) -> torch.Tensor:
    dh, dw = dilation
    c_out, c_in, kh, kw = w.shape
    out = w.new_zeros(c_out, c_in, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    out[:, :, ::dh, ::dw] = w
    return out


def authors_reference(x, w, bias, stride, padding, dilation=(1, 1), eps=0.0):
    wd = dilate(w, dilation)
    kh, kw = wd.shape[-2:]
    y = F.conv2d(x, wd, None, padding=(kh - 1, kw - 1))  # their conv2d_forward
    nh, nw = y.shape[-2:]
    pad_kernel = F.pad(wd, [0, nw - kw, 0, nh - kh])
    f_weight = torch.view_as_real(torch.fft.rfft2(pad_kernel))  # their torch.rfft(onesided)
    v = (f_weight**2).sum(-1).sum(1) + eps  # complex_abs, summed over input channels
    v = torch.exp(-0.5 * torch.log(v))
    z = torch.fft.irfft2(torch.fft.rfft2(y) * v, s=(nh, nw))
    sx, sy = kh - 1 - padding[0], kw - 1 - padding[1]  # _truncate_circ_to_cross
    z = z[:, :, sx : nh - sx, sy : nw - sy]
    z = z[..., :: stride[0], :: stride[1]]
    return z if bias is None else z + bias[:, None, None]


def circular_reference(x, w, bias, stride, padding, dilation=(1, 1)):
    wd = dilate(w, dilation)
    kh, kw = wd.shape[-2:]
    y = F.conv2d(x, wd, None, padding=(kh - 1, kw - 1))
    nh, nw = y.shape[-2:]
    spectrum = (torch.fft.fft2(wd, s=(nh, nw)).abs() ** 2).sum(1)  # (C_out, N_h, N_w), full
    v = torch.fft.ifft2(spectrum.rsqrt()).real  # the spatial preconditioning kernel
    z = torch.zeros_like(y)
    for m in range(nh):  # z_i = v_i (circularly convolved with) y_i
        for n in range(nw):
            z += v[:, m, n][None, :, None, None] * torch.roll(y, shifts=(m, n), dims=(-2, -1))
    ch, cw = kh - 1 - padding[0], kw - 1 - padding[1]
    z = z[:, :, ch : nh - ch, cw : nw - cw][..., :: stride[0], :: stride[1]]
    return z if bias is None else z + bias[:, None, None]


def identity_layer(conv: nn.Conv2d, **options) -> lw.ConvNorm2d:
    return lw.ConvNorm2d.from_conv(conv, affine_init="identity", **options).double()


# ---------------------------------------------------------------------------------------------
# The preconditioner
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kernel", "size", "dilation"),
    [((3, 3), (10, 10), (1, 1)), ((3, 2), (7, 9), (1, 1)), ((5, 5), (5, 6), (1, 1)),
     ((3, 3), (12, 11), (2, 3)), ((1, 1), (4, 4), (1, 1))],
)  # fmt: skip
def test_preconditioner_is_the_inverse_root_power_spectrum_of_the_padded_kernel(
    kernel, size, dilation
):
    torch.manual_seed(0)
    w = torch.randn(5, 4, *kernel, dtype=torch.float64)
    v = CF.convnorm_preconditioner(w, size, dilation, eps=0.0)
    assert v.shape == (5, size[0], size[1] // 2 + 1)
    expected = (torch.fft.rfft2(dilate(w, dilation), s=size).abs() ** 2).sum(1).rsqrt()
    torch.testing.assert_close(v, expected, rtol=1e-10, atol=0)
    if kernel == (1, 1):  # the paper's 1x1 case: a scalar per output channel
        scalar = (w**2).sum((1, 2, 3)).rsqrt()
        torch.testing.assert_close(v, scalar[:, None, None].expand_as(v), rtol=1e-12, atol=0)


def test_preconditioned_operator_is_a_tight_frame_at_every_frequency():
    # sum_j |FFT(v_i * a_ij)|^2 == 1, with v_i * a_ij the circular convolution in space.
    torch.manual_seed(1)
    w = torch.randn(3, 6, 3, 3, dtype=torch.float64)
    n = 9
    v_spatial = torch.fft.irfft2(CF.convnorm_preconditioner(w, (n, n), eps=0.0), s=(n, n))
    a = F.pad(w, [0, n - 3, 0, n - 3])
    frame = torch.zeros(3, 6, n, n, dtype=torch.float64)
    for p in range(n):
        for q in range(n):
            frame += v_spatial[:, None, p, q, None, None] * torch.roll(a, (p, q), (-2, -1))
    power = (torch.fft.fft2(frame).abs() ** 2).sum(1)
    torch.testing.assert_close(power, torch.ones_like(power), rtol=1e-10, atol=1e-10)
    # ... while the plain kernel's is far from it
    plain = (torch.fft.fft2(a).abs() ** 2).sum(1)
    assert (plain - 1).abs().max() > 1


def test_zero_kernel_gives_finite_output_and_gradients():
    layer = lw.ConvNorm2d(3, 4, 3, padding=1, bias=False, running_v="cosine")
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0, 1, 1] = 1.0  # channel 0 alive; channels 1-3 have zero kernels
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.weight.grad).all()
    assert torch.count_nonzero(y[:, 1:]) == 0
    layer.eval()
    assert torch.isfinite(layer(x)).all()


# ---------------------------------------------------------------------------------------------
# The layer against the references
# ---------------------------------------------------------------------------------------------
CASES = [
    # kernel, stride, padding, dilation, bias
    ((3, 3), (1, 1), (1, 1), (1, 1), False),
    ((3, 3), (1, 1), (0, 0), (1, 1), True),
    ((3, 3), (2, 2), (1, 1), (1, 1), False),
    ((3, 3), (2, 2), (0, 0), (1, 1), True),
    ((5, 5), (2, 2), (2, 2), (1, 1), False),
    ((3, 2), (2, 1), (1, 0), (1, 1), True),
    ((3, 3), (1, 2), (2, 1), (2, 1), False),
]


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "bias"), CASES)
def test_layer_equals_the_authors_computation_and_a_direct_circular_convolution(
    kernel, stride, padding, dilation, bias
):
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, kernel, stride, padding, dilation, bias=bias).double()
    layer = identity_layer(conv, eps=1e-300)  # eps negligible: the references have none
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    out = layer(x)
    assert out.shape == conv(x).shape  # the shape nn.Conv2d gives
    b = conv.bias.detach() if bias else None
    w = conv.weight.detach()
    torch.testing.assert_close(out, authors_reference(x, w, b, stride, padding, dilation))
    torch.testing.assert_close(out, circular_reference(x, w, b, stride, padding, dilation))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1])
def test_one_by_one_kernels_scale_by_the_inverse_row_norm(stride, padding):
    # The authors compute 1x1 convolutions at stride 1 and subsample; the layer convolves at
    # the stride directly. Both equal V_i * conv(x) with V_i = (sum_j a_ij^2)^(-1/2).
    torch.manual_seed(3)
    conv = nn.Conv2d(6, 5, 1, stride, padding, bias=True).double()
    layer = identity_layer(conv, eps=1e-300)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    scale = (conv.weight.detach() ** 2).sum((1, 2, 3)).rsqrt()[:, None, None]
    bias = conv.bias.detach()[:, None, None]
    expected = F.conv2d(x, conv.weight, None, stride, padding) * scale + bias
    torch.testing.assert_close(layer(x), expected)
    if padding == 0:  # the authors' way: at stride 1, then subsample
        y = F.conv2d(x, conv.weight) * scale + bias
        torch.testing.assert_close(layer(x), y[..., ::stride, ::stride])


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own conv
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding(padding):
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 4, (4, 3), padding=padding).double()
    layer = identity_layer(conv, eps=1e-300)
    x = torch.randn(2, 3, 8, 7, dtype=torch.float64)
    assert layer(x).shape == conv(x).shape
    if padding == "valid":
        expected = authors_reference(x, conv.weight.detach(), conv.bias.detach(), (1, 1), (0, 0))
        torch.testing.assert_close(layer(x), expected)
    else:  # even kernel: torch pads 1 at the top, 2 at the bottom; crop 2 at the top, 1 below
        wd = conv.weight.detach()
        y = F.conv2d(x, wd, padding=(3, 2))
        full = CF.precondition(y, CF.convnorm_preconditioner(wd, y.shape[-2:], eps=1e-300))
        expected = full[..., 2:-1, 1:-1] + conv.bias.detach()[:, None, None]
        torch.testing.assert_close(layer(x), expected)


def test_gradient_flows_through_the_convolution_but_not_through_v():
    # V is computed from the detached weight: the weight gradient is that of a *linear*
    # function of the weight (z = P_V a * x with V held fixed).
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    layer = identity_layer(conv, eps=1e-300)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    g = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    layer(x).backward(g)
    v = CF.convnorm_preconditioner(conv.weight.detach(), (8, 8), eps=1e-300)
    w = conv.weight.detach().clone().requires_grad_()
    z = CF.precondition(F.conv2d(x, w, padding=2), v)[..., 1:-1, 1:-1]
    z.backward(g)
    torch.testing.assert_close(layer.weight.grad, w.grad)


def test_affine_conv_and_batchnorm():
    torch.manual_seed(6)
    layer = lw.ConvNorm2d(3, 4, 3, padding=1, batchnorm=True, affine_init="default").double()
    assert isinstance(layer.bn, nn.BatchNorm2d) and layer.bn.affine
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    pre = CF.convnorm_conv2d(x, layer.weight, layer.bias, 1, 1, preconditioner=None, eps=layer.eps)
    depthwise = F.conv2d(pre, layer.affine_weight, layer.affine_bias, padding=1, groups=4)
    expected = F.batch_norm(depthwise, None, None, training=True, eps=layer.bn.eps)
    torch.testing.assert_close(layer(x), expected)
    plain = lw.ConvNorm2d(3, 4, 3, padding=1, affine=False, batchnorm=True)
    assert plain.affine_weight is None and plain.bn.weight is None  # the authors' BN follows affine


# ---------------------------------------------------------------------------------------------
# Running estimate, resolution, state dict
# ---------------------------------------------------------------------------------------------
def autocorrelation_reference(w: torch.Tensor) -> torch.Tensor:
    c_out, _, kh, kw = w.shape
    r = torch.zeros(c_out, 2 * kh - 1, 2 * kw - 1, dtype=torch.float64)
    a = w.double()
    for th in range(-(kh - 1), kh):
        for tw in range(-(kw - 1), kw):
            for mh in range(kh):
                for mw in range(kw):
                    if 0 <= mh + th < kh and 0 <= mw + tw < kw:
                        r[:, th + kh - 1, tw + kw - 1] += (
                            a[:, :, mh, mw] * a[:, :, mh + th, mw + tw]
                        ).sum(1)
    return r


def train_steps(layer: nn.Module, steps: int, size: int, lr: float = 0.5) -> list[torch.Tensor]:
    """A few SGD steps; returns the weight seen by each training forward."""
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
    seen = []
    for _ in range(steps):
        seen.append(layer.weight.detach().clone())
        loss = (layer(torch.randn(4, layer.in_channels, size, size)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return seen


@pytest.mark.parametrize("mode", ["momentum", "cosine"])
def test_running_estimate_is_the_authors_average_and_evaluates_at_any_resolution(mode):
    torch.manual_seed(7)
    layer = lw.ConvNorm2d(3, 4, 3, stride=2, padding=1, running_v=mode, momentum=0.3, ramp_steps=5)
    assert layer.running_autocorr.shape == (4, 5, 5)
    torch.testing.assert_close(  # starts at the initial weight (eval before training is exact)
        layer.running_autocorr.double(), autocorrelation_reference(layer.weight.detach())
    )
    seen = train_steps(layer, 7, size=8)
    expected = autocorrelation_reference(seen[0])
    for t, w in enumerate(seen, start=1):
        # momentum, or the authors' ramp max(0.5 (cos(pi t / T) + 1), 0.01), t counted from 1
        cosine = max(0.5 * (math.cos(math.pi * min(t, 5) / 5) + 1), 0.01)
        f = 0.3 if mode == "momentum" else cosine
        expected = (1 - f) * expected + f * autocorrelation_reference(w)
    torch.testing.assert_close(layer.running_autocorr.double(), expected, rtol=1e-5, atol=1e-6)
    assert int(layer.num_batches_tracked) == 7

    layer.eval()  # evaluated at 13x11 after training at 8x8: V from the running estimate
    x = torch.randn(2, 3, 13, 11)
    (nh, nw) = (15, 13)
    big = torch.zeros(4, nh, nw, dtype=torch.float64)  # S_N = DFT of the running r, wrapped
    for th in range(-2, 3):
        for tw in range(-2, 3):
            big[:, th % nh, tw % nw] += expected[:, th + 2, tw + 2]
    v = (torch.fft.rfft2(big).real + layer.eps).rsqrt()
    y = F.conv2d(x.double(), layer.weight.detach().double(), padding=2)
    z = torch.fft.irfft2(torch.fft.rfft2(y) * v, s=(nh, nw))[..., 1:-1:2, 1:-1:2]
    z = z + layer.bias.detach().double()[:, None, None]
    z = F.conv2d(
        z,
        layer.affine_weight.detach().double(),
        layer.affine_bias.detach().double(),
        padding=1,
        groups=4,
    )
    torch.testing.assert_close(layer(x).double(), z, rtol=1e-4, atol=1e-5)


def test_running_v_none_recomputes_v_from_the_weights_at_eval():
    torch.manual_seed(8)
    layer = lw.ConvNorm2d(3, 4, 3, padding=1)
    assert layer.running_autocorr is None and "running_autocorr" not in layer.state_dict()
    train_steps(layer, 3, size=8)
    layer.eval()
    x = torch.randn(2, 3, 12, 12)
    pre = CF.convnorm_conv2d(x, layer.weight, layer.bias, 1, 1, eps=layer.eps)
    expected = F.conv2d(pre, layer.affine_weight, layer.affine_bias, padding=1, groups=4)
    torch.testing.assert_close(layer(x), expected)
    # running mode with constant weights gives the same eval output (lr = 0)
    frozen = lw.ConvNorm2d(3, 4, 3, padding=1, running_v="cosine")
    frozen.load_state_dict(layer.state_dict(), strict=False)
    frozen.reset_running_stats()
    train_steps(frozen, 3, size=8, lr=0.0)
    frozen.eval()
    torch.testing.assert_close(frozen(x), layer(x))


def test_a_fresh_model_loads_a_trained_state_dict_strictly():
    torch.manual_seed(9)

    def make():
        return nn.Sequential(
            lw.ConvNorm2d(3, 8, 3, padding=1, running_v="cosine", batchnorm=True),
            nn.ReLU(),
            lw.ConvNorm2d(8, 8, 3, stride=2, padding=1, running_v="momentum"),
            lw.ConvNorm2d(8, 4, 1, running_v="cosine"),
        )

    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(torch.randn(4, 3, 10, 10)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    fresh = make()
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    x = torch.randn(2, 3, 14, 14)  # another resolution
    torch.testing.assert_close(fresh(x), model(x))
    assert int(fresh[0].num_batches_tracked) == 3


def test_nonfinite_weight_never_enters_the_running_estimate():
    layer = lw.ConvNorm2d(2, 3, 3, padding=1, running_v="momentum", momentum=0.5)
    before = layer.running_autocorr.clone()
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = float("nan")
    layer(torch.randn(2, 2, 5, 5))
    torch.testing.assert_close(layer.running_autocorr, before)


# ---------------------------------------------------------------------------------------------
# Options, conversion, numerics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"groups": 2}, "groups"),
        ({"padding_mode": "reflect"}, "padding_mode"),
        ({"padding": 3}, "padding"),
        ({"padding": "same", "stride": 2}, "padding='same'"),
        ({"running_v": "ema"}, "running_v"),
        ({"eps": 0.0}, "eps"),
        ({"momentum": 1.5}, "momentum"),
        ({"ramp_steps": 0}, "ramp_steps"),
        ({"ramp_end": 0.0}, "ramp_end"),
        ({"affine_init": "zeros"}, "affine_init"),
        ({"stride": 0}, "stride"),
        ({"kernel_size": (3, 0)}, "kernel_size"),
    ],
)
def test_bad_options_name_the_class_and_the_option(kwargs, message):
    options = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=f"ConvNorm2d.*{message}"):
        lw.ConvNorm2d(**options)


def test_schedulable_options_are_validated_on_assignment():
    layer = lw.ConvNorm2d(2, 2, 3, running_v="momentum")
    assert set(layer.schedulable) == {"eps", "momentum"}
    layer.momentum = 0.05
    with pytest.raises(ValueError, match="ConvNorm2d: momentum"):
        layer.momentum = -0.1
    with pytest.raises(ValueError, match="ConvNorm2d: eps"):
        layer.eps = float("nan")
    with pytest.raises(ValueError, match="ConvNorm2d: expected 2 input channels"):
        layer(torch.randn(1, 3, 5, 5))


def test_from_conv_copies_the_convolution():
    torch.manual_seed(10)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=True).double().eval()
    conv.bias.requires_grad_(False)
    layer = lw.ConvNorm2d.from_conv(conv, running_v="cosine", batchnorm=True)
    assert layer.weight is not conv.weight
    torch.testing.assert_close(layer.weight, conv.weight)
    torch.testing.assert_close(layer.bias, conv.bias)
    assert not layer.bias.requires_grad and layer.weight.requires_grad
    assert layer.weight.dtype == torch.float64 and not layer.training
    assert (layer.stride, layer.padding, layer.kernel_size) == ((2, 2), (1, 1), (3, 3))
    # identity affine: the layer starts as the preconditioned convolution
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    layer.bn = None
    expected = CF.convnorm_conv2d(x, conv.weight, conv.bias, 2, 1, eps=layer.eps)
    torch.testing.assert_close(layer(x), expected)
    assert "cannot be exported as a plain nn.Conv2d" in lw.ConvNorm2d.export_refusal


def test_from_conv_refuses_what_it_cannot_keep():
    with pytest.raises(ValueError, match="ConvNorm2d: groups"):
        lw.ConvNorm2d.from_conv(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match="from_conv: kernel_size"):
        lw.ConvNorm2d.from_conv(nn.Conv2d(4, 4, 3), kernel_size=5)

    class SamePadding(nn.Conv2d):  # like timm's Conv2dSame: input-dependent padding
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1)))

    with pytest.raises(TypeError, match="overrides the convolution's forward"):
        lw.ConvNorm2d.from_conv(SamePadding(4, 4, 3))


def test_autocast_runs_the_ffts_in_float32_and_keeps_the_input_dtype():
    torch.manual_seed(11)
    layer = lw.ConvNorm2d(4, 6, 3, stride=2, padding=1, running_v="cosine")
    x = torch.randn(2, 4, 10, 10)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        out_bf16 = layer(x.bfloat16())
    assert out.dtype == torch.float32 and out_bf16.dtype == torch.bfloat16
    assert layer.running_autocorr.dtype == torch.float32
    # only the convolution ran in bf16: relative error of bf16 rounding, not of a bf16 FFT
    assert (out - reference).norm() / reference.norm() < 2e-2
    half = lw.ConvNorm2d(4, 6, 3, running_v="momentum").to(torch.bfloat16)
    assert half.running_autocorr.dtype == torch.float32 and half.weight.dtype == torch.bfloat16
    assert half(x.bfloat16()).dtype == torch.bfloat16


def test_channels_last_in_channels_last_out():
    layer = lw.ConvNorm2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    out = layer(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, layer(x.contiguous()))


@pytest.mark.slow  # ~1 minute of compilation on 2 CPU cores
@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex")
def test_compiled_layer_equals_eager_forward_and_backward():
    torch._dynamo.reset()
    torch.manual_seed(12)
    eager = nn.Sequential(
        lw.ConvNorm2d(3, 8, 3, stride=2, padding=1, running_v="cosine", ramp_steps=10),
        lw.ConvNorm2d(8, 4, 1, bias=True),
    )
    compiled_model = nn.Sequential(
        lw.ConvNorm2d(3, 8, 3, stride=2, padding=1, running_v="cosine", ramp_steps=10),
        lw.ConvNorm2d(8, 4, 1, bias=True),
    )
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)  # a graph break raises
    for _ in range(2):
        x = torch.randn(4, 3, 9, 9)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        g = torch.randn_like(ye)
        ye.backward(g)
        yc.backward(g)
        torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            compiled_model[0].weight.grad, eager[0].weight.grad, rtol=1e-4, atol=1e-5
        )
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    eager.eval()
    compiled_model.eval()
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_converted_torchvision_resnet18_trains_with_finite_loss():
    import torchvision

    torch.manual_seed(13)
    model = torchvision.models.resnet18(num_classes=10)
    assert lw.convert(model, "convnorm", running_v="cosine").num_replaced == 20
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]  # it learns the fixed batch
    model.eval()
    assert torch.isfinite(model(torch.randn(2, 3, 48, 48))).all()  # eval at another resolution


# -- the family: converted by the same surgery, export refused with the reason ------------------
def test_convert_replaces_plain_convolutions_and_skips_grouped_ones():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    report = lw.convert(model, "convnorm")
    assert report.num_replaced + report.num_skipped == len(convs)
    for s in report.skipped:
        assert "convolution (groups=" in s.reason and "needs groups=1" in s.reason
        assert convs[s.name].groups > 1
    for r in report.replaced:
        new = model.get_submodule(r.name)
        assert isinstance(new, lw.ConvNorm2d) and new.origin.name == r.name
        torch.testing.assert_close(new.weight, convs[r.name].weight)  # from_conv
    model.train()
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"cannot export ConvNorm2d at 'features.0.0'.*circular"):
        lw.export(model.eval(), example_input=torch.randn(2, 3, 32, 32))


def test_convnorm_options_are_validated_by_the_spec():
    with pytest.raises(TypeError, match="ConvNorm2d does not take the option 'group_size'"):
        lw.ConversionSpec.of("convnorm", group_size=16)
    with pytest.raises(ValueError, match="insert: ConvNorm2d replaces convolutions"):
        lw.ConversionSpec.of("convnorm", insert="fc")


def test_drop_following_norm_removes_exactly_the_norms_after_converted_convolutions(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    report = lw.convert(model, "convnorm", drop_following_norm=True)
    # in resnet18 every BatchNorm (bn1, bn2, downsample.1) directly follows a 3x3/1x1 conv
    assert {r.name for r in report.removed} == norms
    assert report.num_replaced == 20 and "20 removed" in report.title()
    for r in report.removed:
        assert isinstance(model.get_submodule(r.name), torch.nn.Identity)
        assert r.new_type == "Identity" and r.producer.endswith("(trace)")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    # the spec round-trips, and a checkpoint of the converted model loads into a fresh one
    spec = lw.ConversionSpec.from_dict(report.spec.to_dict())
    assert spec.drop_following_norm and spec == report.spec
    fresh = torchvision.models.resnet18(num_classes=10)
    lw.convert(fresh, spec)
    fresh.load_state_dict(model.state_dict())  # strict: the same modules, BN-free


def test_drop_following_norm_keeps_a_fused_activation_and_unconverted_paths():
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        BatchNormAct2d(8, act_layer=torch.nn.ReLU),  # after a converted conv: its ReLU stays
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: not converted
        torch.nn.BatchNorm2d(8),  # so this BN stays
    )
    report = lw.convert(model, "convnorm", drop_following_norm=True)
    assert [r.name for r in report.removed] == ["1"]
    assert isinstance(model[1], torch.nn.ReLU) and isinstance(model[3], torch.nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    expected = model[3](model[2](torch.relu(model[0](x))))
    torch.testing.assert_close(model(x), expected)


def test_drop_following_norm_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="drop_following_norm: IterNorm replaces normalization"):
        lw.ConversionSpec.of("iternorm", drop_following_norm=True)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="drop_following_norm: tracing the model's forward failed"):
        # a 1-channel input for a 3-channel conv: the trace cannot run, and module order is
        # not trusted to remove layers
        lw.convert(
            model, "convnorm", drop_following_norm=True, example_input=torch.randn(1, 1, 8, 8)
        )
