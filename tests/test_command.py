"""The ``lightning-whiten`` command for package users (issue: the front door for package users):
recipes by name and the ``recipes`` command, the ``whiten`` section and its command-line
options, ``--ckpt_path`` checked first, and the smaller cases around them."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.model_summary import ModelSummary
from lightning_helpers import TinyClassifier
from test_front_door import tiny_config
from test_recipes import tiny_image_folder

import lightning_whiten as lw
from lightning_whiten import cli
from lightning_whiten.checkpoint import check_checkpoint_file

ROOT = Path(__file__).parent.parent
RECIPES = ROOT / "recipes"


def whiten_config(tmp_path: Path, **changes) -> Path:
    """test_front_door's tiny config with the whitening in the ``whiten`` section."""
    path = tiny_config(tmp_path, **changes)
    config = yaml.safe_load(path.read_text())
    callbacks = config["trainer"]["callbacks"]
    config["whiten"] = callbacks.pop(0)["init_args"]
    path.unlink()
    path = tmp_path / "whiten.yaml"  # not config.yaml: each run saves its config as that
    path.write_text(yaml.safe_dump(config))
    return path


def fail_line(capsys, *args: str) -> str:
    """Run the command in-process; it must exit with status 2 and one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lightning-whiten: error: "), err
    return lines[0].removeprefix("lightning-whiten: error: ")


# -- 1. recipes by name, the recipes command --------------------------------------------------
def test_recipe_lookup_never_reads_a_recipes_folder_beside_an_installed_package(tmp_path):
    site = tmp_path / "site-packages"
    (site / "lightning_whiten").mkdir(parents=True)
    (site / "recipes").mkdir()
    (site / "recipes" / "other.yaml").write_text("seed_everything: 0\n")
    assert cli.recipes_dir(site / "lightning_whiten") is None
    # a wheel: the recipes inside the package
    (site / "lightning_whiten" / "recipes").mkdir()
    assert cli.recipes_dir(site / "lightning_whiten") == site / "lightning_whiten" / "recipes"
    # this checkout (an editable install): its top-level recipes/
    assert cli.recipes_dir() == RECIPES
    assert "quickstart" in cli.recipe_names() and "other" not in cli.recipe_names()


def test_config_takes_a_recipe_name_or_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(cli.resolve_config("quickstart")) == RECIPES / "quickstart.yaml"
    assert Path(cli.resolve_config("quickstart.yaml")) == RECIPES / "quickstart.yaml"
    own = tmp_path / "quickstart.yaml"  # a file of that name wins over the recipe
    own.write_text("seed_everything: 1\n")
    assert cli.resolve_config("quickstart.yaml") == "quickstart.yaml"
    assert cli.resolve_config(str(own)) == str(own)
    assert cli.resolve_config("{seed_everything: 1}") == "{seed_everything: 1}"  # inline YAML
    with pytest.raises(cli.RecipeError, match="'quickstrat' is not a file and not a bundled "
                       "recipe; close names: quickstart"):  # fmt: skip
        cli.resolve_config("quickstrat")
    with pytest.raises(cli.RecipeError, match=r"'no/such\.yaml': no such file"):
        cli.resolve_config("no/such.yaml")
    args = ["fit", "--config", "quickstart", "--config=quickstart_bn", "--trainer.max_epochs", "1"]
    resolved = cli.resolve_config_args(args)
    assert resolved[2] == str(RECIPES / "quickstart.yaml")
    assert resolved[3] == f"--config={RECIPES / 'quickstart_bn.yaml'}"
    assert resolved[4:] == args[4:]


def test_recipes_command_lists_shows_and_copies(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli.main(["recipes", "list"])
    listed = capsys.readouterr().out.splitlines()
    names = {line.split()[0] for line in listed[1:]}
    assert names == {p.stem for p in RECIPES.glob("*.yaml")}
    cli.main(["recipes", "show", "quickstart"])
    assert capsys.readouterr().out == (RECIPES / "quickstart.yaml").read_text()
    cli.main(["recipes", "copy", "quickstart", "my.yaml"])
    assert "lightning-whiten fit --config my.yaml" in capsys.readouterr().out
    assert (tmp_path / "my.yaml").read_text() == (RECIPES / "quickstart.yaml").read_text()
    cli.main(["recipes", "copy", "quickstart_bn"])  # default: ./NAME.yaml
    assert (tmp_path / "quickstart_bn.yaml").is_file()
    capsys.readouterr()
    assert fail_line(capsys, "recipes", "copy", "quickstart", "my.yaml") == (
        "my.yaml exists (--force overwrites it)"
    )
    assert "not a bundled recipe" in fail_line(capsys, "recipes", "copy", "nope")


def test_help_shows_the_name_form(capsys):
    cli.main(["--help"])
    text = capsys.readouterr().out
    assert "  lightning-whiten fit --config quickstart\n" in text
    assert "lightning-whiten recipes copy quickstart my.yaml" in text
    assert "--whiten.layer_options.group_size 8" in text
    assert "recipes/quickstart.yaml" not in text


@pytest.mark.slow  # builds a wheel, makes a venv, two CLI subprocesses (~40 s)
def test_a_built_wheel_runs_a_recipe_by_name_from_an_empty_folder(tmp_path):
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed")
    dist = tmp_path / "dist"
    subprocess.run([uv, "build", "--wheel", "--out-dir", str(dist), str(ROOT)],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    wheel = next(dist.glob("lightning_whiten-*.whl"))
    assert sum(n.endswith(".yaml") for n in zipfile.ZipFile(wheel).namelist()) == len(
        list(RECIPES.glob("*.yaml"))
    )
    # A fresh venv holding only the wheel; the locked environment's packages stay visible
    # through a .pth line (a .pth file inside that folder, the checkout's editable install,
    # is not processed).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)  # fmt: skip
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    locked = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(site) / "_locked_env.pth").write_text("\n".join(locked) + "\n")
    subprocess.run([uv, "pip", "install", "--no-deps", "--offline", "--python", str(python),
                    str(wheel)], check=True, capture_output=True, timeout=300)  # fmt: skip
    stray = Path(site) / "recipes"  # a recipes/ folder of another package
    stray.mkdir()
    (stray / "other.yaml").write_text("seed_everything: 0\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = venv / "bin" / "lightning-whiten"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(command), *args], cwd=empty, capture_output=True, text=True,
                              timeout=600, env=env)  # fmt: skip

    done = run("recipes", "list")
    assert done.returncode == 0, done.stderr
    assert f"recipes ({site}/lightning_whiten/recipes)" in done.stdout
    assert "  quickstart " in done.stdout and "other" not in done.stdout
    done = run("recipes", "copy", "quickstart", "my.yaml")
    assert done.returncode == 0, done.stderr
    assert (empty / "my.yaml").read_text() == (RECIPES / "quickstart.yaml").read_text()
    done = run("fit", "--config", "quickstart", "--trainer.max_epochs", "1",
               "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
               "--trainer.log_every_n_steps", "1",
               "--trainer.enable_progress_bar", "false", "--data.init_args.image_size", "16")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "19 modules -> IterNorm" in done.stdout
    for own in (ROOT / "lightning_whiten", ROOT / "recipes"):  # nothing from this checkout
        assert str(own) not in done.stdout + done.stderr
    where = subprocess.run([str(python), "-c", "import lightning_whiten; print(lightning_whiten.__file__)"],
                           cwd=empty, capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert Path(where.strip()).is_relative_to(site), where
    checkpoint = done.stdout.split("lightning-whiten: checkpoint: ")[1].split()[0]
    assert (empty / checkpoint).is_file()  # written in the folder it ran in


# -- 2. the whiten section ---------------------------------------------------------------------
def converted(cli_object) -> list[torch.nn.Module]:
    return [m for m in cli_object.model.modules() if lw.registry.family_of(m) is not None]


@pytest.mark.slow  # three short in-process fits (~6 s)
def test_whitening_options_on_the_command_line(tmp_path):
    config = whiten_config(tmp_path)
    done = cli.run(["fit", "--config", str(config), "--trainer.fast_dev_run", "true",
                    "--whiten.layer", "dbn", "--whiten.layer_options.group_size", "8"])  # fmt: skip
    layers = converted(done)
    assert layers and all(isinstance(m, lw.DBN) and m.group_size == 8 for m in layers)
    callbacks = [c for c in done.trainer.callbacks if isinstance(c, lw.WhiteningCallback)]
    assert len(callbacks) == 1 and done.trainer.callbacks[0] is callbacks[0]  # first, as before
    # one option changes, the others of the section stay
    done = cli.run(["fit", "--config", str(config), "--trainer.fast_dev_run", "true",
                    "--whiten.layer_options.iterations", "3"])  # fmt: skip
    assert all(m.group_size == 16 and m.iterations == 3 for m in converted(done))
    # no whiten section, or `--whiten null`: no conversion (a BatchNorm baseline)
    done = cli.run(["fit", "--config", str(config), "--trainer.fast_dev_run", "true",
                    "--whiten", "null"])  # fmt: skip
    assert not converted(done)
    assert not any(isinstance(c, lw.WhiteningCallback) for c in done.trainer.callbacks)


def test_the_callbacks_form_keeps_working(tmp_path):
    done = cli.run(
        ["fit", "--config", str(tiny_config(tmp_path)), "--trainer.fast_dev_run", "true"]
    )
    assert all(isinstance(m, lw.IterNorm) and m.group_size == 16 for m in converted(done))
    assert sum(isinstance(c, lw.WhiteningCallback) for c in done.trainer.callbacks) == 1


def test_whitening_set_twice_or_through_the_callback_list_says_what_to_write(tmp_path, capsys):
    config = str(tiny_config(tmp_path))  # WhiteningCallback in trainer.callbacks
    message = fail_line(capsys, "fit", "--config", config, "--whiten.layer", "dbn")
    assert message.startswith("WhiteningCallback is configured twice: in the whiten section")
    assert "move its init_args to 'whiten:'" in message
    message = fail_line(capsys, "fit", "--config", config,
                        "--trainer.callbacks.init_args.layer_options", "{group_size: 8}")  # fmt: skip
    assert message.startswith("--trainer.callbacks.init_args.layer_options would set the last "
                              "callback in trainer.callbacks, not WhiteningCallback: write "
                              "--whiten.layer_options")  # fmt: skip


# -- 3. --ckpt_path checked first --------------------------------------------------------------
BAD_CHECKPOINTS = {
    "empty": b"",
    "truncated": None,  # the first half of a real checkpoint
    "random": bytes(random.Random(0).getrandbits(8) for _ in range(4096)),
    "text": b"epoch: 3\nnot a checkpoint\n",
    "missing": None,
}


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "real.ckpt"
    model = TinyClassifier(width=8)
    lw.convert(model, "iternorm", group_size=8, exclude="aux")
    torch.save({"state_dict": model.state_dict(), "epoch": 0}, path)
    return path


def bad_checkpoint(kind: str, tmp_path: Path, real: Path) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        data = real.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind != "missing":
        path.write_bytes(BAD_CHECKPOINTS[kind])
    return path


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_file_is_said_as_load_converted_says_it(kind, tmp_path, real_checkpoint):
    path = bad_checkpoint(kind, tmp_path, real_checkpoint)
    with pytest.raises((ValueError, FileNotFoundError)) as expected:
        lw.load_converted(TinyClassifier, path)
    with pytest.raises(type(expected.value)) as checked:
        check_checkpoint_file(path)
    assert str(checked.value) == str(expected.value)
    check_checkpoint_file(real_checkpoint)  # a good one passes


@pytest.mark.parametrize(
    ("subcommand", "kind"),
    [("validate", kind) for kind in sorted(BAD_CHECKPOINTS)]
    + [("fit", "missing"), ("fit", "text")],
)
def test_ckpt_path_is_checked_before_any_work(kind, subcommand, tmp_path, real_checkpoint,
                                              capsys):  # fmt: skip
    path = bad_checkpoint(kind, tmp_path, real_checkpoint)
    with pytest.raises((ValueError, FileNotFoundError)) as expected:
        lw.load_converted(TinyClassifier, path)
    message = fail_line(capsys, subcommand, "--config", str(whiten_config(tmp_path)),
                        "--ckpt_path", str(path))  # fmt: skip
    assert message == str(expected.value)
    assert "modules -> IterNorm" not in capsys.readouterr().out  # no conversion ran


@pytest.mark.slow  # a CLI subprocess
def test_a_truncated_checkpoint_is_one_line_without_traceback(tmp_path, real_checkpoint):
    path = bad_checkpoint("truncated", tmp_path, real_checkpoint)
    done = subprocess.run([sys.executable, "-m", "lightning_whiten", "validate", "--config",
                           str(whiten_config(tmp_path)), "--ckpt_path", str(path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(
        f"lightning-whiten: error: checkpoint {str(path)!r} ({path.stat().st_size} bytes) cannot "
        "be read: it is truncated, corrupted or not a torch checkpoint ("
    ), done.stderr
    assert "modules -> IterNorm" not in done.stdout


# -- 4. the smaller cases ----------------------------------------------------------------------
def closed_pipe_run(command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command`` with its stdout a pipe whose reader has already gone (``| head -1``
    after its line): every write fails with EPIPE."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(command, stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=300, cwd=ROOT)  # fmt: skip
    finally:
        os.close(write)


@pytest.mark.slow  # CLI subprocesses (imports)
@pytest.mark.parametrize(
    "command",
    [["lightning-whiten", "--help"], ["-m", "lightning_whiten", "--help"],
     ["lightning-whiten", "recipes", "list"]],
    ids=["script", "module", "recipes"],
)  # fmt: skip
def test_help_into_a_closed_pipe_ends_quietly(command):
    if command[0] == "lightning-whiten":
        script = Path(sys.executable).parent / "lightning-whiten"
        command = [str(script), *command[1:]]
    else:
        command = [sys.executable, *command]
    done = closed_pipe_run(command)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode in (0, 1), done.stderr
    # and read by a reader that takes the first line: the usage
    first = subprocess.run(f"{' '.join(command)} | head -1", shell=True, capture_output=True,
                           text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert first.stdout.startswith(("usage: lightning-whiten", "recipes (")), first.stdout
    assert "Traceback" not in first.stderr, first.stderr


def test_image_folder_with_class_folders_but_no_images_fails_at_config_time(tmp_path, capsys):
    root = tiny_image_folder(tmp_path / "images", classes=3)
    for image in (root / "val" / "class1").iterdir():
        image.rename(image.with_suffix(".txt"))
    with pytest.raises(FileNotFoundError, match=r"1 class folder\(s\) of .*val hold no image "
                       r"\(class1\); images end in \.jpg"):  # fmt: skip
        lw.data.ImageFolder(str(root))
    data = {"class_path": "lightning_whiten.data.ImageFolder", "init_args": {"root": str(root)}}
    message = fail_line(capsys, "fit", "--config", str(whiten_config(tmp_path, data=data)))
    assert message.startswith("ImageFolder: 1 class folder(s) of ")


def test_test_says_when_it_evaluates_the_validation_split(tmp_path):
    digits = lw.data.Digits(batch_size=64)
    digits.setup("test")
    with pytest.warns(UserWarning, match="Digits has no separate test split: `test` evaluates "
                      "the validation split"):  # fmt: skip
        loader = digits.test_dataloader()
    assert loader.dataset is digits.val_set
    # an ImageFolder with a labelled test split evaluates it, silently
    root = tiny_image_folder(tmp_path / "images", classes=3)
    shutil.copytree(root / "val", root / "test")
    (root / "test" / "class0" / "0.png").unlink()
    folder = lw.data.ImageFolder(str(root), image_size=32, num_workers=0, test_dir="test")
    folder.setup("test")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader = folder.test_dataloader()
    assert len(loader.dataset) == 3 * 4 - 1 and loader.dataset is not folder.val_set


@pytest.mark.slow  # three short in-process runs (~15 s)
def test_validate_and_resume_print_the_report_in_one_line(tmp_path, capsys):
    config = str(whiten_config(tmp_path, **{"trainer.max_steps": 2}))
    cli.run(["fit", "--config", config])
    out = capsys.readouterr().out
    assert "┃ module" in out  # the table, once, when the model is converted for training
    checkpoint = out.split("lightning-whiten: checkpoint: ")[1].split()[0]
    title = "lightning-whiten 19 modules -> IterNorm, 0 skipped"
    for args in (["validate"], ["test"], ["fit", "--trainer.max_steps", "3"]):
        cli.run([args[0], "--config", config, "--ckpt_path", checkpoint, *args[1:]])
        out = capsys.readouterr().out
        assert "┃ module" not in out, args
        assert sum(line.strip() == title for line in out.splitlines()) == 1, (args, out)


def test_accuracy_never_exceeds_one():
    from lightning_whiten.models.classifier import _Accuracy

    metric = _Accuracy(10, top_k=5)
    labels = torch.arange(100) % 10
    logits = torch.randn(100, 10, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(100), labels] += 10  # every label in the top 5
    metric(logits, labels)
    assert metric.compute().item() == 1.0
    model = lw.ImageClassifier("cifar/resnetv2_20", num_classes=10)
    assert all(isinstance(m, _Accuracy) for m in (model.val_acc1, model.val_acc5, model.train_acc))


def test_the_model_summary_counts_flops(tmp_path):
    flops = {}
    for size in (16, 32):
        model = lw.ImageClassifier("cifar/resnetv2_20", num_classes=4)
        data = lw.data.SyntheticImages(num_classes=4, image_size=size, num_train=8, num_val=8,
                                       batch_size=8)  # fmt: skip
        Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                callbacks=[lw.WhiteningCallback("iternorm", layer_options={"group_size": 16},
                                                log_report=False)]).fit(model, data)  # fmt: skip
        flops[size] = ModelSummary(model).total_flops
    assert flops[16] > 0
    # convolutions dominate: four times the pixels, about four times the FLOPs
    assert 3.5 < flops[32] / flops[16] < 4.1, flops


def test_every_converted_layer_has_a_producer_or_the_reason_it_has_none():
    model = lw.ImageClassifier("cifar/resnetv2_20", num_classes=10)
    report = lw.convert(model, "iternorm", group_size=16)
    unfolded = lw.surgery.plan_export(model, torch.zeros(1, 3, 32, 32)).unfolded
    none = {r.name for r in report.replaced if r.producer.startswith("none:")}
    assert all(r.producer for r in report.replaced)
    assert len(none) == 8  # the pre-activation blocks' first norm after the first block
    for name in none:  # export cannot fold them either, for the same reason
        assert unfolded[name] == "its input is not the output of a convolution or linear layer"
    assert "┃ producer" in str(
        report
    ) and "none: not a conv/linear output (export: 1x1 map)" in str(report)


@pytest.mark.slow  # ten in-process parses (~10 s)
def test_the_recipes_page_commands_run(tmp_path, monkeypatch, capsys):
    # Every command of docs/guide/recipes.md: `recipes` ones for real (in an empty folder),
    # `fit` ones parsed and resolved (--print_config) and the whitening they configure built.
    import re
    import shlex

    page = (ROOT / "docs" / "guide" / "recipes.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", page, re.DOTALL)
    commands = [shlex.split(line, comments=True) for b in blocks for line in b.splitlines()]
    commands = [c for c in commands if c and c[0] == "lightning-whiten"]
    assert len(commands) >= 8
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.yaml").write_text((RECIPES / "quickstart.yaml").read_text())
    for command in commands:
        args = command[1:]
        if args[0] == "recipes":
            if args[1] == "copy":
                (tmp_path / args[3]).unlink(missing_ok=True)
            cli.main(args)
            continue
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.run([*args, "--print_config"])
        assert exit_info.value.code in (0, None), command
        printed = yaml.safe_load(capsys.readouterr().out)
        whiten = printed.get("whiten")
        if "null" in args:
            assert whiten is None, command
            continue
        init = whiten["init_args"]
        lw.WhiteningCallback(**init)  # a valid conversion
        if "--whiten.layer" in args:
            assert init["layer"] == args[args.index("--whiten.layer") + 1]
        if "--whiten.layer_options.group_size" in args:
            assert init["layer_options"] == {"group_size": 8, "iterations": 5, "momentum": 0.3}
