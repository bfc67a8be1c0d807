"""The three whitening layers against float64 references of the papers' formulas."""

from __future__ import annotations

import warnings

import pytest
import reference as ref
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_whiten as lw
from lightning_whiten.functional import _backend as FW

torch.manual_seed(0)

LAYERS = {
    "iternorm": (
        lw.IterNorm,
        {"iterations": 5},
        lambda eps: lambda c: ref.newton_inverse_sqrt(c, 5, eps),
    ),
    "dbn": (lw.DBN, {}, lambda eps: lambda c: ref.zca_inverse_sqrt(c, eps)),
    # SWBN with W = I (a fresh layer): plain BN standardization.
    "swbn": (lw.SWBN, {}, lambda eps: lambda c: torch.diag((c.diagonal() + eps).rsqrt())),
}

SHAPES = [
    pytest.param((64, 40), None, id="N,C"),
    pytest.param((7, 40, 9), None, id="N,C,L"),
    pytest.param((6, 40, 5, 5), None, id="N,C,H,W"),
    pytest.param((6, 40, 5, 5), torch.channels_last, id="N,C,H,W-channels_last"),
    pytest.param((3, 40, 2, 3, 4), None, id="N,C,D,H,W"),
    pytest.param((3, 40, 2, 3, 4), torch.channels_last_3d, id="N,C,D,H,W-channels_last_3d"),
]


def make(name: str, num_features: int = 40, group_size: int = 16, dtype=torch.float64, **kwargs):
    cls, defaults, _ = LAYERS[name]
    options = {**defaults, "eps": 1e-5, **kwargs}
    layer = cls(num_features, group_size=group_size, dtype=dtype, **options)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    return layer


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize(("shape", "memory_format"), SHAPES)
def test_training_forward_and_backward_match_float64_reference(name, shape, memory_format):
    # 40 channels in groups of 16: two full groups and a remainder group of 8.
    layer = make(name)
    layer.min_samples_per_channel = 1  # DBN: whole groups even from 63 samples (the math)
    x = ref.correlated(shape)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    y = layer(x1)
    y_ref = ref.whiten(x2, 16, LAYERS[name][2](1e-5), weight, bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)

    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=1e-8, atol=1e-10)
    if memory_format is not None:
        assert y.is_contiguous(memory_format=memory_format)
        assert x1.grad.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize(
    ("shape", "make_strided"),
    [
        pytest.param((64, 40), lambda x: x.t().contiguous().t(), id="column-major-2d"),
        pytest.param((6, 40, 10), lambda x: x[:, :, ::2], id="strided-3d"),
        pytest.param((4, 40, 3, 5), lambda x: x.transpose(2, 3), id="transposed-4d"),
    ],
)
def test_non_contiguous_inputs_match_contiguous(name, shape, make_strided):
    layer = make(name, **({"whitening_rate": 0.0} if name == "swbn" else {}))
    x = make_strided(ref.correlated(shape))
    assert not x.is_contiguous()
    for training in (True, False):
        layer.train(training)
        torch.testing.assert_close(layer(x), layer(x.contiguous()))


@pytest.mark.parametrize("name", list(LAYERS))
def test_eval_applies_the_affine_map_of_the_running_buffers(name):
    layer = make(name, momentum=0.5)
    for _ in range(3):
        layer(ref.correlated((32, 40, 3, 3)))
    layer.eval()
    x = ref.correlated((5, 40, 3, 3))
    y = layer(x)

    if name == "swbn":
        w = torch.block_diag(*[layer.whitening[g, :s, :s] for g, s in enumerate(layer.group_sizes)])
        matrix = w @ torch.diag((layer.running_var + layer.eps).rsqrt())
    else:
        matrix = torch.block_diag(
            *[layer.running_whitening[g, :s, :s] for g, s in enumerate(layer.group_sizes)]
        )
    xm = ref.as_matrix(x) - layer.running_mean[:, None]
    expected = ref.from_matrix(layer.weight[:, None] * (matrix @ xm) + layer.bias[:, None], x)
    torch.testing.assert_close(y, expected.detach(), rtol=1e-10, atol=1e-10)
    # eval uses only the buffers: another batch does not change the map.
    torch.testing.assert_close(layer(x), y)


