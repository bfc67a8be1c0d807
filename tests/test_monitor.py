"""WhiteningMonitor in a short CPU fit."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning_helpers import TinyClassifier, loader
from test_callback import RecordingLogger

import lightning_whiten as lw


def fit(tmp_path, monitor=None, layer="iternorm", max_epochs=2, logger=None, **options):
    seed_everything(0)
    model = TinyClassifier()
    callbacks = [
        lw.WhiteningCallback(
            layer, layer_options={"group_size": 16, **options}, exclude="aux", log_report=False
        )
    ]
    if monitor is not None:
        callbacks.append(monitor)
    Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_epochs=max_epochs, callbacks=callbacks,
        logger=logger or False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(model, loader())  # fmt: skip
    return model


def test_monitor_logs_the_documented_keys(tmp_path, capsys):
    logger = RecordingLogger()
    monitor = lw.WhiteningMonitor(every_n_steps=3, snd_num_batches=4, snd_probes=4)
    fit(tmp_path, monitor, logger=logger)
    keys = set().union(*logger.metrics)
    for key in ("whiten/step_ms", "whiten/overhead_ms", "whiten/overhead_pct", "whiten/memory_mb"):
        assert key in keys
    for layer in ("net.1", "net.4"):
        for metric in (
            "forward_ms",
            "backward_ms",
            "saved_mb",
            "snd",
            "whiteness",
            "condition_number",
            "newton_residual",
        ):
            assert f"whiten/{layer}/{metric}" in keys, (layer, metric)
    assert "net.1" in capsys.readouterr().out  # summary table
    # 2 epochs x 6 batches: the 2nd batch and every 3rd batch sampled; SND once per epoch
    assert len(monitor.step_ms) == 5
    assert sum("whiten/net.1/snd" in m for m in logger.metrics) == 2
    step = [m for m in logger.metrics if "whiten/overhead_pct" in m]
    for m in step:
        assert 0 < m["whiten/overhead_pct"] <= 100
        assert m["whiten/net.1/forward_ms"] > 0 and m["whiten/net.1/backward_ms"] > 0
        assert m["whiten/overhead_ms"] <= m["whiten/step_ms"]
    # the layer keeps one activation-sized tensor for backward (its centered input,
    # (16, 32, 8, 8) float32 = 128 KiB) plus small (G, d, d) matrices of the iterations
    activation = 16 * 32 * 8 * 8 * 4 / 2**20
    assert activation <= step[0]["whiten/net.1/saved_mb"] < 1.3 * activation
    rows = {r["layer"]: r for r in monitor.summary_rows()}
    assert rows["net.1"]["type"] == "IterNorm" and rows["net.1"]["iterations"] == 5
    # each layer's backward is timed on its own nodes only, not on the layers before it
    assert all(stats.timed_nodes <= 4 for stats in monitor.layers.values())
    assert rows["net.1"]["snd"] > 0 and 0 < rows["net.1"]["share_pct"] < 100


def test_monitor_does_not_change_training(tmp_path):
    without = fit(tmp_path / "a", None)
    with_monitor = fit(tmp_path / "b", lw.WhiteningMonitor(every_n_steps=2, include_batchnorm=True))
    assert with_monitor.losses == without.losses
    for (name, a), (_, b) in zip(
        without.state_dict().items(), with_monitor.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_monitor_compares_with_batchnorm_and_swbn(tmp_path):
    monitor = lw.WhiteningMonitor(
        every_n_steps=2, include_batchnorm=True, layers=["net.*", "aux.*"], summary=False
    )
    fit(tmp_path, monitor, layer="swbn", max_epochs=1)
    rows = {r["layer"]: r for r in monitor.summary_rows()}
    assert rows["net.1"]["type"] == "SWBN" and rows["net.1"]["iterations"] is None
    assert "aux.1" in rows and rows["aux.1"]["type"] == "BatchNorm1d"


def test_swbn_distance_from_its_start_counts_real_channels_only():
    from lightning_whiten.callbacks.monitor import swbn_distance

    layer = lw.SWBN(6, group_size=4)  # groups of 4 and 2 channels (the second one padded)
    with torch.no_grad():
        layer.whitening.mul_(1.1)  # the padding block too: it must not count
    # ||0.1 I_4||_F / 2 = 0.1 and ||0.1 I_2||_F / sqrt(2) = 0.1
    assert swbn_distance(layer) == pytest.approx(0.1, rel=1e-6)
    assert swbn_distance(layer, start=layer.whitening.double()) == 0.0


def test_monitor_warns_once_when_swbn_ended_as_batchnorm(tmp_path, capsys):
    # At the paper's per-step rate, 12 steps leave W at the identity to 1e-4: the run trained
    # BatchNorm under another name, and the monitor says so (once).
    logger = RecordingLogger()
    monitor = lw.WhiteningMonitor(every_n_steps=0, snd_num_batches=2, snd_probes=2)
    with pytest.warns(UserWarning, match=r"SWBN indistinguishable from BatchNorm") as record:
        fit(tmp_path, monitor, layer="swbn", logger=logger, whitening_rate=1e-5)
    assert sum("indistinguishable" in str(w.message) for w in record) == 1
    keys = set().union(*logger.metrics)
    assert {"whiten/net.1/w_distance", "whiten/net.1/bn_whiteness"} <= keys
    rows = {r["layer"]: r for r in monitor.summary_rows()}
    assert 0 < rows["net.1"]["w_distance"] < 1e-3
    assert rows["net.1"]["whiteness"] == pytest.approx(rows["net.1"]["bn_whiteness"], rel=1e-2)
    assert "|W-W0|" in capsys.readouterr().out


def test_monitor_does_not_warn_when_swbn_whitens(tmp_path, recwarn):
    monitor = lw.WhiteningMonitor(every_n_steps=0, snd_num_batches=2, snd_probes=2, summary=False)
    fit(tmp_path, monitor, layer="swbn")  # the default rate, "auto"
    assert not [w for w in recwarn if "indistinguishable" in str(w.message)]
    row = {r["layer"]: r for r in monitor.summary_rows()}["net.1"]
    assert row["w_distance"] > 0.01
    assert row["whiteness"] < row["bn_whiteness"]


def test_backward_timing_stops_at_each_layer(tmp_path):
    # a deep stack: a walk that did not stop at the layer's own input would time every
    # earlier layer again (and the whitening share would exceed the step)
    import lightning.pytorch as pl
    from torch import nn

    class Deep(pl.LightningModule):
        def __init__(self):
            super().__init__()
            layers = [nn.Conv2d(3, 16, 3, padding=1)]
            for _ in range(8):
                layers += [nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)]
            self.net = nn.Sequential(
                *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)
            )

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    monitor = lw.WhiteningMonitor(every_n_steps=2, snd_every_n_epochs=0, summary=False)
    Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=4, logger=False,
        callbacks=[lw.WhiteningCallback("iternorm", layer_options={"group_size": 8}, log_report=False), monitor],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    ).fit(Deep(), loader())  # fmt: skip
    assert len(monitor.layers) == 8
    assert all(stats.timed_nodes <= 4 for stats in monitor.layers.values())
    assert all(0 < pct < 100 for pct in monitor.overhead_pct)


def test_monitor_rejects_bad_options():
    with pytest.raises(ValueError, match="every_n_steps"):
        lw.WhiteningMonitor(every_n_steps=-1)
