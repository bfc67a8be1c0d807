"""The zoo (issue #24): every family on timm/torchvision models, and the five faults it found.

``test_zoo_model`` runs ``benchmarks.zoo`` (convert -> eval equal -> two SGD steps finite ->
export equal -> strict reload of the trained converted state) for every registered family on
each model; ``python -m benchmarks.zoo`` prints the same cases as a table.
"""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch
from torch import nn

import lightning_whiten as lw
from benchmarks import zoo

timm = pytest.importorskip("timm")


# -- 1. per-channel families on timm's fused BatchNormAct2d ------------------------------------
@pytest.mark.parametrize("family", ["lpnorm", "streaming"])
def test_per_channel_families_convert_fused_batchnorm_act(family):
    # The default p was read from the *Act class's constructor, NormActMixin's
    # (*args, **kwargs): KeyError 'p' for every timm BatchNormAct2d.
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.ReLU))
    zoo.randomize_batchnorms(model, seed=0)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    report = lw.convert(model, family)
    layer = model[1]
    assert len(report.replaced) == 1 and isinstance(layer, lw.registry.get_family(family).layer)
    assert layer.p == 1.0 and isinstance(layer.act, nn.ReLU)  # the family's default, act kept
    torch.testing.assert_close(model(x), expected)
    assert (model(x) >= 0).all()  # the activation still runs


# -- 2. DBN at small batches --------------------------------------------------------------------
def test_dbn_whitens_capped_groups_when_the_batch_is_small():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 2, 2, dtype=torch.float64)  # 16 samples per channel
    capped = lw.DBN(16, group_size=16).double()
    assert capped.whitened_group_size(16) == 4  # 4 samples per whitened channel
    with pytest.warns(UserWarning, match=r"DBN\(16, group_size=16\): 16 samples .* groups of 16 "):
        y = capped(x.requires_grad_())
    # Independent expectation: DBN with groups of 4 from the start, on the same batch.
    small = lw.DBN(16, group_size=4).double()
    x2 = x.detach().clone().requires_grad_()
    y2 = small(x2)
    torch.testing.assert_close(y, y2)
    grad = torch.randn_like(y)
    torch.testing.assert_close(
        torch.autograd.grad(y, x, grad)[0], torch.autograd.grad(y2, x2, grad)[0]
    )
    blocks = torch.block_diag(*small.running_cov)
    torch.testing.assert_close(capped.running_cov[0], blocks)
    # Enough samples: whole groups again.
    assert capped.whitened_group_size(64) == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lw.DBN(16, group_size=16)(torch.randn(4, 16, 4, 4))


def test_dbn_with_one_channel_per_group_is_batchnorm():
    x = torch.randn(2, 8, 1, 1, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UserWarning, match="sub-groups of 1 channels"):
        y = lw.DBN(8, group_size=8).double()(x)
    x2 = x.detach().clone().requires_grad_()
    y2 = nn.functional.batch_norm(x2, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(y, y2)
    grad = torch.randn_like(y)
    torch.testing.assert_close(
        torch.autograd.grad(y, x, grad)[0], torch.autograd.grad(y2, x2, grad)[0]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "name"), [("timm", "mobilenetv2_050"), ("torchvision", "regnet_x_400mf")]
)
def test_dbn_small_batch_training_keeps_parameters_bounded(source, name):
    # The setting: batch 4 at 64 px, every BN -> DBN g16, 2 SGD steps at lr 0.01.
    # Whole groups took parameters to 5e6 (MobileNetV2) and NaN (RegNet).
    from benchmarks.dbn_small_batch import run

    largest, losses, finite = run(source, name, lw.DBN.min_samples_per_channel, 4, 64)
    assert finite and largest < 1e3, (largest, losses)


# -- 3. export's float64 self-check -------------------------------------------------------------
def _cancelling_model() -> nn.Module:
    # Intermediate activations near 1e8 whose difference is the O(1) output: float32 rounding
    # of the folded convolution (1e4 * 1e4 vs 1e8) is amplified far beyond 1e-4, and even
    # float64 rounding (1e8 * 1e-16) exceeds 1e-9 of the output.
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, eps=1e-10), nn.Conv2d(2, 1, 1))
    with torch.no_grad():
        model[0].weight.fill_(1e4)
        model[0].bias.copy_(torch.tensor([0.0, 1e-4]))
        model[1].running_var.fill_(1e-8)
        model[2].weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
    return model.eval()


def test_export_check_accepts_rounding_relative_to_the_output_scale():
    model = _cancelling_model()
    lw.convert(model, "dbn", group_size=2, eps=1e-10)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="exactly in float64"):
        exported = lw.export(model, example_input=x)
    # Independent check in float64: the export computes the same function.
    ref = model.double()(x.double())
    torch.testing.assert_close(exported.double()(x.double()), ref, rtol=0, atol=1e-6)