@pytest.mark.parametrize("name", ["iternorm", "dbn"])
def test_running_whitening_is_momentum_average_of_batch_matrices(name):
    # IterNorm (as the paper) and SWBN average the batch matrices; DBN averages the
    # (unbiased) batch covariance and takes its ZCA matrix: the matrix of the mean covariance.
    layer = make(name, momentum=0.25)
    x = ref.correlated((64, 40))
    layer(x)
    # (DBN derives its eval matrix when it is read: inference_map, eval, state_dict)
    matrices = layer.inference_map()[0]
    fn = LAYERS[name][2](1e-5)
    covs = ref.batch_covariances(x, 16)
    for g, cov in enumerate(covs):
        s = cov.shape[0]
        eye = torch.eye(s, dtype=torch.float64)
        if name == "dbn":
            running_cov = 0.75 * eye + 0.25 * cov * 64 / 63
            torch.testing.assert_close(layer.running_cov[g, :s, :s], running_cov)
            expected = fn(running_cov)
        else:
            expected = 0.75 * eye + 0.25 * fn(cov)
        torch.testing.assert_close(matrices[g, :s, :s], expected)
    # padding block stays the identity
    torch.testing.assert_close(matrices[2, 8:, 8:], torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close(layer.running_mean, 0.25 * ref.as_matrix(x).mean(1))
    assert int(layer.num_batches_tracked) == 1


def test_momentum_none_is_a_cumulative_average():
    layer = make("iternorm", momentum=None)
    batches = [ref.correlated((32, 40)) for _ in range(3)]
    for b in batches:
        layer(b)
    expected = torch.stack([ref.as_matrix(b).mean(1) for b in batches]).mean(0)
    torch.testing.assert_close(layer.running_mean, expected)


def _output_covariances(y: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    ym = ref.as_matrix(y)
    return [c for c in ref.batch_covariances(y, group_size)] if ym.shape[1] > 1 else []


def test_dbn_output_covariance_is_identity_per_group():
    layer = lw.DBN(40, group_size=16, affine=False, dtype=torch.float64, eps=1e-9)
    y = layer(ref.correlated((512, 40)))
    for cov in _output_covariances(y, 16):
        torch.testing.assert_close(
            cov, torch.eye(cov.shape[0], dtype=torch.float64), atol=1e-6, rtol=0
        )


def test_iternorm_with_many_coupled_iterations_whitens_fully():
    layer = lw.IterNorm(32, group_size=16, iterations=40, method="coupled", affine=False, eps=1e-9)
    x = ref.correlated((2048, 32), dtype=torch.float32, strength=0.5)
    y = layer(x).double()
    for cov in _output_covariances(y, 16):
        torch.testing.assert_close(cov, torch.eye(16, dtype=torch.float64), atol=2e-3, rtol=0)


@pytest.mark.parametrize(("group_size", "paper_variance"), [(16, 0.97), (64, 0.59)])
def test_iternorm_five_iterations_under_whitens_as_in_the_paper(group_size, paper_variance):
    # For an isotropic input Sigma_N = I/d, so P_k = p_k I with p_k = (3 p - p^3 / d) / 2 and
    # the output variance is p_T^2 / d: the paper's deliberate under-whitening at T = 5.
    p = 1.0
    for _ in range(5):
        p = 1.5 * p - 0.5 * p**3 / group_size
    analytic = p**2 / group_size
    assert analytic == pytest.approx(paper_variance, abs=0.01)

    layer = lw.IterNorm(
        group_size, group_size=group_size, iterations=5, affine=False, dtype=torch.float64
    )
    y = layer(torch.randn(200_000, group_size, dtype=torch.float64))
    variance = y.var(0, unbiased=False)
    torch.testing.assert_close(variance.mean().item(), analytic, atol=0.01, rtol=0)
    assert abs(variance.mean().item() - 1.0) > 0.02  # not white


def test_iternorm_coupled_equals_newton_at_small_iterations():
    x = ref.correlated((256, 40))
    for t in (1, 3, 5, 7):
        a = lw.IterNorm(40, group_size=16, iterations=t, method="newton", dtype=torch.float64)(x)
        b = lw.IterNorm(40, group_size=16, iterations=t, method="coupled", dtype=torch.float64)(x)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_iternorm_coupled_is_stable_at_thirty_iterations_in_float32():
    # An ill-conditioned covariance (condition number 100) in float32.
    torch.manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    scales = torch.logspace(0, 1, 16)  # std 1..10 -> covariance condition number 100
    x = (torch.randn(4096, 16) * scales) @ q.T
    coupled = lw.IterNorm(
        16, group_size=16, iterations=30, method="coupled", affine=False, eps=1e-9
    )
    y = coupled(x).double()
    assert torch.isfinite(y).all()
    cov = ref.batch_covariances(y, 16)[0]
    torch.testing.assert_close(cov, torch.eye(16, dtype=torch.float64), atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", list(LAYERS))
def test_gradcheck_float64(name):
    layer = make(name, num_features=6, group_size=4)
    if name == "swbn":
        # W fixed (it is a constant for the backward): a random symmetric matrix, no update.
        layer.whitening_rate = 0.0
        with torch.no_grad():
            a = torch.randn(2, 4, 4, dtype=torch.float64) * 0.2
            layer.whitening.copy_(torch.eye(4, dtype=torch.float64) + a + a.transpose(-1, -2))
    x = ref.correlated((5, 6, 3)).requires_grad_()
    params = (layer.weight, layer.bias)

    def fn(inp, weight, bias):
        layer.weight.data, layer.bias.data = weight, bias
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6)


def test_dbn_eval_map_follows_the_running_covariance_wherever_it_is_read():
    # DBN derives running_whitening = (running_cov + eps I)^-1/2 when it is read, not after
    # every training batch: eval, state_dict, a buffer swap (weight averaging) and an eps
    # schedule must all see the matrix of the current covariance.
    def zca_of(layer):
        return ref.zca_inverse_sqrt(layer.running_cov[0].to(torch.float64), layer.eps)

    layer = lw.DBN(16, group_size=16, momentum=0.5, dtype=torch.float64)
    for _ in range(3):
        layer(ref.correlated((64, 16)))
    torch.testing.assert_close(layer.running_whitening[0], zca_of(layer))  # a plain read
    layer(ref.correlated((64, 16)))
    state = layer.state_dict()
    torch.testing.assert_close(state["running_whitening"][0], zca_of(layer))
    fresh = lw.DBN(16, group_size=16, dtype=torch.float64)
    fresh.load_state_dict(state)
    x = ref.correlated((32, 16))
    torch.testing.assert_close(fresh.eval()(x), layer.eval()(x))
    # running_cov replaced behind the layer's back (EMA/SWA swapping buffers in)
    layer.train()(ref.correlated((64, 16)))
    with torch.no_grad():
        layer.running_cov.copy_(fresh.running_cov)
    torch.testing.assert_close(layer.inference_map()[0], fresh.inference_map()[0])
    # a schedule moving eps
    layer.eps = 1e-2
    torch.testing.assert_close(layer.inference_map()[0][0], zca_of(layer))


def test_dbn_warns_once_when_the_batch_is_too_small_for_its_groups():
    layer = lw.DBN(32, group_size=16)
    with pytest.warns(UserWarning, match=r"12 samples per channel .* groups of 16 channels"):
        layer(torch.randn(3, 32, 2, 2))  # 3 x 2 x 2 = 12 samples: sub-groups of 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(3, 32, 2, 2))  # once per layer
        # 64 samples: 4 per channel, whole groups
        lw.DBN(32, group_size=16)(torch.randn(16, 32, 2, 2))
        lw.IterNorm(32, group_size=16)(torch.randn(3, 32, 2, 2))  # bounded by T: no warning
        layer.eval()(torch.randn(1, 32, 1, 1))  # eval uses running statistics


def test_dbn_backward_is_finite_and_correct_with_repeated_eigenvalues():
    # Rows orthogonal with equal norms: the covariance is a multiple of I (all eigenvalues tie).
    m, d = 64, 8
    basis = torch.randn(m, m, dtype=torch.float64)
    basis[:, 0] = 1.0  # QR keeps the constant direction first: later columns have zero mean
    q, _ = torch.linalg.qr(basis)
    x = (q[:, 1 : d + 1] * m**0.5).requires_grad_()
    x0 = x.detach().clone()
    cov = (x0 - x0.mean(0)).T @ (x0 - x0.mean(0)) / m
    torch.testing.assert_close(cov, torch.eye(d, dtype=torch.float64), atol=1e-10, rtol=0)

    layer = lw.DBN(d, group_size=d, dtype=torch.float64)
    y = layer(x)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    assert torch.isfinite(grad).all()

    # Plain autograd through eigh is not finite here: the pitfall this backward avoids.
    xa = x0.clone().requires_grad_()
    xc = xa - xa.mean(0)
    evals, evecs = torch.linalg.eigh(xc.T @ xc / m + 1e-5 * torch.eye(d, dtype=torch.float64))
    ya = xc @ (evecs @ torch.diag(evals.rsqrt()) @ evecs.T)
    (naive,) = torch.autograd.grad(ya, xa, g)
    assert not torch.isfinite(naive).all() or naive.abs().max() > 1e6

    # ... and ours is the true derivative: central differences along a random direction.
    direction = torch.randn_like(x0)
    h = 1e-6
    with torch.no_grad():
        plus = (layer(x0 + h * direction) * g).sum()
        minus = (layer(x0 - h * direction) * g).sum()
    numeric = (plus - minus) / (2 * h)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(LAYERS))
def test_saved_activation_memory_does_not_grow_with_iterations(name):
    # Only the centered input is kept for backward (as BatchNorm keeps its input): the saved
    # activation-sized tensors do not depend on the number of iterations.
    def saved_activation_bytes(layer):
        seen: dict[int, int] = {}

        def pack(t):
            if t.numel() >= x.numel():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x.requires_grad_())
        return sum(seen.values())

    x = torch.randn(16, 64, 8, 8)
    if name == "iternorm":
        few = saved_activation_bytes(lw.IterNorm(64, group_size=16, iterations=2))
        many = saved_activation_bytes(
            lw.IterNorm(64, group_size=16, iterations=12, method="coupled")
        )
        assert few == many
    else:
        many = saved_activation_bytes(LAYERS[name][0](64, group_size=16))
    assert many <= x.numel() * x.element_size()


