"""The conversion spec, the dry-run plan, the family registry and the layers' option plumbing."""

from __future__ import annotations

import copy
import json
import warnings
from typing import Any, ClassVar

import pytest
import timm
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning_helpers import TinyClassifier, loader
from torch import Tensor, nn

import lightning_whiten as lw
from lightning_whiten.layers import NormActMixin, layer_options
from lightning_whiten.registry import NormFamily, register_family, unregister_family
from lightning_whiten.surgery import ConversionSpec, plan_conversion


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


# -- the spec ------------------------------------------------------------------------------------
def test_spec_round_trips_and_validates_once():
    spec = ConversionSpec.of("IterNorm", group_size=8, iterations=3, exclude=["1"], stages=None)
    assert spec.layer == "iternorm" and spec.options == {"group_size": 8, "iterations": 3}
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["version"] == lw.surgery.SPEC_VERSION
    assert ConversionSpec.from_dict(data) == spec
    # the unversioned dict that checkpoints held before the spec existed still reads
    legacy = {k: v for k, v in data.items() if k not in ("version", "types")}
    assert ConversionSpec.from_dict(legacy) == spec
    with pytest.raises(ValueError, match="written by a newer release"):
        ConversionSpec.from_dict({**data, "version": 99})
    with pytest.raises(ValueError, match=r"unknown keys \['grup_size'\]"):
        ConversionSpec.from_dict({**data, "grup_size": 4})
    with pytest.raises(TypeError, match="IterNorm does not take the option 'group'"):
        ConversionSpec.of("iternorm", group=8)
    with pytest.raises(ValueError, match="IterNorm: iterations must be"):
        ConversionSpec.of("iternorm", iterations=0)
    with pytest.raises(ValueError, match="placement must be"):
        ConversionSpec.of("iternorm", placement="last")
    with pytest.raises(ValueError, match="unknown layer 'iternrom'"):
        ConversionSpec.of("iternrom")


def test_spec_from_a_file_never_imports():
    # A crafted spec naming a module that is not imported must not run its top-level code.
    data = ConversionSpec.of("dbn").to_dict()
    with pytest.raises(ValueError, match="not imported"):
        ConversionSpec.from_dict({**data, "layer": "antigravity.Fly"})
    with pytest.raises(ValueError, match="not imported"):
        ConversionSpec.from_dict({**data, "include": ["type:antigravity.Fly"]})
    # names of modules already imported, and registered families, resolve
    spec = ConversionSpec.from_dict({**data, "types": ["type:torch.nn.BatchNorm2d"]})
    assert spec.types == (nn.BatchNorm2d,)


def test_convert_takes_a_whole_spec():
    spec = ConversionSpec.of("iternorm", group_size=8, types=["type:torch.nn.BatchNorm2d"])
    model = small_net()
    report = lw.convert(model, spec)
    assert report.spec == spec and report.num_replaced == 2
    with pytest.raises(TypeError, match=r"convert\(model, spec\) takes the whole conversion"):
        lw.convert(small_net(), spec, group_size=4)


# -- the plan ------------------------------------------------------------------------------------
def test_plan_changes_nothing_and_explains_every_decision():
    model = timm.create_model("regnety_002", pretrained=False)
    state = copy.deepcopy(model.state_dict())
    modules = dict(model.named_modules())
    plan = plan_conversion(model, ConversionSpec.of("iternorm", group_size=64, exclude="stem*"))
    assert dict(model.named_modules()) == modules  # nothing replaced
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    assert plan.trace.status == "traced"
    by_name = {d.name: d for d in plan.decisions}
    assert not by_name["stem.bn"].replace and "excluded by 'stem*'" in by_name["stem.bn"].reason
    capped = [d for d in plan.to_replace if d.options]
    assert capped and all(d.options["group_size"] < 64 for d in capped)
    assert all("to stay inside the channel groups" in d.notes[0] for d in capped)
    assert all(d.producer is not None and d.producer.found_by == "trace" for d in plan.to_replace)
    text = str(plan)
    assert "plan (dry run)" in text and "(trace)" in text
    report = plan.apply(model)
    assert report.applied and report.num_replaced == len(plan.to_replace)
    assert {r.name for r in report.replaced} == {d.name for d in plan.to_replace}


def test_plan_reports_and_warns_when_the_trace_falls_back():
    class TakesTwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = small_net()

        def forward(self, x: Tensor, scale: Tensor) -> Tensor:
            return self.body(x) * scale

    model = TakesTwoInputs()
    plan = plan_conversion(model, ConversionSpec.of("iternorm", group_size=16))
    assert plan.trace.status == "failed" and "TypeError" in plan.trace.detail
    grouped = next(d for d in plan.decisions if d.name == "body.4")
    assert grouped.producer.found_by == "module order" and grouped.options == {"group_size": 8}
    with pytest.warns(UserWarning, match="tracing the model's forward failed"):
        report = plan.apply(model)
    assert "producers from module order" in report.title()
    # with a real example input the trace works
    plan = plan_conversion(small_net(), ConversionSpec.of("iternorm"), torch.randn(2, 3, 8, 8))
    assert plan.trace.status == "traced"


