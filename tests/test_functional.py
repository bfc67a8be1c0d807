"""The functional building blocks: hand-written backward passes and the chunked kernels."""

from __future__ import annotations

import pytest
import reference as ref
import torch

import lightning_whiten as lw
from lightning_whiten import functional as F
from lightning_whiten.functional import _backend as FW
from lightning_whiten.functional import maps as M


def spd(groups: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(groups, d, 3 * d, dtype=torch.float64, generator=gen)
    return a @ a.transpose(-1, -2) / (3 * d) + 0.1 * torch.eye(d, dtype=torch.float64)


def symmetric_input(fn):
    """A function of a covariance: feed it the symmetric part, as a covariance always is."""
    return lambda c: fn(0.5 * (c + c.transpose(-1, -2)))


@pytest.mark.parametrize("method", ["newton", "coupled"])
@pytest.mark.parametrize("iterations", [1, 3, 6])
def test_iternorm_matrix_backward_is_the_gradient_of_the_truncated_steps(method, iterations):
    cov = spd(3, 5).requires_grad_()
    assert torch.autograd.gradcheck(
        symmetric_input(lambda c: F.iternorm_matrix(c, iterations, 1e-5, method)), (cov,)
    )
    # and equals autograd through the unrolled paper formula
    g = torch.randn(3, 5, 5, dtype=torch.float64)
    (ours,) = torch.autograd.grad(F.iternorm_matrix(cov, iterations, 1e-5, method), cov, g)
    cov2 = cov.detach().clone().requires_grad_()
    unrolled = torch.stack([ref.newton_inverse_sqrt(c, iterations, 1e-5) for c in cov2])
    (theirs,) = torch.autograd.grad(unrolled, cov2, g)
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)


def test_iternorm_matrix_with_a_padded_group():
    layout = F.group_layout(12, 5)  # 5 + 5 + 2
    valid = F.valid_mask(layout)
    cov = F.canonicalize(spd(3, 5), valid).requires_grad_()
    w = F.iternorm_matrix(cov, 5, 1e-5, "newton", valid)
    torch.testing.assert_close(w[-1, 2:, 2:], torch.eye(3, dtype=torch.float64))
    expected = ref.newton_inverse_sqrt(cov.detach()[-1, :2, :2], 5, 1e-5)
    torch.testing.assert_close(w[-1, :2, :2], expected)

    def real_blocks(c):
        return F.iternorm_matrix(
            F.canonicalize(0.5 * (c + c.transpose(-1, -2)), valid), 5, 1e-5, "newton", valid
        )

    assert torch.autograd.gradcheck(real_blocks, (cov,))


def _count_eigen_calls(monkeypatch) -> list[int]:
    """Spy on the eigen evaluation of IterNormMap (to check the dispatch took it)."""
    calls: list[int] = []
    original = M._eigen_forward

    def spy(s, iterations):
        calls.append(s.shape[-1])
        return original(s, iterations)

    monkeypatch.setattr(M, "_eigen_forward", spy)
    return calls