@pytest.mark.parametrize("name", list(LAYERS))
def test_bf16_autocast_keeps_covariance_in_float32(name):
    torch.manual_seed(0)
    x = (torch.randn(64, 32, 4, 4) + torch.randn(1, 32, 1, 1)).bfloat16()
    layer = LAYERS[name][0](32, group_size=16)
    layer_fp32 = LAYERS[name][0](32, group_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y32 = layer_fp32(x.float())  # the same bf16-rounded input, all in float32
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(y).all()
    # Statistics agree with a float32 computation to float32 precision, far tighter than a
    # bf16 covariance (3 significant digits) could.
    for name_, buf in layer.named_buffers():
        if buf is not None and buf.dtype.is_floating_point:
            assert buf.dtype == torch.float32, name_
            torch.testing.assert_close(
                buf, dict(layer_fp32.named_buffers())[name_], rtol=1e-5, atol=1e-6
            )
    torch.testing.assert_close(y.float(), y32, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("name", list(LAYERS))
def test_half_precision_module_keeps_float32_statistics(name):
    layer = LAYERS[name][0](32, group_size=16).to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    assert all(b.dtype in (torch.float32, torch.long) for b in layer.buffers())
    y = layer(torch.randn(16, 32, 3, 3, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("name", list(LAYERS))
def test_state_dict_round_trip(name):
    layer = make(name, dtype=torch.float32)
    for _ in range(3):
        layer(torch.randn(32, 40, 3, 3))
    fresh = LAYERS[name][0](40, group_size=16, eps=1e-5, **LAYERS[name][1])
    fresh.load_state_dict(layer.state_dict(), strict=True)
    layer.eval()
    fresh.eval()
    x = torch.randn(4, 40, 3, 3)
    torch.testing.assert_close(fresh(x), layer(x))
    assert "group_mask" not in layer.state_dict()


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize(
    ("bn_cls", "shape"),
    [
        (nn.BatchNorm1d, (8, 24)),
        (nn.BatchNorm1d, (8, 24, 5)),
        (nn.BatchNorm2d, (8, 24, 5, 5)),
        (nn.BatchNorm3d, (4, 24, 3, 3, 3)),
    ],
)
def test_from_batchnorm_preserves_eval_output(name, bn_cls, shape):
    bn = bn_cls(24, eps=1e-3, momentum=0.3)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.bias.requires_grad_(False)
    bn.eval()
    layer = LAYERS[name][0].from_batchnorm(bn, group_size=16)
    x = torch.randn(shape)
    torch.testing.assert_close(layer(x), bn(x), rtol=1e-5, atol=1e-5)
    assert not layer.training
    assert layer.momentum == 0.3
    assert layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.weight.dtype == bn.weight.dtype and layer.weight.device == bn.weight.device
    assert not isinstance(layer, nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize("name", list(LAYERS))
def test_from_batchnorm_with_another_eps_is_still_the_same_function(name):
    bn = nn.BatchNorm2d(16, eps=1e-5).eval()
    with torch.no_grad():
        bn.running_var.uniform_(2e-3, 1e-2)  # small variances: eps matters
        bn.running_mean.normal_()
    x = torch.randn(4, 16, 3, 3) * 0.05
    layer = LAYERS[name][0].from_batchnorm(bn, group_size=8, eps=1e-3)
    assert layer.eps == 1e-3
    torch.testing.assert_close(layer(x), bn(x), rtol=1e-5, atol=1e-5)


def test_swbn_from_batchnorm_warns_when_eps_exceeds_a_variance():
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_var.fill_(1e-4)
    with pytest.warns(UserWarning, match="eps=0.01 exceeds running_var"):
        lw.SWBN.from_batchnorm(bn, group_size=4, eps=1e-2)


def test_swbn_from_batchnorm_equals_batchnorm_in_training_too():
    bn = nn.BatchNorm2d(24)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    layer = lw.SWBN.from_batchnorm(bn, group_size=8)
    assert layer.training and layer.eps == bn.eps
    x = torch.randn(8, 24, 5, 5) * 3 + 1
    torch.testing.assert_close(layer(x), bn(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)


@pytest.mark.parametrize("criterion", ["kl", "fro"])
def test_swbn_online_update_follows_the_paper(criterion):
    layer = lw.SWBN(
        12, group_size=6, whitening_rate=0.05, criterion=criterion, eps=1e-5, dtype=torch.float64
    )
    x = ref.correlated((256, 12))
    w_before = layer.whitening.clone()
    y = layer(x)
    # applied W was the one before the update (identity): BN standardization
    y_bn = ref.whiten(
        x, 6, lambda c: torch.diag((c.diagonal() + 1e-5).rsqrt()), layer.weight, layer.bias
    )
    torch.testing.assert_close(y, y_bn)
    for g, cov in enumerate(ref.batch_covariances(x, 6)):
        inv = torch.diag((cov.diagonal() + 1e-5).rsqrt())
        expected = ref.swbn_step(w_before[g], inv @ cov @ inv, 0.05, criterion)
        torch.testing.assert_close(layer.whitening[g], expected)
    # a smaller last group (14 = 6 + 6 + 2 channels) steps as that group would on its own
    padded = lw.SWBN(
        14, group_size=6, whitening_rate=0.05, criterion=criterion, eps=1e-2, dtype=torch.float64
    )
    x14 = ref.correlated((256, 14))
    for _ in range(3):
        padded(x14)
    w = torch.eye(2, dtype=torch.float64)
    for _ in range(3):
        cov = ref.batch_covariances(x14, 6)[-1]
        inv = torch.diag((cov.diagonal() + 1e-2).rsqrt())
        w = ref.swbn_step(w, inv @ cov @ inv, 0.05, criterion)
    torch.testing.assert_close(padded.whitening[-1, :2, :2], w)
    torch.testing.assert_close(padded.whitening[-1, 2:, 2:], torch.eye(4, dtype=torch.float64))
    # many steps on batches of one distribution drive W towards whitening it
    data = ref.correlated((8192, 12))
    start = max(
        torch.linalg.norm(c - torch.eye(6, dtype=torch.float64))
        for c in ref.batch_covariances(layer.whiten_batch(data), 6)
    )
    for _ in range(400):
        layer(data[torch.randint(0, 8192, (256,))])
    out = layer.whiten_batch(data)
    for cov in ref.batch_covariances(out, 6):
        assert torch.linalg.norm(cov - torch.eye(6, dtype=torch.float64)) < 0.25 * start


def test_swbn_whitening_is_a_constant_for_backward():
    layer = lw.SWBN(8, group_size=8, whitening_rate=0.1, eps=1e-5, dtype=torch.float64)
    with torch.no_grad():
        a = torch.randn(8, 8, dtype=torch.float64) * 0.1
        layer.whitening[0] = torch.eye(8, dtype=torch.float64) + a + a.T
    w_used = layer.whitening[0].clone()
    x = ref.correlated((64, 8)).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(64, 8, dtype=torch.float64)
    layer(x).backward(g)
    assert not torch.equal(layer.whitening[0], w_used)  # updated in the forward...
    y_ref = ref.whiten(
        x2,
        8,
        lambda c: w_used @ torch.diag((c.diagonal() + 1e-5).rsqrt()),
        layer.weight.detach(),
        layer.bias.detach(),
    )
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)  # ... but the backward used the applied W only


@pytest.mark.parametrize("name", list(LAYERS))
def test_non_finite_batch_leaves_every_buffer_unchanged(name):
    layer = make(name, dtype=torch.float32)
    layer(torch.randn(16, 40))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = torch.randn(16, 40)
    bad[3, 7] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"non-finite.*left unchanged"):
        layer(bad)
    bad[3, 7] = float("inf")
    with pytest.warns(RuntimeWarning, match=LAYERS[name][0].__name__):
        layer(bad)
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)
    assert int(layer.nonfinite_batches) == 2 and "nonfinite_batches" not in layer.state_dict()
    # and training continues normally afterwards
    layer(torch.randn(16, 40))
    assert int(layer.num_batches_tracked) == 2 and int(layer.nonfinite_batches) == 2


@pytest.mark.parametrize("name", list(LAYERS))
def test_non_finite_batch_on_an_accelerator_is_counted_without_reading_it(name, monkeypatch):
    # Off CPU the layer must not read the flag on the host (a sync per step): it only counts.
    monkeypatch.setattr("lightning_whiten.layers.base.warns_at_batch", lambda device: False)
    model = nn.Sequential(
        make(name, dtype=torch.float32), nn.ReLU(), make(name, dtype=torch.float32)
    )
    bad = torch.randn(64, 40)  # 4 samples per channel of a group: no rank or cap warning
    bad[0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(64, 40))
        model(bad)
    assert lw.diagnostics.nonfinite_batches(model) == {"0": 1, "2": 1}


@pytest.mark.parametrize("name", list(LAYERS))
def test_bad_input_errors_name_the_layer_and_the_option(name):
    cls = LAYERS[name][0]
    layer = cls(32, group_size=16)
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*32 channels \(num_features\)"):
        layer(torch.randn(4, 16, 3, 3))
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*group_size"):
        cls(32, group_size=0)
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*group_size"):
        cls(32, group_size=2.5)
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*more than one sample"):
        layer(torch.randn(1, 32))
    with pytest.raises(TypeError, match=rf"{cls.__name__}.*floating-point"):
        layer(torch.ones(4, 32, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*shape"):
        layer(torch.randn(32))
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*momentum"):
        cls(32, momentum=1.5)
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*eps"):
        cls(32, eps=0)
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*sync"):
        cls(32, sync="all")
    # one sample is fine in eval, as for BatchNorm
    layer.eval()
    assert layer(torch.randn(1, 32)).shape == (1, 32)


def test_option_specific_errors():
    with pytest.raises(ValueError, match=r"IterNorm.*iterations"):
        lw.IterNorm(32, iterations=0)
    layer = lw.IterNorm(32)
    with pytest.raises(ValueError, match=r"IterNorm.*iterations"):
        layer.iterations = -1
    with pytest.raises(ValueError, match=r"IterNorm.*method"):
        lw.IterNorm(32, method="svd")
    with pytest.raises(ValueError, match=r"SWBN.*criterion"):
        lw.SWBN(32, criterion="l2")
    with pytest.raises(ValueError, match=r"SWBN.*whitening_rate"):
        lw.SWBN(32).whitening_rate = -1.0


def test_group_size_larger_than_channels_is_clamped():
    layer = lw.IterNorm(24, group_size=64)
    assert layer.group_size == 24 and layer.requested_group_size == 64
    assert layer.group_sizes == (24,)
    assert layer(torch.randn(8, 24)).shape == (8, 24)


def test_extra_repr_shows_the_options():
    text = repr(lw.IterNorm(64, group_size=16, iterations=7, method="coupled"))
    for part in (
        "64",
        "group_size=16",
        "iterations=7",
        "method='coupled'",
        "eps=1e-05",
        "momentum=0.1",
    ):
        assert part in text
    # the default rate, "auto", is shown as the number it stands for: 0.05 / 8 for KL
    assert "whitening_rate=0.00625" in repr(lw.SWBN(8)) and "criterion='kl'" in repr(lw.SWBN(8))
    assert "whitening_rate=1e-05" in repr(lw.SWBN(8, whitening_rate=1e-5))


def test_not_converted_by_convert_sync_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), lw.IterNorm(8), nn.BatchNorm2d(8))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], lw.IterNorm)
    assert isinstance(converted[2], nn.SyncBatchNorm)


def test_no_running_stats_uses_batch_statistics_in_eval():
    layer = lw.IterNorm(16, group_size=8, track_running_stats=False, dtype=torch.float64)
    assert layer.running_mean is None and "running_whitening" not in layer.state_dict()
    x = ref.correlated((64, 16))
    train_out = layer(x)
    layer.eval()
    torch.testing.assert_close(layer(x), train_out)


def test_whiten_batch_touches_no_state():
    for cls in (lw.IterNorm, lw.DBN, lw.SWBN):
        layer = cls(16, group_size=8)
        layer(torch.randn(32, 16))
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        out = layer.whiten_batch(torch.randn(32, 16) * 3)
        assert out.shape == (32, 16)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, before[k]), (cls.__name__, k)


