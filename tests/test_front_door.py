"""What a new user meets first: the command's help and errors, readable output in logs, the
monitor in short runs (issue: the front door)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything
from lightning_helpers import TinyClassifier, loader

import lightning_whiten as lw

ROOT = Path(__file__).parent.parent


def command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_whiten", *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def tiny_config(tmp_path: Path, **changes) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_steps": 3, "logger": False, "enable_progress_bar": False,
            "default_root_dir": str(tmp_path), "limit_val_batches": 1,
            "callbacks": [
                {"class_path": "lightning_whiten.WhiteningCallback",
                 "init_args": {"layer": "iternorm", "layer_options": {"group_size": 16}}},
                {"class_path": "lightning_whiten.WhiteningMonitor",
                 "init_args": {"every_n_steps": 50, "snd_every_n_epochs": 0}},
            ],
        },
        "model": {"class_path": "lightning_whiten.ImageClassifier",
                  "init_args": {"backbone": "cifar/resnetv2_20", "lr": 0.05}},
        "data": {"class_path": "lightning_whiten.data.SyntheticImages",
                 "init_args": {"num_train": 32, "num_val": 8, "batch_size": 8, "image_size": 16}},
    }  # fmt: skip
    for dotted, value in changes.items():
        *path, key = dotted.split(".")
        node = config
        for part in path:
            node = node[int(part)] if part.isdigit() else node[part]
        node[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_help_is_fast_and_lists_the_recipes():
    # No torch import: the help answers at once (it took 35 s of imports before).
    code = (
        "import sys; from lightning_whiten.cli import main; main(['--help']); "
        "assert 'torch' not in sys.modules, 'torch imported for --help'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith("usage: lightning-whiten")
    assert "batch whitening" in text and "Lightning Trainer command line tool" not in text
    for recipe in ("quickstart", "cifar10_wrn28_10_iternorm"):
        assert f"  {recipe} " in text
    assert "lightning-whiten fit --config quickstart" in text


@pytest.mark.slow  # a CLI subprocess each: ~12 s of imports
@pytest.mark.parametrize(
    ("changes", "first_line"),
    [
        ({"trainer.callbacks.0.init_args.layer": "iternrom"},
         "lightning-whiten: error: unknown layer 'iternrom': choose one of"),
        ({"model.init_args.lr": -0.1},
         "lightning-whiten: error: ImageClassifier: lr must be > 0, got -0.1"),
        ({"data": {"class_path": "lightning_whiten.data.ImageFolder",
                   "init_args": {"root": "/no/such/folder"}}},
         "lightning-whiten: error: ImageFolder: expected a folder /no/such/folder/train"),
        ({"trainer.callbacks.0.init_args.layer_options": {"group": 16}},
         "lightning-whiten: error: IterNorm does not take the option 'group'"),
    ],
    ids=["layer-name", "negative-lr", "missing-data", "layer-option"],
)  # fmt: skip
def test_config_mistakes_are_one_line_before_any_work(tmp_path, changes, first_line):
    done = command("fit", "--config", str(tiny_config(tmp_path, **changes)), cwd=tmp_path)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith(first_line), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Epoch" not in done.stdout


@pytest.mark.slow
def test_a_fit_prints_readable_logs_and_its_checkpoint(tmp_path):
    done = command("fit", "--config", str(tiny_config(tmp_path)), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    # piped: the report is printed wide, so module names are never split across lines
    for name in ("net.layer1.0.bn1", "net.layer3.2.bn2"):
        assert any(f" {name} " in line for line in out.splitlines()), name
    assert "lightning-whiten: checkpoint: " in out
    path = out.split("lightning-whiten: checkpoint: ")[1].splitlines()[0].strip()
    assert Path(path).is_file()
    # the monitor sampled a step of this 3-step run and says why SND is empty
    assert "whitening takes" in out and "SND is off (snd_every_n_epochs=0)" in out
    for noise in ("Tip:", "DeprecationWarning", "LightningCLI's args parameter"):
        assert noise not in out + done.stderr, noise


def test_monitor_explains_empty_columns_in_a_short_run(tmp_path):
    seed_everything(0)
    monitor = lw.WhiteningMonitor(every_n_steps=50)
    callback = lw.WhiteningCallback("iternorm", layer_options={"group_size": 8}, exclude="aux")
    Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback, monitor],
    ).fit(TinyClassifier(width=16), loader())  # fmt: skip
    reasons = monitor.empty_columns()
    assert any(
        "no training step was sampled (1 ran; the 2nd and then every 50th" in r for r in reasons
    )
    assert all(stats.quality for stats in monitor.layers.values())  # SND of the one epoch


def test_convert_that_replaces_nothing_says_what_the_model_uses():
    model = timm.create_model("convnext_nano", pretrained=False)
    with pytest.warns(UserWarning, match=r"nothing was converted to IterNorm.*LayerNorm2d \(\d+\)"):
        report = lw.convert(model, "iternorm")
    assert report.num_replaced == 0


def test_evaluation_metrics_are_synced_across_processes():
    model = lw.ImageClassifier("cifar/resnetv2_20", num_classes=4)
    logged = {}
    model.log = lambda name, value, **kwargs: logged.setdefault(name, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.validation_step((torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])), 0)
    assert logged["val/loss"].get("sync_dist") is True
