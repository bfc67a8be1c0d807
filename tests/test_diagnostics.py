"""SND and whiteness against brute-force expectations."""

from __future__ import annotations

import itertools

import pytest
import reference as ref
import torch
from torch import nn

import lightning_whiten as lw
from lightning_whiten.diagnostics import snd, whiteness


def exact_snd(transform, inputs: torch.Tensor, batch_size: int, probe: int) -> float:
    """E_B ||F(x; B) - E_B F(x; B)|| over *every* mini-batch containing the probe."""
    others = [i for i in range(inputs.shape[0]) if i != probe]
    outputs = []
    for rest in itertools.combinations(others, batch_size - 1):
        batch = inputs[[probe, *rest]]
        outputs.append(transform(batch)[0].double())
    stack = torch.stack(outputs)
    return float((stack - stack.mean(0)).flatten(1).norm(dim=1).mean())


def bn_reference(batch):
    x = batch.double()
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / (var + 1e-5).sqrt()


@pytest.mark.parametrize(
    ("make_layer", "transform"),
    [
        (lambda: nn.BatchNorm2d(6), bn_reference),
        (
            lambda: lw.IterNorm(6, group_size=3, iterations=5, dtype=torch.float64),
            lambda b: ref.whiten(b.double(), 3, lambda c: ref.newton_inverse_sqrt(c, 5, 1e-5)),
        ),
        (
            lambda: lw.DBN(6, group_size=3, dtype=torch.float64),
            lambda b: ref.whiten(b.double(), 3, lambda c: ref.zca_inverse_sqrt(c, 1e-5)),
        ),
    ],
    ids=["bn", "iternorm", "dbn"],
)
def test_snd_estimates_the_exact_expectation(make_layer, transform):
    torch.manual_seed(0)
    inputs = ref.correlated((9, 6, 2, 2))
    layer = make_layer()
    if isinstance(layer, nn.BatchNorm2d):
        inputs = inputs.float()
    batch_size = 4  # C(8, 3) = 56 mini-batches contain each probe
    probes = torch.tensor([0, 3])
    exact = sum(exact_snd(transform, inputs, batch_size, int(p)) for p in probes) / len(probes)
    estimate = snd(layer, inputs, batch_size=batch_size, num_batches=600, probes=probes, seed=1)
    assert exact > 0.1
    assert float(estimate) == pytest.approx(exact, rel=0.05)


def test_snd_is_zero_for_transforms_that_ignore_the_batch():
    inputs = torch.randn(32, 8, 3, 3)
    layer = lw.IterNorm(8, group_size=4)
    layer(inputs)  # some running statistics
    assert float(snd(layer, inputs, batch_size=8, training=False)) == pytest.approx(0, abs=1e-6)
    assert float(snd(nn.GroupNorm(2, 8), inputs, batch_size=8)) == pytest.approx(0, abs=1e-6)
    assert float(snd(layer, inputs, batch_size=8)) > 0.1
    # without running buffers a layer's eval uses the batch, so SND is that of training
    untracked = lw.IterNorm(8, group_size=4, track_running_stats=False)
    assert float(snd(untracked, inputs, batch_size=8, training=False)) == pytest.approx(
        float(snd(untracked, inputs, batch_size=8))
    )


def test_snd_changes_nothing_and_is_reproducible():
    for layer in (
        lw.SWBN(8, group_size=4, whitening_rate=0.1),
        lw.IterNorm(8, group_size=4),
        nn.BatchNorm2d(8),
    ):
        layer(torch.randn(16, 8, 3, 3))
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        inputs = torch.randn(40, 8, 3, 3)
        rng = torch.get_rng_state()
        a = snd(layer, inputs, batch_size=8, num_batches=4, probes=4, seed=3)
        b = snd(layer, inputs, batch_size=8, num_batches=4, probes=4, seed=3)
        assert torch.equal(a, b)
        assert torch.equal(torch.get_rng_state(), rng)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, state[k]), (type(layer).__name__, k)


def test_snd_grows_as_the_batch_shrinks_and_with_group_size():
    # The IterNorm paper's observations: smaller batches and larger groups disturb more.
    torch.manual_seed(0)
    inputs = ref.correlated((256, 32, 2, 2)).float()
    bn = nn.BatchNorm2d(32)
    assert snd(bn, inputs, batch_size=8) > snd(bn, inputs, batch_size=64)
    small = snd(lw.DBN(32, group_size=4), inputs, batch_size=16)
    large = snd(lw.DBN(32, group_size=32), inputs, batch_size=16)
    assert large > small


def test_snd_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        snd(nn.BatchNorm1d(4), torch.randn(8, 4), batch_size=9)
    with pytest.raises(TypeError, match="diagnostics support"):
        snd(nn.Linear(4, 4), torch.randn(8, 4), batch_size=4)


def test_whiteness_of_dbn_is_near_zero_and_of_bn_is_not():
    inputs = ref.correlated((512, 16), strength=1.5).float()
    dbn = whiteness(lw.DBN(16, group_size=16, eps=1e-9), inputs)
    bn = whiteness(nn.BatchNorm1d(16), inputs, group_size=16)
    assert dbn.error.max() < 1e-3
    assert bn.error.min() > 0.05
    # the input covariance is ill-conditioned
    torch.testing.assert_close(dbn.condition, bn.condition)
    cov = torch.cov(inputs.double().T, correction=0)
    expected = torch.linalg.cond(cov)
    assert float(dbn.condition[0]) == pytest.approx(float(expected), rel=1e-6)


def test_iternorm_newton_residual_shrinks_with_iterations():
    inputs = ref.correlated((512, 16)).float()
    residuals = [
        whiteness(
            lw.IterNorm(16, group_size=16, iterations=t, method="coupled"), inputs
        ).newton_residual.item()
        for t in (1, 3, 5, 10, 20)
    ]
    assert residuals == sorted(residuals, reverse=True)
    assert residuals[-1] < 1e-3
    assert whiteness(lw.DBN(16), inputs).newton_residual is None


def test_whiteness_with_a_padded_last_group():
    inputs = ref.correlated((512, 20)).float()
    w = whiteness(lw.DBN(20, group_size=8, eps=1e-9), inputs)
    assert w.error.shape == (3,) and w.error.max() < 1e-3
    assert torch.isfinite(w.condition).all()