@pytest.mark.parametrize("method", ["newton", "coupled"])
@pytest.mark.parametrize("iterations", [1, 3, 6])
def test_iternorm_eigen_evaluation_is_the_gradient_of_the_truncated_steps(
    monkeypatch, method, iterations
):
    # The same polynomial on the eigenvalues, backward by divided differences: equal to autograd
    # through the paper's unrolled matrix iteration, for a gradient that is not symmetric too.
    monkeypatch.setattr(M, "EIGEN_MIN_GROUP_SIZE", 1)
    calls = _count_eigen_calls(monkeypatch)
    cov = spd(3, 5, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(
        symmetric_input(lambda c: F.iternorm_matrix(c, iterations, 1e-5, method)), (cov,)
    )
    g = torch.randn(3, 5, 5, dtype=torch.float64)
    w = F.iternorm_matrix(cov, iterations, 1e-5, method)
    (ours,) = torch.autograd.grad(w, cov, g)
    cov2 = cov.detach().clone().requires_grad_()
    unrolled = torch.stack([ref.newton_inverse_sqrt(c, iterations, 1e-5) for c in cov2])
    (theirs,) = torch.autograd.grad(unrolled, cov2, g)
    torch.testing.assert_close(w, unrolled, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)
    assert calls


def test_iternorm_eigen_backward_is_exact_on_repeated_eigenvalues(monkeypatch):
    # Ties (and near-ties) are where 1 / (l_i - l_j) would blow up; the divided differences are
    # computed by their own recursion and must stay equal to the unrolled iteration's gradient.
    monkeypatch.setattr(M, "EIGEN_MIN_GROUP_SIZE", 1)
    calls = _count_eigen_calls(monkeypatch)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    evals = torch.tensor([0.5, 0.5, 0.5, 1.0, 1.0 + 1e-13, 3.0], dtype=torch.float64)
    cov = (q @ torch.diag(evals) @ q.T).unsqueeze(0)
    cov = torch.cat([cov, torch.eye(6, dtype=torch.float64).unsqueeze(0)]).requires_grad_()
    g = torch.randn(2, 6, 6, dtype=torch.float64)
    (ours,) = torch.autograd.grad(F.iternorm_matrix(cov, 5, 1e-5), cov, g)
    cov2 = cov.detach().clone().requires_grad_()
    unrolled = torch.stack([ref.newton_inverse_sqrt(c, 5, 1e-5) for c in cov2])
    (theirs,) = torch.autograd.grad(unrolled, cov2, g)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)
    assert calls == [6]


def test_iternorm_eigen_evaluation_with_padding_and_a_non_finite_group(monkeypatch):
    monkeypatch.setattr(M, "EIGEN_MIN_GROUP_SIZE", 1)
    calls = _count_eigen_calls(monkeypatch)
    layout = F.group_layout(12, 5)  # 5 + 5 + 2
    valid = F.valid_mask(layout)
    cov = F.canonicalize(spd(3, 5), valid)
    w = F.iternorm_matrix(cov, 5, 1e-5, "newton", valid)
    torch.testing.assert_close(w[-1, 2:, 2:], torch.eye(3, dtype=torch.float64))
    expected = ref.newton_inverse_sqrt(cov[-1, :2, :2], 5, 1e-5)
    torch.testing.assert_close(w[-1, :2, :2], expected)
    bad = cov.clone()
    bad[1, 0, 0] = float("nan")
    w_bad = F.iternorm_matrix(bad, 5, 1e-5, "newton", valid)
    assert torch.isnan(w_bad[1]).all()  # the bad group shows as NaN, as the iteration would ...
    torch.testing.assert_close(w_bad[0], w[0])  # ... and leaves the others alone
    assert len(calls) == 2


def test_iternorm_dispatch_and_layer_on_the_eigen_path_match_the_reference(monkeypatch):
    calls = _count_eigen_calls(monkeypatch)
    # Below the group size threshold (and on the refused Newton step counts) the matrix
    # iteration runs; from it on, the eigen evaluation.
    F.iternorm_matrix(spd(2, M.EIGEN_MIN_GROUP_SIZE - 1), 5, 1e-5)
    F.iternorm_matrix(spd(2, M.EIGEN_MIN_GROUP_SIZE), M.EIGEN_MAX_NEWTON_STEPS + 1, 1e-5)
    assert calls == []
    # A layer of 40 channels in groups of 32 (one padded group of 8), float64 reference.
    d = M.EIGEN_MIN_GROUP_SIZE
    layer = lw.IterNorm(d + 8, group_size=d, dtype=torch.float64)
    x = ref.correlated((64, d + 8, 3, 3))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(xa)
    assert calls == [d]
    expected = ref.whiten(
        xb, d, lambda c: ref.newton_inverse_sqrt(c, 5, 1e-5), layer.weight, layer.bias
    )
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(y)
    y.backward(g)
    expected.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-10)


