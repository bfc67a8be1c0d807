"""NormalizationAnalysis in short CPU fits: what it logs, and that training is unchanged."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from doc_examples import blocks
from lightning.pytorch import Trainer, seed_everything
from lightning_helpers import TinyClassifier, fit_readme_yaml, loader, make_data
from test_callback import RecordingLogger
from torch import nn
from torch.utils.data import DataLoader

import lightning_whiten as lw


class DropoutClassifier(pl.LightningModule):
    """Dropout (random numbers in every forward), BatchNorm, a shuffled loader, Adam."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Dropout(0.3), nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
        )  # fmt: skip
        self.losses: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(make_data(96), batch_size=16, shuffle=True)


def fit(tmp_path, model, callbacks, logger=None, max_epochs=2, data=None):
    Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_epochs=max_epochs, callbacks=callbacks,
        logger=logger or False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(model, data)  # fmt: skip
    return model


def whitened(layer="swbn"):
    options = {"group_size": 16}
    if layer == "swbn":
        options["whitening_rate"] = 0.01  # W moves visibly between steps
    return lw.WhiteningCallback(layer, layer_options=options, exclude="aux", log_report=False)


def test_analysis_logs_the_documented_keys(tmp_path, capsys):
    seed_everything(0)
    logger = RecordingLogger()
    analysis = lw.NormalizationAnalysis(
        every_n_steps=4, step_sizes=(0.1, 0.2), covariate_shift_max_layers=None
    )
    fit(tmp_path, TinyClassifier(), [whitened("iternorm"), analysis], logger, data=loader())
    keys = set().union(*logger.metrics)
    for key in (
        "norm/init/activation_growth", "norm/init/gradient_ratio", "norm/init/final_stable_rank",
        "norm/init/net.2/cosine_similarity", "norm/init/net.0/grad_norm", "norm/init_ms",
        "norm/loss_min", "norm/loss_max", "norm/grad_change_min", "norm/grad_change_max",
        "norm/beta_smoothness", "norm/ics_l2_mean", "norm/ics_cosine_mean",
        "norm/ics/net.3/l2", "norm/ics/net.8/cosine", "norm/analysis_ms",
    ):  # fmt: skip
        assert key in keys, key
    # 2 epochs x 6 batches = 12 steps, measured at steps 0, 4 and 8; init probes once
    assert [r["step"] for r in analysis.history] == [0, 4, 8]
    assert sum("norm/init/activation_growth" in m for m in logger.metrics) == 1
    first = analysis.history[0]
    assert first["covariate_shift"]["net.0"]["l2"] == 0.0  # the first layer
    assert first["landscape"]["step_sizes"] == [0.1, 0.2]
    assert analysis.init_result is not None and "net.2" in analysis.init_result.layers
    assert 0 < analysis.seconds < analysis.train_seconds
    assert analysis.overhead_pct() > 0
    out = capsys.readouterr().out
    assert "Initialization probes" in out and "Normalization analysis" in out


@pytest.mark.parametrize("case", ["swbn", "dropout"])
def test_analysis_does_not_change_training(tmp_path, case):
    def run(directory, analysis):
        seed_everything(0)
        if case == "swbn":
            model = TinyClassifier()
            callbacks = [whitened("swbn")]
            data = loader()
        else:
            model, callbacks, data = DropoutClassifier(), [], None
        if analysis:
            callbacks.append(
                lw.NormalizationAnalysis(
                    every_n_steps=2, covariate_shift_max_layers=2, summary=False
                )
            )
        return fit(tmp_path / directory, model, callbacks, data=data)

    without, with_analysis = run("a", False), run("b", True)
    assert with_analysis.losses == without.losses
    assert len(without.losses) == 12
    for (name, a), (_, b) in zip(
        without.state_dict().items(), with_analysis.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_analysis_options(tmp_path):
    seed_everything(0)
    analysis = lw.NormalizationAnalysis(
        every_n_steps=3,
        covariate_shift=False,
        init_probes=False,
        loss_fn="cross_entropy",
        batch_fn=lambda batch: (batch[0], batch[1]),
        module="net",
        summary=False,
    )
    model = TinyClassifier()
    fit(tmp_path, model, [analysis], max_epochs=1, data=loader())
    assert analysis.init_result is None
    assert [r["step"] for r in analysis.history] == [0, 3]
    assert all("covariate_shift" not in r for r in analysis.history)
    assert analysis.state_dict() == {"init_done": False}
    restored = lw.NormalizationAnalysis()
    restored.load_state_dict({"init_done": True})
    assert restored._init_done  # a resumed fit does not probe "initialization" again


def test_analysis_rejects_bad_options():
    with pytest.raises(ValueError, match="every_n_steps"):
        lw.NormalizationAnalysis(every_n_steps=-1)
    with pytest.raises(ValueError, match="step_sizes"):
        lw.NormalizationAnalysis(step_sizes=(0.1, 0.0))
    with pytest.raises(ValueError, match=r"not a function of torch\.nn\.functional"):
        lw.NormalizationAnalysis(loss_fn="no_such_loss")


def test_docs_examples_run(tmp_path, capsys):
    api, callback = blocks("docs/guide/analysis.md", "python")
    namespace: dict = {}
    exec(api, namespace)
    assert set(namespace["shift"]) == {"0", "3", "8"} and namespace["shift"]["0"]["l2"] == 0.0
    assert "Initialization probes" in capsys.readouterr().out
    namespace.update({"Trainer": Trainer, "lw": lw})
    exec(callback, namespace)
    (analysis,) = [
        c for c in namespace["trainer"].callbacks if isinstance(c, lw.NormalizationAnalysis)
    ]
    assert analysis.every_n_steps == 500

    (example,) = blocks("docs/guide/analysis.md", "yaml")
    cli = fit_readme_yaml(example, tmp_path, max_steps=2, limit_val_batches=0)
    (analysis,) = [c for c in cli.trainer.callbacks if isinstance(c, lw.NormalizationAnalysis)]
    assert [r["step"] for r in analysis.history] == [0]
    assert len(analysis.history[0]["covariate_shift"]) == 8  # spread over the depth
    assert "conv1" in analysis.init_result.layers  # names inside `net`
