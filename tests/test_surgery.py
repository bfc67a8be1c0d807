"""convert / export on timm and torchvision models."""

from __future__ import annotations

import contextlib
import copy
import json
import warnings

import pytest
import timm
import torch
import torchvision
from timm.layers import BatchNormAct2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import lightning_whiten as lw
from lightning_whiten.layers import IterNormAct, WhiteningNorm

# Normalization types, listed independently of the package's own detection.
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm2d)

_LARGE = {"resnet50d", "efficientnet_b0", "densenet121", "vgg11_bn"}  # 3-6 s a case: `slow`
ARCHITECTURES = [
    pytest.param(library, arch, id=f"{library}-{arch}", marks=[pytest.mark.slow] * (arch in _LARGE))
    for library, arch in [
        ("timm", "resnet18"),
        ("timm", "resnet50d"),
        ("timm", "efficientnet_b0"),
        ("timm", "mobilenetv3_large_100"),
        ("timm", "regnety_002"),
        ("timm", "densenet121"),
        ("timm", "resnetv2_50x1_bit"),  # GroupNorm: nothing to convert
        ("timm", "convnext_nano"),  # LayerNorm: nothing to convert
        ("torchvision", "resnet18"),
        ("torchvision", "mobilenet_v3_small"),
        ("torchvision", "efficientnet_b0"),
        ("torchvision", "vgg11_bn"),
    ]
]
OPTIONS = {
    "iternorm": {"group_size": 16, "iterations": 5},
    "dbn": {"group_size": 16},
    "swbn": {"group_size": 16, "whitening_rate": 0.05},
}


def create(library: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    if library == "timm":
        return timm.create_model(name, pretrained=False, num_classes=10)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    if name.startswith("vgg"):
        # VGG's 120M-parameter classifier (no normalization in it) made this case 10x slower
        # than any other: a single linear layer keeps every BatchNorm and convolution.
        torch.manual_seed(0)
        model.classifier = nn.Linear(512 * 7 * 7, 10)
    return model


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NORM_TYPES)}