def test_a_stale_plan_is_refused():
    model = small_net()
    plan = plan_conversion(model, ConversionSpec.of("dbn", group_size=8))
    with pytest.raises(RuntimeError, match="the plan does not fit this model"):
        plan.apply(small_net())


def test_report_groups_repeated_notes_and_prints_wide_when_piped():
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)) for _ in range(5)])
    report = lw.convert(model, "iternorm", group_size=1000)
    text = str(report)  # not a terminal: wide enough for every cell
    assert text.count("group_size 1000 clamped to 8 channels") == 1
    assert text.count("[1]") == 6  # five rows refer to the note printed once below the table
    assert all(len(line) < 200 for line in text.splitlines())


# -- the registry: a family defined here plugs into convert, training, export and checkpoints ---
class Scale(nn.Module):
    """A toy per-channel normalization: ``y = weight * (x - running_mean) * running_scale + bias``
    in eval, batch statistics in training."""

    schedulable = ("momentum",)

    def __init__(self, num_features: int, *, momentum: float = 0.1, power: float = 1.0,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None) -> None:  # fmt: skip
        super().__init__()
        if power <= 0:
            raise ValueError(f"Scale: power must be > 0, got {power}")
        self.num_features, self.momentum, self.power = num_features, momentum, power
        self.track_running_stats = track_running_stats
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("running_mean", torch.zeros(num_features, device=device))
        self.register_buffer("running_scale", torch.ones(num_features, device=device))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            dims = [0, *range(2, x.dim())]
            mean = x.mean(dims)
            scale = (x - mean.view(shape)).abs().mean(dims).clamp_min(1e-5) ** -self.power
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_scale.lerp_(scale, self.momentum)
        else:
            mean, scale = self.running_mean, self.running_scale
        y = (x - mean.view(shape)) * scale.view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape)

    def inference_map(self) -> tuple[Tensor, Tensor]:
        return self.running_scale.view(-1, 1, 1), self.running_mean

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, **options: Any) -> Scale:
        layer = cls(bn.num_features, **options)
        with torch.no_grad():
            layer.running_mean.copy_(bn.running_mean)
            layer.running_scale.copy_((bn.running_var + bn.eps).rsqrt())
            layer.weight.copy_(bn.weight)
            layer.bias.copy_(bn.bias)
        return layer.train(bn.training)


class ScaleAct(NormActMixin, Scale):
    pass


@pytest.fixture
def scale_family():
    family = register_family(NormFamily("toy-scale", Scale, act_layer=ScaleAct, group_option=None))
    yield family
    unregister_family("toy-scale")