def test_zca_and_standardize_backward():
    cov = spd(2, 4).requires_grad_()
    assert torch.autograd.gradcheck(symmetric_input(lambda c: F.zca_matrix(c, 1e-5)), (cov,))
    w = torch.randn(2, 4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        symmetric_input(lambda c: F.standardize_matrix(c, 1e-5, w)), (cov,)
    )
    assert torch.autograd.gradcheck(
        symmetric_input(lambda c: F.standardize_matrix(c, 1e-5)), (cov,)
    )


def test_composable_blocks_match_the_reference_and_gradcheck():
    x = ref.correlated((6, 10, 3)).requires_grad_()

    def layer(inp):
        moments = F.batch_covariance(inp, 4)
        w = F.zca_matrix(moments.cov, 1e-5, F.valid_mask(F.group_layout(10, 4)))
        return F.grouped_affine(moments.input, w, moments.mean)

    expected = ref.whiten(x.detach(), 4, lambda c: ref.zca_inverse_sqrt(c, 1e-5))
    torch.testing.assert_close(layer(x), expected)
    assert torch.autograd.gradcheck(layer, (x,))
    moments = F.batch_covariance(x.detach(), 4)
    for g, cov in enumerate(ref.batch_covariances(x.detach(), 4)):
        s = cov.shape[0]
        torch.testing.assert_close(moments.cov[g, :s, :s], cov)
    assert float(moments.count) == 18


@pytest.mark.parametrize(
    ("shape", "memory_format"),
    [
        ((7, 20, 5, 3), None),
        ((7, 20, 5, 3), torch.channels_last),
        ((33, 20), None),
        ((5, 20, 9), None),
    ],
)
@pytest.mark.parametrize("name", ["iternorm", "dbn", "swbn"])
def test_many_small_chunks_give_the_same_result(monkeypatch, name, shape, memory_format):
    # Tiny chunks: every pass runs over many chunks (Chan's combination of chunk moments,
    # per-chunk writes of the output and of both backward phases).
    make = {
        "iternorm": lambda: lw.IterNorm(20, group_size=8, dtype=torch.float64),
        "dbn": lambda: lw.DBN(20, group_size=8, dtype=torch.float64),
        "swbn": lambda: lw.SWBN(
            20, group_size=8, eps=1e-5, whitening_rate=0.0, dtype=torch.float64
        ),
    }[name]
    fn = {
        "iternorm": lambda c: ref.newton_inverse_sqrt(c, 5, 1e-5),
        "dbn": lambda c: ref.zca_inverse_sqrt(c, 1e-5),
        "swbn": lambda c: torch.diag((c.diagonal() + 1e-5).rsqrt()),
    }[name]
    x = ref.correlated(shape) * 3 + 5  # a large mean: centering has to be exact
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    monkeypatch.setattr(FW, "_CHUNK_BYTES", 256)
    layer = make()
    assert len(FW._chunks(FW._as_view(x)[0])) > 3
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    y = layer(xa)
    expected = ref.whiten(xb, 8, fn, layer.weight, layer.bias)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(y)
    y.backward(g)
    expected.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", ["iternorm", "dbn", "swbn"])
def test_per_sample_gemms_of_small_spatial_inputs_match_the_reference(name):
    # 8 positions per sample in groups of 16 channels: the channels-first GEMMs loop over samples
    # (no copied matrices, Gram matrices accumulated in place); same result as the reference.
    layout = F.group_layout(32, 16)
    x = ref.correlated((6, 32, 4, 4)) * 2 + 3
    assert FW._per_sample(layout, FW._as_view(x)[0], "cf")
    layer = {
        "iternorm": lambda: lw.IterNorm(32, group_size=16, dtype=torch.float64),
        "dbn": lambda: lw.DBN(32, group_size=16, dtype=torch.float64),
        "swbn": lambda: lw.SWBN(
            32, group_size=16, eps=1e-5, whitening_rate=0.0, dtype=torch.float64
        ),
    }[name]()
    fn = {
        "iternorm": lambda c: ref.newton_inverse_sqrt(c, 5, 1e-5),
        "dbn": lambda c: ref.zca_inverse_sqrt(c, 1e-5),
        "swbn": lambda c: torch.diag((c.diagonal() + 1e-5).rsqrt()),
    }[name]
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(xa)
    expected = ref.whiten(xb, 16, fn, layer.weight, layer.bias)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(y)
    y.backward(g)
    expected.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("chunk_bytes", [256, 2**22], ids=["many-chunks", "one-chunk"])