def randomize_bn_statistics(model: nn.Module) -> None:
    """Pretend the model was trained: non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


@contextlib.contextmanager
def stage(name: str):
    """Name the stage of a multi-stage test in its failure message."""
    try:
        yield
    except Exception as err:
        raise AssertionError(f"stage {name!r} failed: {type(err).__name__}: {err}") from err


def assert_same_output(actual, expected):
    # float64 throughout; after training, eval outputs can be in the hundreds, so the
    # tolerance is relative to the output's scale (the summation order of a multi-threaded
    # GEMM changes the last bits).
    scale = float(expected.abs().max().clamp_min(1.0))
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-9 * scale)


@pytest.mark.parametrize("layer", list(OPTIONS))
@pytest.mark.parametrize(("library", "arch"), ARCHITECTURES)
def test_convert_train_export_matrix(library, arch, layer):
    # float64 throughout: after three training steps the running statistics do not match the
    # data yet, eval activations get large and float32 rounding would be amplified; in float64
    # every comparison below is exact to ~1e-9 (float32 paths are covered by other tests).
    model = create(library, arch).double()
    randomize_bn_statistics(model)
    original_norms = norm_modules(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        before = model(x)

    with stage("1 convert: eval output unchanged"):
        report = lw.convert(model, layer, **OPTIONS[layer])
        with torch.no_grad():
            assert_same_output(model(x), before)

    with stage("2 report: every normalization module accounted for, by name"):
        assert report.num_replaced + report.num_skipped == len(original_norms)
        reported = {r.name for r in report.replaced} | {s.name for s in report.skipped}
        assert reported == set(original_norms)
        for r in report.replaced:
            assert isinstance(model.get_submodule(r.name), WhiteningNorm)
            assert r.old_type == type(original_norms[r.name]).__name__
        for s in report.skipped:
            assert type(model.get_submodule(s.name)) is type(original_norms[s.name])
            assert s.reason
        if arch in ("resnetv2_50x1_bit", "convnext_nano"):
            assert report.num_replaced == 0
            assert all("not batch normalization" in s.reason for s in report.skipped)
            return
        assert report.num_replaced > 0
        # skipped BatchNorms are exactly those after depthwise convolutions
        for s in report.skipped:
            assert "depthwise" in s.reason

    with stage("3 train: finite gradients, non-diagonal whitening"):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        for step in range(3):
            batch = torch.randn(8, 3, 64, 64, dtype=torch.float64)
            loss = nn.functional.cross_entropy(model(batch), torch.randint(0, 10, (8,)))
            optimizer.zero_grad()
            loss.backward()
            if step == 0:
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        assert p.grad is not None and torch.isfinite(p.grad).all(), name
            optimizer.step()
        whitening = [m for m in model.modules() if isinstance(m, WhiteningNorm)]
        matrix = whitening[0].whitening if layer == "swbn" else whitening[0].running_whitening
        off_diagonal = matrix - torch.diag_embed(matrix.diagonal(dim1=-2, dim2=-1))
        assert off_diagonal.abs().max() > 1e-6

    with stage("4 export: plain modules, same eval output"):
        model.eval()
        with torch.no_grad():
            whitened = model(x)
        plan = lw.surgery.plan_export(model, x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # densenet: unfolded layers are reported
            exported = lw.export(model, example_input=x)
        assert not any(isinstance(m, WhiteningNorm) for m in exported.modules())
        with torch.no_grad():
            assert_same_output(exported(x), whitened)

    if arch == "densenet121":
        with stage("5 export plan: pre-activation norms reported as not foldable"):
            # pre-activation norms read concatenated features: not foldable, reported as such
            assert plan.unfolded
            assert all("not the output of a convolution" in r for r in plan.unfolded.values())
            assert all(
                ".norm1" in n or "transition" in n or n.endswith("norm5") for n in plan.unfolded
            )
        return
    with stage("5 export plan: every layer folded"):
        assert not plan.unfolded
    with stage("6 reload: the exported state_dict loads strictly into a fresh model"):
        fresh = create(library, arch).double()
        fresh.load_state_dict(exported.state_dict(), strict=True)
        fresh.eval()
        with torch.no_grad():
            assert_same_output(fresh(x), whitened)


def small_net(norm: type[nn.Module] = nn.BatchNorm2d) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), norm(32), nn.ReLU(),
        nn.Conv2d(32, 48, 3, padding=1), norm(48), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10), nn.BatchNorm1d(10),
    )  # fmt: skip


def test_batchnormact_keeps_activation_and_drop_in_order():
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    model = nn.Sequential(nn.Conv2d(3, 16, 1), BatchNormAct2d(16, act_layer=nn.Hardtanh))
    model[1].drop = Double()  # act(drop(x)) = clamp(2x) differs from 2 clamp(x)
    randomize_bn_statistics(model)
    model.eval()
    x = torch.randn(4, 3, 5, 5)
    expected = model(x)
    report = lw.convert(model, "iternorm", group_size=8)
    assert isinstance(model[1], IterNormAct) and isinstance(model[1].act, nn.Hardtanh)
    assert report.replaced[0].new_type == "IterNormAct"
    torch.testing.assert_close(model(x), expected)


def test_names_flags_device_dtype_mode_and_sharing_are_preserved():
    shared = nn.BatchNorm2d(16)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 1), shared, nn.ReLU(), nn.Conv2d(16, 16, 1), shared
    ).double()
    model[1].bias.requires_grad_(False)
    model.eval()
    keys = {k for k in model.state_dict() if k.endswith(("weight", "bias"))}
    report = lw.convert(model, "dbn", group_size=8)
    assert model[1] is model[4] and isinstance(model[1], lw.DBN)
    assert report.num_replaced == 1 and "shared, also at 4" in report.replaced[0].notes[0]
    assert keys <= set(model.state_dict())
    assert model[1].weight.dtype == torch.float64 and not model[1].training
    assert model[1].weight.requires_grad and not model[1].bias.requires_grad
    model.train()
    assert model[1].training


def test_selection_include_exclude_types_min_channels_placement_stages():
    model = timm.create_model("resnet18", pretrained=False)
    report = lw.convert(model, "iternorm", include=["layer1", "layer2.0.*"], exclude="*.bn2")
    assert {r.name for r in report.replaced} == {
        "layer1.0.bn1", "layer1.1.bn1", "layer2.0.bn1", "layer2.0.downsample.1",
    }  # fmt: skip
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["layer1.0.bn2"] == "excluded by '*.bn2'"
    assert reasons["layer3.0.bn1"] == "not matched by include"

    model = small_net()
    report = lw.convert(model, "swbn", exclude=nn.BatchNorm1d, min_channels=40)
    assert [r.name for r in report.replaced] == ["4"]
    assert "32 channels < min_channels=40" in {s.name: s.reason for s in report.skipped}["1"]
    assert (
        "type:torch.nn.modules.batchnorm.BatchNorm1d"
        in {s.name: s.reason for s in report.skipped}["9"]
    )

    report = lw.convert(
        timm.create_model("resnet18", pretrained=False), "iternorm", placement="first"
    )
    assert [r.name for r in report.replaced] == ["bn1"] and report.num_skipped == 19

    report = lw.convert(torchvision.models.resnet18(weights=None), "iternorm", stages=[4])
    assert all(r.name.startswith("layer4.") for r in report.replaced) and report.num_replaced == 5


def test_group_size_larger_than_channels_is_clamped_with_a_note():
    report = lw.convert(small_net(), "iternorm", group_size=64)
    notes = {r.name: r.notes for r in report.replaced}
    assert notes["1"] == ("group_size 64 clamped to 32 channels",)
    assert report.replaced[0].group_sizes == (32,)


def test_grouped_convolution_caps_the_group_size_with_a_note():
    model = nn.Sequential(nn.Conv2d(32, 32, 3, groups=4), nn.BatchNorm2d(32))
    report = lw.convert(model, "iternorm", group_size=16)
    assert model[1].group_size == 8
    assert "to stay inside the channel groups (8 channels)" in report.replaced[0].notes[0]
    model = nn.Sequential(nn.Conv2d(32, 32, 3, groups=4), nn.BatchNorm2d(32))
    lw.convert(model, "iternorm", group_size=16, respect_conv_groups=False)
    assert model[1].group_size == 16


class _PreActNeighbour(nn.Module):
    """DPN-style: the grouped conv lives in one block, the norm reading it in the next."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, groups=8))
        self.b = nn.Sequential(nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 10, 1))

    def forward(self, x):
        return self.b(self.a(x)).mean((2, 3))