def test_a_registered_family_converts_trains_exports_and_reloads(tmp_path, scale_family):
    assert lw.registry.get_family("ToyScale") is scale_family
    assert scale_family.options == {"momentum": 0.1, "power": 1.0, "affine": True,
                                    "track_running_stats": True}  # fmt: skip
    model = small_net().eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
        before = model(x)
    report = lw.convert(model, "toy-scale", power=1.0)
    assert report.num_replaced == 2 and isinstance(model[4], Scale)
    assert model[4].origin.name == "4"  # no group cap for a per-channel family
    torch.testing.assert_close(model(x), before)
    with pytest.raises(TypeError, match="Scale does not take the option 'iterations'"):
        lw.convert(small_net(), "toy-scale", iterations=3)
    with pytest.raises(ValueError, match="Scale: power must be > 0"):
        lw.convert(small_net(), "toy-scale", power=0)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        loss = model(torch.randn(8, 3, 8, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(x)
    exported = lw.export(model, example_input=x)
    assert [type(m).__name__ for m in exported.modules()].count("BatchNorm2d") == 2
    torch.testing.assert_close(exported(x), trained, rtol=1e-4, atol=1e-5)
    fresh = small_net()
    fresh.load_state_dict(exported.state_dict())  # the original architecture, strictly

    # through the callback: a checkpoint that names the family loads back
    seed_everything(0)
    module = TinyClassifier(width=16)
    callback = lw.WhiteningCallback("toy-scale", exclude="aux", schedules={"momentum": 0.2})
    Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=3, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    ).fit(module, loader())  # fmt: skip
    ckpt = next(tmp_path.rglob("*.ckpt"))
    loaded = lw.load_converted(TinyClassifier, ckpt)
    assert sum(isinstance(m, Scale) for m in loaded.modules()) == 2
    assert all(m.momentum == 0.2 for m in loaded.modules() if isinstance(m, Scale))
    batch = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(loaded(batch), module.eval()(batch))


def test_a_family_that_cannot_fold_refuses_export(scale_family):
    refusing = NormFamily(
        "toy-scale", Scale, act_layer=ScaleAct, group_option=None,
        export="its map depends on the batch",
    )  # fmt: skip
    register_family(refusing, replace=True)
    model = small_net()
    lw.convert(model, "toy-scale")
    with pytest.raises(
        ValueError, match="cannot export Scale at '1': its map depends on the batch"
    ):
        lw.export(model.eval(), example_input=torch.randn(2, 3, 8, 8))


def test_registering_a_taken_name_needs_replace(scale_family):
    with pytest.raises(ValueError, match="already registered as 'toyscale'"):
        register_family(NormFamily("toy_scale", lw.DBN))


# -- layers: options declared once, reset like torch's norms, versioned state ------------------
def test_layer_options_are_declared_once_and_keyword_only():
    assert list(layer_options(lw.IterNorm))[:3] == ["group_size", "iterations", "method"]
    assert layer_options(lw.SWBN)["eps"] == 1e-8 and layer_options(lw.DBN)["eps"] == 1e-5
    assert layer_options(lw.IterNormAct) == layer_options(lw.IterNorm)
    with pytest.raises(TypeError):
        lw.IterNorm(32, 16, 5, "newton", 1e-3)  # eps is keyword-only: nothing shifts silently
    layer = lw.IterNorm(32, eps=1e-3, momentum=0.2)
    assert (layer.eps, layer.momentum, layer.group_size) == (1e-3, 0.2, 32)


@pytest.mark.parametrize("name", ["iternorm", "dbn", "swbn"])
def test_reset_parameters_and_running_stats(name):
    cls = lw.registry.get_family(name).layer
    layer = cls(24, group_size=8)
    fresh = copy.deepcopy(layer)
    with torch.no_grad():
        layer.weight.mul_(3)
        layer.bias.add_(1)
    for _ in range(2):
        layer(torch.randn(32, 24))
    assert any(not torch.equal(a, b) for a, b in zip(layer.buffers(), fresh.buffers(), strict=True))
    layer.reset_running_stats()
    for (key, a), b in zip(layer.state_dict().items(), fresh.state_dict().values(), strict=True):
        if key not in ("weight", "bias"):
            assert torch.equal(a, b), key
    layer.reset_parameters()
    for (key, a), b in zip(layer.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_state_dict_versions_are_migrated_on_load():
    class Renamed(lw.IterNorm):
        _version = 2  # version 2 renamed a buffer; version-1 checkpoints are migrated

        def _migrate_state(self, state_dict, prefix, version):
            old = state_dict.pop(prefix + "running_whitening_old", None)
            if old is not None:
                state_dict[prefix + "running_whitening"] = old

    layer = Renamed(8, group_size=4)
    state = layer.state_dict()
    state["running_whitening_old"] = state.pop("running_whitening") * 2
    state._metadata[""]["version"] = 1  # as a version-1 layer wrote it
    layer.load_state_dict(state)
    assert torch.equal(layer.running_whitening, 2 * torch.eye(4).expand(2, 4, 4))


def test_surgery_metadata_is_one_typed_field():
    model = small_net()
    lw.convert(model, "iternorm", group_size=8)
    origin = model[1].origin
    assert isinstance(origin, lw.surgery.Origin) and origin.name == "1"
    assert origin.source.cls == "torch.nn.modules.batchnorm.BatchNorm2d"
    assert "at '1'" in model[1].describe()
    assert not hasattr(model[1], "converted_from") and not hasattr(model[1], "qualified_name")


def test_unknown_cifar_backbone_options_are_an_error():
    with pytest.raises(TypeError, match=r"does not take the option\(s\) \['depth'\].*dropout"):
        lw.ImageClassifier("cifar/wrn16_4", backbone_options={"depth": 40})


def test_the_monitor_times_any_layer_through_the_autograd_graph():
    # no class names: the monitor walks from a layer's output node to its input's node
    from lightning_whiten.callbacks.monitor import WhiteningMonitor

    monitor = WhiteningMonitor()
    layer = lw.IterNorm(8, group_size=4)
    x = torch.randn(16, 8, requires_grad=True)
    inner = x * 2  # the node the layer's backward must stop before
    y = layer(inner)

    class Stats:
        node_marks: ClassVar[list] = []
        timed_nodes = 0

    class Clock:
        def mark(self):
            return 0.0

    monitor._clock = Clock()
    monitor._time_backward(Stats, y.grad_fn, inner.grad_fn)
    assert Stats.timed_nodes >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y.sum().backward()
    assert len(Stats.node_marks[0]) == Stats.timed_nodes  # every timed node ran, none outside