def test_export_check_still_raises_on_a_wrong_export(monkeypatch):
    model = _cancelling_model()
    lw.convert(model, "dbn", group_size=2, eps=1e-10)
    export_module = sys.modules["lightning_whiten.surgery.export"]
    real = export_module.eval_affine

    def wrong(layer):  # a 0.1% error in the exported map, in every precision
        a, b = real(layer)
        return a * 1.001, b

    monkeypatch.setattr(export_module, "eval_affine", wrong)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="even in float64"):
        lw.export(model, example_input=x)


# -- 4. export keeps the architecture for per-channel layers ------------------------------------
@pytest.mark.parametrize("family", ["lpnorm", "streaming"])
def test_per_channel_export_of_a_preactivation_resnet_loads_into_the_original(family):
    # The quickstart's ResNetV2-20: pre-activation BNs read block inputs, not a conv output.
    torch.manual_seed(0)
    original = lw.ImageClassifier("cifar/resnetv2_20").net
    zoo.randomize_batchnorms(original, seed=1)
    model = copy.deepcopy(original)
    lw.convert(model, family)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "became 1x1 maps" warning
        exported = lw.export(model, example_input=x)
    fresh = lw.ImageClassifier("cifar/resnetv2_20").net.eval()
    fresh.load_state_dict(exported.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, lw.registry.get_family(family).layer) for m in exported.modules())
    plan = lw.surgery.plan_export(model, x)  # the pre-activation BNs: restored, not 1x1 maps
    assert len(plan.restored) == 10 and len(plan.folded) == 9 and not plan.unfolded, plan


def test_whitening_export_of_a_preactivation_resnet_keeps_1x1_maps():
    original = lw.ImageClassifier("cifar/resnetv2_20").net.eval()
    model = copy.deepcopy(original)
    lw.convert(model, "iternorm")
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="does not load into the original model"):
        exported = lw.export(model, example_input=x)
    with pytest.raises(RuntimeError):
        copy.deepcopy(original).load_state_dict(exported.state_dict(), strict=True)


# -- 5. export without example_input ------------------------------------------------------------
def _fixed_size_model() -> nn.Module:
    # Runs on 16x16 inputs only (as inception_v3 needs >= 75 px): the 64 px guess fails.
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(16 * 16 * 16, 3)
    ).eval()


def test_export_without_example_input_uses_the_shape_convert_traced():
    model = _fixed_size_model()
    x = torch.randn(2, 3, 16, 16)
    lw.convert(model, "dbn", example_input=x)
    exported = lw.export(model)  # no example_input: the shape convert traced on
    assert isinstance(exported[1], nn.BatchNorm2d)  # folded into the conv
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-5)


def test_export_asks_for_example_input_when_the_guess_does_not_run():
    model = _fixed_size_model()
    lw.convert(model, "lpnorm")  # per-channel: convert needs no trace
    with pytest.raises(ValueError, match=r"guessed .*shape \(2, 3, 64, 64\).*pass example_input"):
        lw.export(model)


@pytest.mark.slow
def test_inception_v3_export_without_example_input_asks_for_one():
    import torchvision

    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convert's trace on the 64 px guess fails: module order
        lw.convert(model, "iternorm")
    with pytest.raises(ValueError, match="pass example_input"):
        lw.export(model)


# -- The zoo ------------------------------------------------------------------------------------
#: Outcomes that are not "ok", by reason: ConvNorm2d replaces convolutions by design (its eval
#: output differs from the model's) and cannot be exported as a plain convolution.
EXPECTED_REFUSALS = {
    "convnorm": "refused: export (ConvNorm2d cannot be exported as a plain nn.Conv2d)"
}

#: Models whose whitening exports keep 1x1 maps (correct, but they do not load into the original
#: class): pre-activation BNs, BNs reading concatenations, identity branches, pooled features.
ONE_BY_ONE = {
    "resnetv2_18", "dpn48b", "densenet121", "repvgg_a0", "repghostnet_050", "fastvit_t8",
    "efficientvit_m0",
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("source", "name", "size"), zoo.MODELS, ids=[m[1] for m in zoo.MODELS])
def test_zoo_model(source, name, size):
    outcomes = zoo.run_model(source, name, size)
    assert {o.family for o in outcomes} == set(lw.registry.families())
    for o in outcomes:
        expected = EXPECTED_REFUSALS.get(o.family)
        if expected is not None:
            assert o.label == expected, (o.family, o.label)
            continue
        assert o.status == "ok", (o.family, o.label, o.checks)
        if lw.registry.get_family(o.family).group_option is None:
            # Per-channel layers always export into the original architecture.
            assert o.exported_original, (o.family, o.label)
        else:  # what docs/guide/export.md says
            assert o.exported_original == (name not in ONE_BY_ONE), (o.family, o.label)
