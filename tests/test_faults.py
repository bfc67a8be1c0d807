"""Adversarial cases that once broke main (issue: reliability): each stays fixed here."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning_helpers import TinyClassifier, loader
from torch import nn

import lightning_whiten as lw
from lightning_whiten.checkpoint import CHECKPOINT_KEY


def rank_deficient(n: int, channels: int = 16, rank: int = 9, seed: int = 0) -> torch.Tensor:
    """``(n, channels, 4, 4)`` with ``channels - rank`` exact copies of other channels (as a
    grayscale image copied to RGB): the channel covariance has exact null directions."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, rank, 4, 4, generator=gen) * torch.linspace(0.5, 2, rank).view(
        1, -1, 1, 1
    )
    return torch.cat([base, base[:, : channels - rank]], 1)


def trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    options = {
        "default_root_dir": tmp_path, "accelerator": "cpu", "devices": 1, "max_epochs": 1,
        "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
        "enable_checkpointing": False, **kwargs,
    }  # fmt: skip
    return Trainer(callbacks=callbacks, **options)


# -- 1. DBN's eval on rank-deficient input -----------------------------------------------------
def test_dbn_eval_matches_batch_whitening_on_rank_deficient_input():
    torch.manual_seed(0)
    layer = lw.DBN(16, group_size=16, momentum=0.1)
    for step in range(60):
        layer(rank_deficient(32, seed=step))
    x = rank_deficient(256, seed=1000)
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
        y_batch = layer.whiten_batch(x)  # the same data whitened with its own statistics
    # Averaging each batch's ZCA matrix boosted random null directions by up to 1/sqrt(eps)
    # and the eval output blew up; the matrix of the running covariance does not.
    relative = (y_eval - y_batch).norm() / y_batch.norm()
    assert relative < 0.2, float(relative)
    assert y_eval.abs().max() < 20


