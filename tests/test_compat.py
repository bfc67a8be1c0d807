"""Checkpoints written by earlier releases keep loading (fixtures: tests/fixtures/)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning_helpers import TinyClassifier, loader

import lightning_whiten as lw

FIXTURES = Path(__file__).parent / "fixtures"
LAYERS = ("iternorm", "dbn", "swbn")


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURES / "v0_expected.pt", weights_only=True)


def v0_callback(layer: str) -> lw.WhiteningCallback:
    # The same callback configuration that wrote the fixture (make_v0_checkpoints.py).
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_v0", FIXTURES / "make_v0_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.callback(layer)


@pytest.mark.parametrize("layer", LAYERS)
def test_v0_checkpoint_loads_with_load_converted(layer, expected):
    model = lw.load_converted(TinyClassifier, FIXTURES / f"v0_{layer}.ckpt")
    with torch.no_grad():
        output = model(expected["probe"])
    torch.testing.assert_close(output, expected["layers"][layer]["eval_output"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", LAYERS)
def test_v0_checkpoint_resumes_through_the_trainer(tmp_path, layer, expected):
    seed_everything(0)
    model = TinyClassifier(width=16)
    trainer = Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_steps=9,
        enable_progress_bar=False, enable_model_summary=False, logger=False,
        enable_checkpointing=False, callbacks=[v0_callback(layer)],
    )  # fmt: skip
    trainer.fit(model, loader(), ckpt_path=str(FIXTURES / f"v0_{layer}.ckpt"))
    assert model.losses == pytest.approx(
        expected["layers"][layer]["resumed_losses"], rel=1e-5, abs=1e-6
    )
