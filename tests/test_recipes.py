"""Every recipe parses and trains (one fast_dev_run step on tiny local data), like torchgeo's config tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import yaml
from lightning.pytorch import Trainer

import lightning_whiten as lw
from lightning_whiten.cli import run

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_every_recipe_is_listed_in_the_docs():
    page = (Path(__file__).parent.parent / "docs" / "guide" / "recipes.md").read_text()
    for recipe in RECIPES:
        assert f"/recipes/{recipe.name})" in page, recipe.name


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]["class_path"].rsplit(".", 1)[-1]
    assert model in ("ImageClassifier", "ProtoNet", "GAN", "CharLM"), model
    lines = recipe.read_text().splitlines()
    header = lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    assert any(line.startswith("# EXPECTED") for line in header), (
        "header states the expected result"
    )
    assert any("TIME" in line or "minute" in line for line in header), "header states the time"


def tiny_image_folder(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def shrink(recipe: Path, tmp_path: Path) -> Path:
    """The recipe with tiny local data substituted (no download, seconds on CPU)."""
    config = yaml.safe_load(recipe.read_text())
    data = config["data"]
    name = data["class_path"].rsplit(".", 1)[-1]
    init = config["model"]["init_args"]
    if config["model"]["class_path"].endswith(".GAN"):  # small networks, a quick feature net
        init.update({"g_width": 16, "d_width": 16, "fd_samples": 16, "feature_epochs": 1})
    if name.startswith("CIFAR") and config["model"]["class_path"].endswith(".GAN"):
        # the GAN needs images in pixel units (SyntheticImages are not): digits at 32x32
        config["data"] = {
            "class_path": "lightning_whiten.data.Digits",
            "init_args": {"image_size": 32, "batch_size": 8, "augment": False},
        }
    elif name.startswith("CIFAR"):
        config["data"] = {
            "class_path": "lightning_whiten.data.SyntheticImages",
            "init_args": {
                "num_classes": 10,
                "image_size": 32,
                "num_train": 16,
                "num_val": 8,
                "batch_size": 8,
            },
        }
    elif name == "ImageFolder":
        root = tiny_image_folder(tmp_path / "images")
        config["data"]["init_args"].update(
            {"root": str(root), "image_size": 32, "batch_size": 6, "num_workers": 0}
        )
    elif name == "FewShotImageFolder":  # disjoint class folders per split
        root = tmp_path / "fewshot"
        for split, first in (("train", 0), ("val", 3), ("test", 6)):
            tiny_image_folder(root / "tmp" / split, classes=3, per_class=4)
            for c in range(3):
                (root / split).mkdir(parents=True, exist_ok=True)
                (root / "tmp" / split / "train" / f"class{c}").rename(
                    root / split / f"class{first + c}"
                )
        config["data"]["init_args"].update(
            {"root": str(root), "image_size": 32, "n_way": 2, "k_shot": 1, "n_query": 2,
             "train_n_way": 3, "num_workers": 0, "val_episodes": 2, "test_episodes": 2}
        )  # fmt: skip
    elif name.startswith("FewShot"):
        config["data"]["init_args"].update({"val_episodes": 2, "test_episodes": 2})
    elif name == "Digits":  # online recipes keep their batch size of 1
        init = config["data"]["init_args"]
        init["batch_size"] = min(16, init.get("batch_size", 16))
    init = config["model"]["init_args"]
    if init.get("robust_eval"):  # a few attack steps are enough to run the code path
        init["robust_eval"]["pgd_steps"] = min(init["robust_eval"].get("pgd_steps", 20), 2)
    if init.get("checkpoint_path"):
        backbone = init["backbone"].split("/", 1)[1]
        weights = tmp_path / f"{backbone}.pth"
        torch.save(timm.create_model(backbone, pretrained=False).state_dict(), weights)
        init["checkpoint_path"] = str(weights)
    trainer = config.setdefault("trainer", {})
    trainer.update(
        {"accelerator": "cpu", "devices": 1, "strategy": "auto", "default_root_dir": str(tmp_path)}
    )
    trainer.pop("logger", None)
    path = tmp_path / recipe.name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow  # 2-10 s a recipe
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_trains_one_step_on_tiny_data(recipe, tmp_path):
    cli = run(["fit", "--config", str(shrink(recipe, tmp_path)), "--trainer.fast_dev_run", "true"])
    model = cli.model
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, lw.WhiteningCallback)]
    # every layer the surgery put in (whitening, Lp, streaming, ConvNorm; built-in ones have
    # no origin)
    whitening = [
        m
        for m in model.modules()
        if lw.registry.family_of(m) is not None and getattr(m, "origin", None) is not None
    ]
    if callbacks:
        report = callbacks[0].report
        assert whitening and report.num_replaced + len(report.inserted) == len(whitening)
        assert len(report.inserted) == len(callbacks[0].spec.insert)
        if callbacks[0].spec.placement == "first":
            assert report.num_replaced == 1
    else:
        assert not whitening
    assert cli.trainer.state.finished
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_d" if "train/loss_d" in metrics else "train/loss"])
    sam = [c for c in cli.trainer.callbacks if isinstance(c, lw.NormSAMCallback)]
    if sam:  # the SAM recipes took their step with NormSAM (and logged its sharpness)
        assert sam[0].sam_steps == 1
        assert torch.isfinite(cli.trainer.callback_metrics["sam/sharpness_step"])


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["layernorm", "none"])
def test_recurrent_recipe_variants_from_the_command_line(norm, tmp_path):
    # The header's command-line variants: LayerNorm or no normalization inside the recurrence.
    recipe = Path(__file__).parent.parent / "recipes" / "recurrent_digits_rnn.yaml"
    cli = run(["fit", "--config", str(shrink(recipe, tmp_path)), "--trainer.fast_dev_run", "true",
               "--model.init_args.backbone_options", f"{{norm: {norm}}}"])  # fmt: skip
    rnn = cli.model.net
    assert isinstance(rnn.norm, torch.nn.LayerNorm if norm == "layernorm" else torch.nn.Identity)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


@pytest.mark.slow  # a CLI subprocess
def test_command_line_exits_with_status_zero(tmp_path):
    # The console script passes main()'s return value to sys.exit: a successful run must exit 0.
    import subprocess
    import sys

    recipe = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "lightning_whiten", "fit", "--config", str(recipe), "--trainer.fast_dev_run", "true",
         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
         "--trainer.logger.init_args.save_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "WhitenCLI object" not in done.stdout + done.stderr


def test_finetuning_from_a_local_timm_checkpoint_starts_as_the_pretrained_model(tmp_path):
    torch.manual_seed(0)
    pretrained = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    with torch.no_grad():  # "pretrained": non-trivial BN statistics
        for m in pretrained.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
    weights = tmp_path / "resnet18.pth"
    torch.save(pretrained.state_dict(), weights)
    pretrained.eval()
    x = torch.randn(2, 3, 64, 64)
    expected = pretrained(x)

    model = lw.ImageClassifier(
        backbone="timm/resnet18", num_classes=1000, checkpoint_path=str(weights), lr=0.01
    )
    model.eval()
    torch.testing.assert_close(model(x), expected)  # loaded through timm's mechanism
    lw.convert(model, "swbn", group_size=32)
    torch.testing.assert_close(
        model(x), expected, rtol=1e-4, atol=1e-4
    )  # and still after conversion

    # fine-tune a few steps with the callback (converting a fresh copy at setup)
    model = lw.ImageClassifier(
        backbone="timm/resnet18", num_classes=1000, checkpoint_path=str(weights), lr=0.01
    )
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("conv1.weight")}
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 64, 64), torch.randint(0, 1000, (16,)))
    Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[lw.WhiteningCallback("iternorm", layer_options={"group_size": 32, "iterations": 3}, log_report=False)],
    ).fit(model, torch.utils.data.DataLoader(data, batch_size=8))  # fmt: skip
    assert any(isinstance(m, lw.IterNorm) for m in model.modules())
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in before.items())


# The quickstart's short form (16x16 images, 4-6 epochs instead of 32x32 and 12): with each
# whitening layer it must still clear 95% validation accuracy. This is the check that caught
# DBN's eval collapse on rank-deficient input (0.10 accuracy while training looked fine).
QUICKSTART_SHORT_FORM = {"iternorm": 4, "swbn": 4, "dbn": 6}  # epochs; DBN warms up slower


@pytest.mark.slow
@pytest.mark.parametrize("layer", sorted(QUICKSTART_SHORT_FORM))
def test_quickstart_short_form_reaches_95_percent_with_each_layer(tmp_path, layer):
    recipe = yaml.safe_load(
        (Path(__file__).parent.parent / "recipes" / "quickstart.yaml").read_text()
    )
    whitening = recipe["whiten"]
    whitening["layer"] = layer
    if layer != "iternorm":  # Newton iterations are IterNorm's own option
        del whitening["layer_options"]["iterations"]
    config = tmp_path / f"quickstart_{layer}.yaml"
    config.write_text(yaml.safe_dump(recipe))
    cli = run([
        "fit", "--config", str(config), "--trainer.max_epochs", str(QUICKSTART_SHORT_FORM[layer]),
        "--data.init_args.image_size", "16", "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
    ])  # fmt: skip
    accuracy = float(cli.trainer.callback_metrics["val/acc1"])
    assert accuracy >= 0.95, (layer, accuracy)
    converted = lw.registry.get_family(layer).layer
    assert sum(isinstance(m, converted) for m in cli.model.modules()) == 19


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["layernorm", "none"])
def test_charlm_recipe_variants_from_the_command_line(norm, tmp_path):
    # The header's variants: LayerNorm or nothing inside the recurrence (the recipe's
    # norm_options are StreamingNorm's, so the command clears them).
    recipe = Path(__file__).parent.parent / "recipes" / "charlm_streaming.yaml"
    cli = run(["fit", "--config", str(shrink(recipe, tmp_path)), "--trainer.fast_dev_run", "true",
               "--model.init_args.norm", norm, "--model.init_args.norm_options", "{}"])  # fmt: skip
    layer = cli.model.net.norm[0]
    assert isinstance(layer, torch.nn.LayerNorm if norm == "layernorm" else torch.nn.Identity)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