def test_dbn_warns_once_on_a_numerically_rank_deficient_batch():
    layer = lw.DBN(16, group_size=16)
    with pytest.warns(UserWarning, match=r"numerically rank-deficient.*grayscale"):
        layer(rank_deficient(32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(rank_deficient(32, seed=1))  # once


def test_dbn_v1_state_dicts_are_migrated_to_the_running_covariance():
    layer = lw.DBN(12, group_size=8, momentum=0.3)
    for step in range(5):
        layer(torch.randn(64, 12) @ torch.randn(12, 12) + step)
    state = layer.state_dict()
    legacy = {k: v for k, v in state.items() if k != "running_cov"}
    legacy = type(state)(legacy)
    legacy._metadata = {"": {"version": 1}}  # as the previous release wrote it
    fresh = lw.DBN(12, group_size=8)
    fresh.load_state_dict(legacy)
    torch.testing.assert_close(fresh.running_cov, layer.running_cov, rtol=1e-3, atol=1e-4)
    x = torch.randn(16, 12)
    torch.testing.assert_close(fresh.eval()(x), layer.eval()(x))


# -- 2. IterNorm's Newton divergence, SWBN's runaway update ----------------------------------------
def test_newton_beyond_its_stable_range_is_refused_with_the_fix_named():
    with pytest.raises(ValueError, match=r"iterations=9 with method='newton'.*method='coupled'"):
        lw.IterNorm(16, iterations=9)
    layer = lw.IterNorm(16, iterations=30, method="coupled")  # stable for any T
    assert torch.isfinite(layer(rank_deficient(32))).all()
    layer = lw.IterNorm(16, iterations=5)
    with pytest.raises(ValueError, match="method='coupled'"):
        layer.iterations = 12  # as a schedule would


def test_a_diverged_newton_batch_stays_out_of_the_running_statistics(monkeypatch):
    monkeypatch.setattr(lw.IterNorm, "max_newton_iterations", 100)  # allow the unstable form
    layer = lw.IterNorm(16, group_size=16, iterations=14)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.warns(RuntimeWarning, match=r"Newton iteration .* diverged.*method='coupled'"):
        output = layer(rank_deficient(64))
    assert torch.isfinite(output).all() and output.abs().max() > 100  # finite, but diverged
    assert int(layer.diverged_batches) == 1 and int(layer.nonfinite_batches) == 0
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert lw.diagnostics.diverged_batches(nn.Sequential(layer)) == {"0": 1}


def test_swbn_fro_update_at_too_large_a_rate_is_rejected_not_blown_up():
    gen = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match=r"whitening_rate=0.05 .* stable range"):
        layer = lw.SWBN(64, group_size=64, whitening_rate=0.05, criterion="fro")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rejected updates are reported
        for _ in range(40):
            # every channel shares one factor: the standardized covariance has an eigenvalue
            # near 64, and an unguarded update grew |W| to 1e7 in these 40 steps
            common = torch.randn(256, 1, generator=gen)
            layer(common + 0.3 * torch.randn(256, 64, generator=gen))
    assert layer.whitening.abs().max() < 100  # it reached 1e9 before
    assert int(layer.diverged_batches) > 0


def test_swbn_keeps_its_buffers_identity():
    layer = lw.SWBN(16, group_size=8, whitening_rate=0.05)
    buffers = {name: b for name, b in layer.named_buffers()}
    before = layer.whitening.clone()
    for _ in range(3):
        layer(torch.randn(32, 16) @ torch.randn(16, 16)).sum().backward()
    assert not torch.equal(layer.whitening, before)  # updated ...
    for name, b in layer.named_buffers():
        assert b is buffers[name], name  # ... in place: DDP's broadcast and EMA keep working


# -- 3. the monitor never stops training -------------------------------------------------------
class NaNOnce(nn.Module):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.calls = step, 0

    def forward(self, x):
        if not self.training:  # e.g. the forward that convert traces
            return x
        self.calls += 1
        return x * float("nan") if self.calls == self.step else x


def test_monitor_survives_a_nan_batch(tmp_path):
    seed_everything(0)
    model = TinyClassifier(width=16)
    model.net.insert(0, NaNOnce(step=1))  # the monitor caches this batch's layer inputs
    monitor = lw.WhiteningMonitor(every_n_steps=1, snd_every_n_epochs=1, summary=True)
    callback = lw.WhiteningCallback("iternorm", layer_options={"group_size": 8}, exclude="aux")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.warns(UserWarning, match="SND/whiteness not measured.*non-finite"):
            trainer(tmp_path, [callback, monitor], max_steps=4).fit(model, loader())
    assert any("non-finite" in reason for reason in monitor.empty_columns())


def test_monitor_removes_its_hooks_when_a_sampled_step_raises(tmp_path):
    class Boom(TinyClassifier):
        def training_step(self, batch, batch_idx):
            self(batch[0])  # the monitor's hooks are active in this forward
            raise RuntimeError("boom")

    seed_everything(0)
    model = Boom(width=16)
    monitor = lw.WhiteningMonitor(every_n_steps=1, snd_every_n_epochs=0)
    callback = lw.WhiteningCallback("dbn", layer_options={"group_size": 8}, exclude="aux")
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [callback, monitor], max_steps=2).fit(model, loader())
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks, type(m).__name__
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


# -- 4. checkpoint trust -------------------------------------------------------------------------
def converted_checkpoint(tmp_path, **callback_options):
    seed_everything(0)
    model = TinyClassifier(width=16)
    options = {"layer_options": {"group_size": 8}, "exclude": "aux", **callback_options}
    callback = lw.WhiteningCallback("iternorm", **options)
    trainer(tmp_path, [callback], max_steps=2, enable_checkpointing=True).fit(model, loader())
    path = next(tmp_path.rglob("*.ckpt"))
    return path, torch.load(path, weights_only=True)