class _MixedConv(nn.Module):
    """timm MixedConv2d-style: channel splits through separate convs, concatenated."""

    def __init__(self, depthwise: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 1)
        if depthwise:
            self.mixed = nn.ModuleList(
                [nn.Conv2d(12, 12, 3, groups=12), nn.Conv2d(12, 12, 5, 1, 1, groups=12)]
            )
        else:
            self.mixed = nn.ModuleList([nn.Conv2d(12, 8, 1), nn.Conv2d(12, 16, 1)])
        width = sum(c.out_channels for c in self.mixed)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        parts = torch.split(self.stem(x), 12, 1)
        x = torch.cat([conv(p) for conv, p in zip(self.mixed, parts, strict=True)], 1)
        return self.head(self.bn(x).mean((2, 3)))


def _train_a_little(model, x):
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x + torch.randn_like(x))
    model.eval()


def test_group_size_follows_the_traced_producer_not_module_order():
    model = _PreActNeighbour()
    report = lw.convert(model, "iternorm", group_size=16)
    assert model.b[0].group_size == 4  # inside the 4-channel groups of a[2], a neighbour
    assert "a.2" in report.replaced[0].producer  # the report names the traced producer
    x = torch.randn(4, 3, 12, 12)
    _train_a_little(model, x)
    plan = lw.surgery.plan_export(model, x)
    assert plan.folded == {"b.0": "a.2"}


def test_norm_after_concatenated_depthwise_convs_is_skipped():
    model = _MixedConv(depthwise=True)
    report = lw.convert(model, "iternorm", group_size=8)
    assert report.num_replaced == 0
    assert "depthwise" in report.skipped[0].reason


def test_export_folds_into_concatenated_convolutions():
    torch.manual_seed(0)
    model = _MixedConv(depthwise=False)
    fresh = copy.deepcopy(model)
    report = lw.convert(model, "dbn", group_size=16)
    assert model.bn.group_size == 8  # gcd of the 8- and 16-channel outputs
    assert "8/16 channels" in report.replaced[0].notes[0]
    x = torch.randn(6, 3, 10, 10)
    _train_a_little(model, x)
    with torch.no_grad():
        whitened = model(x)
    exported = lw.export(model, example_input=x)
    assert isinstance(exported.bn, nn.BatchNorm2d)
    fresh.load_state_dict(exported.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), whitened, rtol=1e-4, atol=1e-5)


