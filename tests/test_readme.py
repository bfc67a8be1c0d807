"""The examples of the README and of the documentation pages (docs/) run as written
(placeholders filled with tiny local data)."""

from __future__ import annotations

import re

import yaml
from doc_examples import blocks
from lightning_helpers import fit_readme_yaml

import lightning_whiten as lw
from lightning_whiten.layers import WhiteningNorm


def test_readme_python_example_runs():
    (example,) = blocks("README.md", "python")
    namespace: dict = {"print": lambda *a: None}
    exec(example, namespace)  # convert timm resnet50, export, strict load into a fresh model
    assert namespace["report"].num_replaced == 53
    assert not any(isinstance(m, WhiteningNorm) for m in namespace["plain"].modules())


def test_convert_plan_example_runs(capsys):
    python, printed = (
        blocks("docs/guide/convert.md", "python")[0],
        blocks("docs/guide/convert.md", "text")[0],
    )
    namespace: dict = {"lw": lw, "timm": __import__("timm")}
    exec(python, namespace)
    replaced, skipped = map(
        int, re.search(r"(\d+) modules -> IterNorm, (\d+) skipped", printed).groups()
    )
    report = namespace["report"]
    assert (report.num_replaced, report.num_skipped) == (replaced, skipped)
    out = capsys.readouterr().out
    assert f"{replaced} modules -> IterNorm, {skipped} skipped" in out
    assert namespace["spec"].to_dict()["layer"] == "iternorm"


def test_getting_started_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Trainer writes its logs here
    layer, surgery, trainer_snippet = blocks("docs/getting-started.md", "python", "In Python")
    namespace: dict = {}
    exec(layer, namespace)
    assert not namespace["model"].training
    exec(surgery, namespace)  # convert timm + torchvision, export, strict load
    assert namespace["report"].num_replaced == 53

    # The Lightning example, with its placeholders filled and made a one-batch run.
    assert "max_epochs=90," in trainer_snippet
    trainer_snippet = trainer_snippet.replace(
        "max_epochs=90,", "max_epochs=90, fast_dev_run=True, enable_progress_bar=False,"
    )
    namespace["my_lightning_module"] = lw.ImageClassifier("timm/resnet18", num_classes=4)
    namespace["datamodule"] = lw.data.SyntheticImages(
        num_classes=4, image_size=32, num_train=16, num_val=8, batch_size=8
    )
    exec(trainer_snippet, namespace)
    converted = [
        m for m in namespace["my_lightning_module"].modules() if isinstance(m, WhiteningNorm)
    ]
    assert len(converted) == 20 and {m.iterations for m in converted} == {3}


def test_callback_yaml_example_runs(tmp_path):
    (example,) = blocks("docs/guide/callback.md", "yaml")
    cli = fit_readme_yaml(
        example, tmp_path, backbone="timm/resnet18", image_size=32,
        max_epochs=1, limit_train_batches=2, limit_val_batches=1,
    )  # fmt: skip
    net = cli.model.net
    assert not isinstance(net.bn1, WhiteningNorm)  # excluded
    assert isinstance(net.layer4[0].bn1, WhiteningNorm)


def test_sam_examples_run(tmp_path):
    import torch

    (python,) = blocks("docs/guide/sam-on.md", "python")
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen))
    ]
    namespace: dict = {"train_loader": batches}
    exec(python, namespace)
    sam = namespace["sam"]
    assert isinstance(sam, lw.NormSAM) and sam.adaptive and sam.rho == 10.0
    assert torch.isfinite(namespace["loss"]) and float(sam.perturbation_norm) > 0

    (example,) = blocks("docs/guide/sam-on.md", "yaml")
    cli = fit_readme_yaml(
        example, tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, lw.NormSAMCallback)]
    assert callback.sam_steps == 2 and callback.sam.normalize_bias


def test_convnorm_examples_run(tmp_path):
    from lightning.pytorch import Trainer

    example, surgery = blocks("docs/guide/convnorm.md", "python")
    namespace: dict = {}
    exec(example, namespace)
    assert namespace["y"].shape == (8, 128, 16, 16)
    assert namespace["V"].shape == (64, 58, 30)
    assert isinstance(namespace["model"].layer1[0].conv1, lw.ConvNorm2d)

    import torchvision

    namespace = {"lw": lw, "model": torchvision.models.resnet18(), "print": lambda *a: None}
    exec(surgery, namespace)  # its comment states the counts
    report = namespace["report"]
    assert (report.num_replaced, report.num_skipped, len(report.removed)) == (20, 0, 20)

    (options,) = blocks("docs/guide/convnorm.md", "yaml")
    init = yaml.safe_load(options)["model"]["init_args"]
    model = lw.ImageClassifier(
        "cifar/resnet18", num_classes=4, backbone_options={"width": 4, "conv": "convnorm"}, **init
    )
    datamodule = lw.data.SyntheticImages(
        num_classes=4, image_size=8, num_train=8, num_val=8, batch_size=8
    )
    trainer = Trainer(
        fast_dev_run=True, accelerator="cpu", enable_progress_bar=False,
        default_root_dir=str(tmp_path), enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule)
    assert {"val/acc_pgd20", "val/acc_fgsm"} <= set(trainer.callback_metrics)
