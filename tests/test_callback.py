"""WhiteningCallback in a real Trainer: conversion, schedules, checkpoints, resume, DDP."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy
from lightning_helpers import BufferDump, TinyClassifier, loader, make_data, trainer
from torch import nn
from torch.utils.data import DataLoader

import lightning_whiten as lw
from lightning_whiten.layers import WhiteningNorm
from lightning_whiten.schedules import Constant, Cosine, Linear, Piecewise, Step


class RecordingLogger(Logger):
    name = "recording"
    version = 0

    def __init__(self):
        super().__init__()
        self.hparams: dict = {}
        self.metrics: list[dict] = []

    def log_hyperparams(self, params, *args, **kwargs):
        self.hparams.update(params)

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))


def whitening_layers(module):
    return [m for m in module.modules() if isinstance(m, WhiteningNorm)]


@pytest.mark.parametrize("build_in", ["init", "configure_model"])
def test_converts_at_setup_and_logs_the_report(tmp_path, build_in, capsys):
    seed_everything(0)
    model = TinyClassifier(build_in=build_in)
    logger = RecordingLogger()
    callback = lw.WhiteningCallback("iternorm", layer_options={"group_size": 16}, exclude="aux")
    trainer(tmp_path, [callback], max_steps=2, logger=logger).fit(model, loader())
    assert [type(m).__name__ for m in whitening_layers(model)] == ["IterNorm", "IterNorm"]
    assert callback.report.num_replaced == 2
    assert logger.hparams["whiten/replaced"] == 2 and logger.hparams["whiten/layer"] == "IterNorm"
    assert "net.1" in capsys.readouterr().out  # the rich table


def test_pretrained_weights_are_kept(tmp_path):
    seed_everything(0)
    model = TinyClassifier()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_()
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    before = model(x)
    callback = lw.WhiteningCallback("dbn", layer_options={"group_size": 8}, exclude="aux")
    trainer(tmp_path, [callback]).validate(model, loader(n=16))
    assert len(whitening_layers(model)) == 2
    model.eval()
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_iteration_schedule_is_applied_each_batch_and_logged(tmp_path):
    seed_everything(0)
    model = TinyClassifier()
    logger = RecordingLogger()
    schedule = Step(values=[2, 4, 7], milestones=[2, 4], unit="step")
    callback = lw.WhiteningCallback(
        "iternorm",
        layer_options={"group_size": 16},
        exclude="aux",
        schedules={"iterations": schedule},
    )
    trainer(tmp_path, [callback], max_steps=6, logger=logger, log_every_n_steps=1).fit(
        model, loader()
    )
    assert [s["iterations"] for s in model.seen] == [2, 2, 4, 4, 7, 7]
    logged = [m["whiten/iterations"] for m in logger.metrics if "whiten/iterations" in m]
    assert logged == [2, 4, 7]  # only when it changes


def test_schedules_in_epochs_fractions_per_pattern_and_rounding(tmp_path):
    seed_everything(0)
    model = TinyClassifier()
    callback = lw.WhiteningCallback(
        "iternorm",
        layer_options={"group_size": 16},
        exclude="aux",
        schedules={
            "iterations": Linear(start=1, end=5, unit="fraction"),  # rounded to integers
            "momentum@net.4": {
                "type": "piecewise",
                "points": [[0, 0.1], [1, 0.3]],
                "unit": "epoch",
            },
        },
    )
    trainer(tmp_path, [callback], max_epochs=2).fit(model, loader(n=64))  # 4 steps per epoch
    total = 8
    assert [s["iterations"] for s in model.seen] == [round(1 + 4 * i / total) for i in range(total)]
    assert model.net[1].momentum == 0.1  # not matched by the pattern
    assert model.net[4].momentum == pytest.approx(0.3)  # epoch 1.75 -> clamped at the last point


def test_swbn_whitening_rate_tied_to_learning_rate(tmp_path):
    seed_everything(0)
    model = TinyClassifier(step_lr=True, lr=0.1)
    callback = lw.WhiteningCallback(
        "swbn", layer_options={"group_size": 16}, exclude="aux", tie_whitening_rate_to_lr=1e-4
    )
    trainer(tmp_path, [callback], max_steps=9, max_epochs=2).fit(model, loader())
    rates = [s["whitening_rate"] for s in model.seen]
    lrs = [0.1 * 0.5 ** (i // 4) for i in range(9)]  # StepLR every 4 steps
    assert rates == pytest.approx([1e-4 * lr for lr in lrs])


def run(tmp_path, name, callback_factory, resume_from=None, **kwargs):
    seed_everything(0)
    model = TinyClassifier(step_lr=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1, every_n_epochs=1)
    t = trainer(
        tmp_path / name, [callback_factory(), checkpoint], enable_checkpointing=True, **kwargs
    )
    t.fit(model, loader(), ckpt_path=resume_from)
    return model, t


@pytest.mark.parametrize("layer", ["iternorm", "swbn"])
def test_resume_gives_the_same_losses_and_hyperparameters(tmp_path, layer):
    def make_callback():
        if layer == "iternorm":
            return lw.WhiteningCallback(
                "iternorm", layer_options={"group_size": 16}, exclude="aux",
                schedules={"iterations": Step([2, 5], [8], unit="step")},
            )  # fmt: skip
        return lw.WhiteningCallback(
            "swbn", layer_options={"group_size": 16}, exclude="aux", tie_whitening_rate_to_lr=1e-3
        )

    full, _ = run(tmp_path, "full", make_callback, max_epochs=3)  # 6 steps per epoch
    run(tmp_path, "first", make_callback, max_epochs=1)  # writes the mid-training checkpoint
    ckpt = sorted((tmp_path / "first").glob("*.ckpt"))[-1]
    resumed, _ = run(tmp_path, "resumed", make_callback, resume_from=str(ckpt), max_epochs=3)
    assert len(full.losses) == 18 and len(resumed.losses) == 12
    assert resumed.losses == pytest.approx(full.losses[6:], rel=1e-6, abs=1e-7)
    assert resumed.seen == full.seen[6:]
    for a, b in zip(whitening_layers(full), whitening_layers(resumed), strict=True):
        for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers(), strict=True):
            torch.testing.assert_close(x, y, msg=name, rtol=1e-5, atol=1e-6)


def test_load_converted_rebuilds_the_architecture_from_the_checkpoint(tmp_path):
    model, _ = run(
        tmp_path, "ckpt",
        lambda: lw.WhiteningCallback("iternorm", layer_options={"group_size": 8, "iterations": 3}, exclude="aux"),
        max_epochs=1,
    )  # fmt: skip
    ckpt = sorted((tmp_path / "ckpt").glob("*.ckpt"))[-1]
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)
    # from the class (hyperparameters come from the checkpoint) and from an instance
    loaded = lw.load_converted(TinyClassifier, ckpt)
    torch.testing.assert_close(loaded(x), expected)
    assert [m.iterations for m in whitening_layers(loaded)] == [3, 3]
    loaded = lw.load_converted(TinyClassifier(step_lr=True), ckpt)
    torch.testing.assert_close(loaded(x), expected)
    # and a plain model checkpoint gets a clear error
    torch.save({"state_dict": model.state_dict()}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="no whitening conversion"):
        lw.load_converted(TinyClassifier, tmp_path / "plain.ckpt")


@pytest.mark.parametrize(
    ("layer", "attribute", "values"),
    [("swbn", "eps", [1e-5, 0.1]), ("iternorm", "iterations", [2, 4])],
)
def test_load_converted_restores_the_values_schedules_reached(tmp_path, layer, attribute, values):
    # SWBN's eval map uses eps: a model loaded with the spec's starting eps instead of the
    # scheduled one would compute something else than the trained model.
    schedule = {"type": "step", "values": values, "milestones": [0.5], "unit": "fraction"}
    model, _ = run(
        tmp_path, "ckpt",
        lambda: lw.WhiteningCallback(layer, layer_options={"group_size": 8}, exclude="aux", schedules={attribute: schedule}),
        max_epochs=2,
    )  # fmt: skip
    ckpt = sorted((tmp_path / "ckpt").glob("*.ckpt"))[-1]
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    loaded = lw.load_converted(TinyClassifier, ckpt)
    assert [getattr(m, attribute) for m in whitening_layers(loaded)] == [values[-1]] * 2
    torch.testing.assert_close(loaded(x), model(x))


class FailIfTrained(TinyClassifier):
    def training_step(self, batch, batch_idx):
        raise AssertionError("training must not start")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"schedules": {"iteration": Constant(3)}},
            r"unknown attribute 'iteration'.*did you mean 'iterations'",
        ),
        (
            {"schedules": {"whitening_rate": Constant(1e-3)}},
            r"no layer has the attribute 'whitening_rate'.*SWBN",
        ),
        (
            {"schedules": {"iterations": Step([3, 0], [2])}},
            r"reaches the value 0.*iterations must be",
        ),
        ({"schedules": {"iterations@head.*": Constant(3)}}, r"pattern 'head.\*' matches no module"),
        ({"schedules": {"group_size": Constant(8)}}, r"unknown attribute 'group_size'"),
        (
            {"schedules": {"iterations@1": Constant(3)}},
            r"pattern '1' matches no.*close names: net.1",
        ),
        (
            {"include": "net.7"},
            r"include pattern 'net.7' matches modules \(net.7\) but none of them is or contains a norm",
        ),
        ({"layer_options": {"iteratons": 3}}, r"IterNorm does not take the option 'iteratons'"),
    ],
)
def test_bad_configuration_fails_at_setup_before_training(tmp_path, kwargs, match):
    model = FailIfTrained()
    options = {"layer": "iternorm", "exclude": "aux", **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        trainer(tmp_path, [lw.WhiteningCallback(**options)], max_steps=1).fit(model, loader())


def test_callback_added_twice_is_an_error(tmp_path):
    # Lightning refuses two instances of a stateful callback when the Trainer is built.
    callbacks = [lw.WhiteningCallback(exclude="aux"), lw.WhiteningCallback(exclude="aux")]
    with pytest.raises(
        RuntimeError, match="more than one stateful callback of type `WhiteningCallback`"
    ):
        trainer(tmp_path, callbacks, max_steps=1).fit(FailIfTrained(), loader())


def test_whitening_layers_survive_lightning_sync_batchnorm():
    # What Trainer(sync_batchnorm=True) applies to the model after the callback's setup (torch's
    # DDP refuses SyncBatchNorm on CPU modules, so this is tested without a DDP run).
    from lightning.pytorch.plugins import TorchSyncBatchNorm

    model = TinyClassifier()
    lw.convert(model, "iternorm", group_size=16, exclude="aux")
    model = TorchSyncBatchNorm().apply(model)
    assert isinstance(model.net[1], lw.IterNorm) and isinstance(model.net[4], lw.IterNorm)
    assert isinstance(model.aux[1], nn.SyncBatchNorm)


def test_schedule_and_tie_conflict_is_an_error():
    with pytest.raises(ValueError, match="choose one"):
        lw.WhiteningCallback(
            "swbn", schedules={"whitening_rate": 1e-4}, tie_whitening_rate_to_lr=1e-4
        )


def test_non_finite_batches_off_cpu_are_reported_once_per_epoch(tmp_path, monkeypatch):
    # Simulate an accelerator: layers only count (no per-step host read), the callback warns.
    monkeypatch.setattr("lightning_whiten.layers.base.warns_at_batch", lambda device: False)
    monkeypatch.setattr("lightning_whiten.callbacks.whitening.warns_at_batch", lambda d: False)
    seed_everything(0)
    data = make_data(n=96)
    data.tensors[0][-1, 0, 0, 0] = float("nan")  # in the last of 6 batches
    model = TinyClassifier()
    callback = lw.WhiteningCallback("iternorm", layer_options={"group_size": 16}, exclude="aux")
    with pytest.warns(RuntimeWarning, match=r"epoch 0: .*skipped.* net\.1 \(1\), net\.4 \(1\)"):
        trainer(tmp_path, [callback]).fit(model, DataLoader(data, batch_size=16))
    assert lw.diagnostics.nonfinite_batches(model) == {"net.1": 1, "net.4": 1}


def test_schedule_types():
    assert Step([1, 2, 3], [10, 20])(9.9) == 1 and Step([1, 2, 3], [10, 20])(10) == 2
    assert Linear(0, 10, begin=1, stop=3)(2) == 5 and Linear(0, 10, begin=1, stop=3)(5) == 10
    assert Cosine(1.0, 0.0)(0.5) == pytest.approx(0.5) and Cosine(1.0, 0.0)(0.0) == 1.0
    assert Piecewise([(0, 1), (10, 3)])(5) == 2 and Piecewise([(0, 1), (10, 3)], "step")(5) == 1
    config = {
        "class_path": "lightning_whiten.schedules.Cosine",
        "init_args": {"start": 2, "end": 1},
    }
    assert lw.schedules.from_config(config) == Cosine(2, 1)
    with pytest.raises(ValueError, match="unknown schedule type"):
        lw.schedules.from_config({"type": "exp"})
    with pytest.raises(ValueError, match="one more value than milestones"):
        Step([1], [1, 2])


@pytest.mark.distributed
def test_ddp_fit_keeps_whitening_buffers_identical_across_ranks(tmp_path):
    seed_everything(0)
    model = TinyClassifier()
    callback = lw.WhiteningCallback(
        "swbn", layer_options={"group_size": 16, "whitening_rate": 0.01}, exclude="aux"
    )
    monitor = lw.WhiteningMonitor(every_n_steps=2, snd_every_n_epochs=0, summary=False)
    t = trainer(
        tmp_path, [callback, monitor, BufferDump(str(tmp_path))], # no buffer broadcast: only the layers' own covariance sync can keep the ranks identical
        strategy=DDPStrategy(start_method="spawn", find_unused_parameters=True, broadcast_buffers=False),
        devices=2,
        max_steps=4,
    )  # fmt: skip
    t.fit(model, loader(n=128))
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert rank0["buffers"].keys() == rank1["buffers"].keys() and rank0["buffers"]
    for key, value in rank0["buffers"].items():
        torch.testing.assert_close(value, rank1["buffers"][key], rtol=0, atol=0, msg=key)
    assert not torch.allclose(rank0["buffers"]["net.1.whitening"], torch.eye(16))  # it trained
    assert rank0["types"]["net.1"] == "SWBN"
    # the monitor measures on rank 0 only
    assert rank0["monitor_sampled"] == 2 and rank1["monitor_sampled"] == 0