def test_rank_deficient_batches_still_produce_finite_output():
    # fewer samples than channels per group: eps keeps the covariance invertible (DBN caps
    # the group it whitens instead, and says so).
    for cls in (lw.IterNorm, lw.DBN, lw.SWBN):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = cls(32, group_size=32)(torch.randn(4, 32))
        assert torch.isfinite(y).all()
        # DBN whitens sub-groups of one channel then (4 samples), and says so.
        said = [str(w.message) for w in caught if "too few to whiten" in str(w.message)]
        assert len(said) == (cls is lw.DBN)


class _HostReads(TorchDispatchMode):
    """Records the ops that would make the host wait for (or copy to) an accelerator."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        # item()/bool() on a tensor; torch.tensor(python value) (a host-to-device copy on GPU);
        # an explicit device transfer
        moves = "_to_copy" in name and kwargs.get("device", args[0].device) != args[0].device
        if "_local_scalar_dense" in name or "lift_fresh" in name or moves:
            self.found.append(name)
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("chunk_bytes", [None, 2048])
def test_training_step_never_waits_for_the_device(name, chunk_bytes, monkeypatch):
    # What makes a CUDA step sync-free (and CUDA-graph capturable), checked on CPU: no tensor
    # value is read on the host and nothing is copied from the host during forward + backward.
    monkeypatch.setattr("lightning_whiten.layers.base.warns_at_batch", lambda device: False)
    if chunk_bytes is not None:
        monkeypatch.setattr(FW, "_CHUNK_BYTES", chunk_bytes)
    layer = make(name, dtype=torch.float32, momentum=None if name == "iternorm" else 0.1)
    layer(torch.randn(8, 40, 4, 4))
    x = torch.randn(8, 40, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
    with _HostReads() as mode:
        layer(x).square().sum().backward()
        layer.eval()
        layer(x)
    assert mode.found == []


def test_diverged_newton_iteration_does_not_poison_the_running_matrix(monkeypatch):
    # Plain Newton at a large T diverges in float32 on an ill-conditioned (finite) covariance
    # (beyond 8 steps it is refused; here the limit is lifted to check the guard behind it).
    monkeypatch.setattr(lw.IterNorm, "max_newton_iterations", 100)
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    mixing = q @ torch.diag(torch.logspace(0, 1, 16))
    x = torch.randn(512, 16, generator=gen) @ mixing.T
    layer = lw.IterNorm(16, group_size=16, iterations=5)
    layer(x)
    before = layer.running_whitening.clone()
    layer.iterations = 40
    with pytest.warns(RuntimeWarning, match=r"IterNorm.*whitening matrix"):
        y = layer(x)
    assert not torch.isfinite(y).all()  # the batch itself shows the divergence ...
    torch.testing.assert_close(layer.running_whitening, before)  # ... the running state does not
    assert int(layer.nonfinite_batches) == 1