class _FunctionalUse(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        y = self.conv(x)
        if self.kind == "inplace":
            y = nn.functional.relu(y, inplace=True)
            return self.bn(y).mean((2, 3))
        if self.kind == "residual":
            return (self.bn(y) + y).mean((2, 3))
        return self.bn(y.contiguous()).mean((2, 3))  # a no-op on y: still foldable


@pytest.mark.parametrize("kind", ["inplace", "residual", "noop"])
def test_export_does_not_fold_into_a_conv_whose_output_plain_code_uses(kind):
    torch.manual_seed(0)
    model = _FunctionalUse(kind)
    lw.convert(model, "iternorm", group_size=8)
    x = torch.randn(4, 3, 8, 8)
    _train_a_little(model, x)
    with torch.no_grad():
        whitened = model(x)
    plan = lw.surgery.plan_export(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        exported = lw.export(model, example_input=x, check=False)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), whitened, rtol=1e-4, atol=1e-5)
    if kind == "noop":
        assert plan.folded == {"bn": "conv"}
    else:
        assert "bn" in plan.unfolded
        assert "modified in place" in plan.unfolded["bn"] or "used elsewhere" in plan.unfolded["bn"]


def test_convert_and_export_leave_the_global_rng_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, groups=1), nn.BatchNorm2d(8), nn.ReLU())
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    lw.convert(model, "iternorm", group_size=4)
    lw.export(model.eval())
    torch.testing.assert_close(torch.rand(3), expected)


def test_export_folds_a_norm_without_affine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, affine=False))
    fresh = copy.deepcopy(model)
    lw.convert(model, "swbn", group_size=4)
    x = torch.randn(6, 3, 8, 8)
    model.train()
    for _ in range(3):
        model(x)
    model.eval()
    with torch.no_grad():
        whitened = model(x)
    exported = lw.export(model, example_input=x)
    fresh.load_state_dict(exported.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), whitened, rtol=1e-4, atol=1e-5)


def test_frozen_batchnorm_only_on_request():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), FrozenBatchNorm2d(16))
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 2)
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    report = lw.convert(model, "iternorm")
    assert report.num_replaced == 0 and "frozen=True" in report.skipped[0].reason
    report = lw.convert(model, "iternorm", frozen=True)
    assert isinstance(model[1], lw.IterNorm) and not model[1].weight.requires_grad
    model.eval()
    torch.testing.assert_close(model(x), expected)


def test_sync_batchnorm_and_no_running_stats():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.SyncBatchNorm(16), nn.BatchNorm2d(16, track_running_stats=False)
    )
    report = lw.convert(model, "iternorm")
    assert [r.name for r in report.replaced] == ["1"]
    assert "track_running_stats=False" in report.skipped[0].reason
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16, track_running_stats=False))
    x = torch.randn(8, 3, 4, 4)
    model.eval()
    expected = model(x)
    lw.convert(model, "swbn")  # SWBN with W = I is exactly BN, also with batch statistics
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_report_serializes_and_renders():
    model = timm.create_model("efficientnet_b0", pretrained=False)
    report = lw.convert(model, "iternorm", group_size=16)
    data = json.loads(json.dumps(report.to_dict()))
    assert lw.ConversionReport.from_dict(data) == report
    assert data["spec"]["options"] == {"group_size": 16}
    text = str(report)
    assert "blocks.1.0.bn1" in text and "BatchNormAct2d" in text and "IterNormAct" in text
    assert report.counts()["replaced"] == report.num_replaced


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"unknown layer 'iternrom'.*did you mean 'iternorm'"):
        lw.convert(small_net(), "iternrom")
    with pytest.raises(TypeError, match=r"IterNorm does not take the option 'whitening_rate'"):
        lw.convert(small_net(), "iternorm", whitening_rate=0.1)
    with pytest.raises(TypeError, match=r"SWBN does not take the option 'iteration'.*"):
        lw.convert(small_net(), "swbn", iteration=3)
    with pytest.raises(ValueError, match=r"IterNorm: iterations must be"):
        lw.convert(small_net(), "iternorm", iterations=0)
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(
        ValueError, match=r"include pattern 'layer1.0.bn3' matches no.*close names: .*layer1.0.bn1"
    ):
        lw.convert(model, include="layer1.0.bn3")
    with pytest.raises(
        ValueError, match=r"exclude pattern 'head.\*' matches no normalization module"
    ):
        lw.convert(model, exclude="head.*")
    with pytest.raises(ValueError, match=r"exclude type GroupNorm matches no"):
        lw.convert(model, exclude=nn.GroupNorm)
    assert not any(isinstance(m, WhiteningNorm) for m in model.modules())  # nothing touched
    with pytest.raises(ValueError, match=r"'fc\*' matches modules \(fc\) but none of them is"):
        lw.convert(model, exclude="fc*")
    with pytest.raises(ValueError, match=r"'torch.nn' has no 'BatchNorm2D'.*torch.nn.BatchNorm2d"):
        lw.convert(model, include="type:torch.nn.BatchNorm2D")
    with pytest.raises(ValueError, match=r"cannot import 'nopkg'"):
        lw.convert(model, layer="nopkg.MyNorm")
    with pytest.raises(ValueError, match=r"'torch.nn.ReLU' is not a whitening layer"):
        lw.convert(model, layer="torch.nn.ReLU")
    with pytest.raises(TypeError, match=r"a glob string, a type or a list"):
        lw.convert(model, include=3)
    assert not any(isinstance(m, WhiteningNorm) for m in model.modules())  # nothing touched
    with pytest.raises(TypeError, match="DataParallel-wrapped"):
        lw.convert(nn.DataParallel(small_net()))
    nested = nn.Sequential(nn.DataParallel(small_net()), nn.BatchNorm1d(10))
    with pytest.raises(TypeError, match=r"DataParallel-wrapped model \(at '0'\)"):
        lw.convert(nested)
    # group_size=None means the layer's default, as in the layer's own constructor
    lw.convert(model, "dbn", group_size=None)
    assert model.bn1.group_size == lw.layers.layer_options(lw.DBN)["group_size"]
    with pytest.raises(TypeError, match=r"torch\.compile"):
        lw.convert(torch.compile(small_net()))
    with pytest.raises(ValueError, match="from_batchnorm"):
        lw.convert(nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="stages= needs"):
        lw.convert(small_net(), stages=[1])