def test_a_crafted_checkpoint_imports_nothing_and_changes_no_structure(tmp_path):
    _, checkpoint = converted_checkpoint(tmp_path)
    assert "antigravity" not in sys.modules
    checkpoint[CHECKPOINT_KEY]["spec"]["layer"] = "antigravity.Fly"
    torch.save(checkpoint, tmp_path / "layer.ckpt")
    with pytest.raises(ValueError, match="not imported"):
        lw.load_converted(TinyClassifier, tmp_path / "layer.ckpt")
    assert "antigravity" not in sys.modules  # its top-level code never ran

    _, checkpoint = converted_checkpoint(tmp_path / "b")
    checkpoint[CHECKPOINT_KEY]["attributes"]["net.0"] = {"stride": (2, 2)}
    torch.save(checkpoint, tmp_path / "stride.ckpt")
    with pytest.raises(ValueError, match=r"sets 'stride' on 'net.0' \(Conv2d\)"):
        lw.load_converted(TinyClassifier, tmp_path / "stride.ckpt")


def test_checkpoints_are_read_weights_only_whatever_the_environment(tmp_path, monkeypatch):
    path, _ = converted_checkpoint(tmp_path)
    seen = {}
    original = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setattr(torch, "load", spy)
    lw.load_converted(TinyClassifier, path)
    assert seen["weights_only"] is True


# -- 6. clear errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_empty_or_truncated_checkpoints_say_so(tmp_path, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=r"empty|truncated"):
        lw.load_converted(TinyClassifier, bad)
    callback = lw.WhiteningCallback("iternorm", exclude="aux")
    with pytest.raises(ValueError, match=r"empty|truncated"):
        trainer(tmp_path, [callback], max_steps=1).fit(TinyClassifier(), loader(), ckpt_path=bad)


def test_resuming_across_a_conversion_names_the_cause(tmp_path):
    # a BatchNorm checkpoint resumed with the callback
    seed_everything(0)
    trainer(tmp_path / "bn", [], max_steps=1, enable_checkpointing=True).fit(
        TinyClassifier(width=16), loader()
    )
    bn_ckpt = next((tmp_path / "bn").rglob("*.ckpt"))
    callback = lw.WhiteningCallback("iternorm", exclude="aux")
    with pytest.raises(ValueError, match="written without WhiteningCallback"):
        trainer(tmp_path, [callback], max_steps=2).fit(
            TinyClassifier(width=16), loader(), ckpt_path=bn_ckpt
        )
    # one family resumed as another (their state dicts have the same keys)
    path, _ = converted_checkpoint(tmp_path / "it")
    callback = lw.WhiteningCallback("dbn", layer_options={"group_size": 8}, exclude="aux")
    with pytest.raises(
        ValueError, match="converted to 'iternorm' and WhiteningCallback converts to 'dbn'"
    ):
        trainer(tmp_path, [callback], max_steps=3).fit(
            TinyClassifier(width=16), loader(), ckpt_path=path
        )
    # a converted ImageClassifier checkpoint resumed without the callback
    seed_everything(0)
    model = lw.ImageClassifier("cifar/resnetv2_20", num_classes=4)
    callback = lw.WhiteningCallback("iternorm", layer_options={"group_size": 16})
    data = lw.data.SyntheticImages(
        num_classes=4, image_size=16, num_train=16, num_val=8, batch_size=8
    )
    trainer(tmp_path / "ic", [callback], max_steps=1, enable_checkpointing=True).fit(model, data)
    ic_ckpt = next((tmp_path / "ic").rglob("*.ckpt"))
    with pytest.raises(ValueError, match=r"converted with WhiteningCallback.*load_converted"):
        trainer(tmp_path, [], max_steps=2).fit(
            lw.ImageClassifier("cifar/resnetv2_20", num_classes=4), data, ckpt_path=ic_ckpt
        )


def test_a_huge_input_says_why_its_batch_was_dropped():
    layer = lw.IterNorm(8, group_size=8)
    x = torch.randn(64, 8) * 1e19
    with pytest.warns(RuntimeWarning, match=r"finite but as large as .*overflows the float32"):
        layer(x)
    assert int(layer.nonfinite_batches) == 1
