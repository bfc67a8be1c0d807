"""The functional building blocks: hand-written backward passes and the chunked kernels."""

from __future__ import annotations

import pytest
import reference as ref
import torch

import lightning_whiten as lw
from lightning_whiten import functional as F
from lightning_whiten.functional import _backend as FW


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