def test_group_major_statistics_match_the_reference(monkeypatch, chunk_bytes):
    # Channels-first input in unpadded groups: the statistics pass centers each chunk into a
    # group-major buffer and takes its Gram matrices with one bmm over the groups.
    monkeypatch.setattr(FW, "_CHUNK_BYTES", chunk_bytes)
    layout = F.group_layout(24, 8)
    assert FW._group_major_gram(layout)
    assert not FW._group_major_gram(F.group_layout(20, 8))  # padded: per-sample/batched
    assert not FW._group_major_gram(F.group_layout(8, 8))  # one group: per-sample/batched
    x = ref.correlated((7, 24, 5, 3)) * 3 + 5
    moments = F.batch_covariance(x, 8)
    torch.testing.assert_close(moments.mean, ref.as_matrix(x).mean(1), rtol=1e-12, atol=1e-12)
    for g, expected in enumerate(ref.batch_covariances(x, 8)):
        torch.testing.assert_close(moments.cov[g], expected, rtol=1e-10, atol=1e-12)
    # float32 with a mean 1000x the spread: still exact to float32 precision (centered first)
    base = ref.correlated((16, 24, 4, 4))
    big = F.batch_covariance((base + 1000.0).float(), 8)
    for g, expected in enumerate(ref.batch_covariances(base, 8)):
        torch.testing.assert_close(big.cov[g].double(), expected, rtol=1e-3, atol=1e-4)


def test_statistics_are_exact_for_large_means_in_float32():
    # mean/std = 1000: raw moments E[x x^T] - mu mu^T would lose every digit in float32.
    torch.manual_seed(0)
    base = torch.randn(256, 8, dtype=torch.float64)
    x64 = base + 1000.0
    moments = F.batch_covariance(x64.float(), 8)
    expected = torch.cov(x64.float().double().T, correction=0)
    torch.testing.assert_close(moments.cov[0].double(), expected, rtol=1e-4, atol=1e-5)


def test_whiten_with_a_custom_matrix_map():
    class Scale(F.MatrixMap):
        """W = 2 I: the layer becomes 2 (x - mean)."""

        def forward(self, cov):
            return 2 * torch.eye(cov.shape[-1], dtype=cov.dtype).expand_as(cov).clone(), ()

        def backward(self, saved, grad):
            return torch.zeros_like(grad)

    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    result = F.whiten(x, Scale(), 3)
    torch.testing.assert_close(result.output, 2 * (x - x.mean(0)))
    assert torch.autograd.gradcheck(lambda t: F.whiten(t, Scale(), 3).output, (x,))


def test_newton_residual_measures_distance_from_whitening():
    cov = spd(2, 6)
    eps = 1e-5
    exact = torch.stack([ref.zca_inverse_sqrt(c, eps) for c in cov])
    torch.testing.assert_close(F.newton_residual(cov, exact, eps), torch.zeros(2, dtype=cov.dtype))
    # W = I leaves the covariance as it is: the residual is ||cov + eps I - I||_F / d
    eye = torch.eye(6, dtype=cov.dtype)
    expected = torch.linalg.matrix_norm(cov + eps * eye - eye) / 6
    torch.testing.assert_close(F.newton_residual(cov, eye.expand(2, 6, 6), eps), expected)
    # more Newton iterations land closer to the exact inverse square root
    residuals = [F.newton_residual(cov, F.iternorm_matrix(cov, t, eps), eps) for t in (1, 3, 7)]
    assert (residuals[0] > residuals[1]).all() and (residuals[1] > residuals[2]).all()