def test_export_without_fold_uses_plain_one_by_one_maps_and_torch_export():
    model = small_net()
    lw.convert(model, "iternorm", group_size=16, exclude=nn.BatchNorm1d)
    model.train()
    for _ in range(3):
        model(torch.randn(16, 3, 8, 8))
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)
    exported = lw.export(model, fold=False, example_input=x)
    assert isinstance(exported[1], nn.Conv2d) and exported[1].groups == 2  # 32 = 2 x 16
    assert isinstance(exported[4], nn.Conv2d) and exported[4].groups == 3  # 48 = 3 x 16
    assert isinstance(model[1], lw.IterNorm)  # not in place by default
    torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-5)
    program = torch.export.export(exported, (x,))
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)


def test_export_folded_resnet_works_with_torch_export():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    lw.convert(model, "iternorm", group_size=16)
    model.train()
    model(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    exported = lw.export(model, example_input=x)
    program = torch.export.export(exported, (x,))
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-4)


def test_export_check_tells_conditioning_from_errors():
    # Nearly equal channels blown up by a tiny running variance, then subtracted: float32
    # rounding of the large intermediates dominates the small output (cancellation), and any
    # reordering of the arithmetic changes it. The fold itself is exact, as the float64 re-check
    # shows: a warning, not an error.
    torch.manual_seed(0)
    conv1, bn, conv2 = nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8, eps=1e-12), nn.Conv2d(8, 4, 1)
    with torch.no_grad():
        conv1.weight[1::2] = conv1.weight[0::2] + 1e-4
        conv1.bias[1::2] = conv1.bias[0::2]
        bn.running_var.fill_(1e-10)
        conv2.weight.zero_()
        for k in range(4):
            conv2.weight[k, 2 * k], conv2.weight[k, 2 * k + 1] = 1.0, -1.0
    model = nn.Sequential(conv1, bn, conv2)
    lw.convert(model, "iternorm", group_size=8)
    model.eval()
    with pytest.warns(UserWarning, match="exactly in float64"):
        lw.export(model, example_input=torch.randn(2, 4, 4, 4))


def test_export_of_layers_built_directly():
    model = nn.Sequential(
        nn.Conv2d(3, 24, 3, bias=False), lw.IterNormAct(24, group_size=8, act=nn.ReLU())
    )
    model(torch.randn(16, 3, 6, 6))
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    exported = lw.export(model, example_input=x)
    assert exported[0].bias is not None  # the bias had to go somewhere
    assert isinstance(exported[1], nn.Sequential) and isinstance(exported[1][0], nn.ReLU)
    torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_refuses_layers_without_running_statistics():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), lw.IterNorm(8, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        lw.export(model, example_input=torch.randn(2, 3, 4, 4))
