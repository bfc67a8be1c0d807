"""Every recipe that names a paper runs that paper's setup: the settings a paper (or its
authors' script) fixes are checked against this table of sources, so they cannot drift."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

import lightning_whiten as lw

RECIPES = Path(__file__).parent.parent / "recipes"

ITN_PT = "huangleiBuaa/IterNorm-pytorch@574b124"
WRN = f"{ITN_PT} cifar10/experiments/wrn/wrn_28_10_ItN.sh"
WRN_BN = f"{ITN_PT} cifar10/experiments/wrn/wrn_28_10_BN.sh"
VGG = f"{ITN_PT} cifar10/experiments/vgg/vgg_base_ItN.sh"
VGG_BN = f"{ITN_PT} cifar10/experiments/vgg/vgg_base_BN.sh"
R50 = f"{ITN_PT} ImageNet/experiments/resnet50_ItN.sh (StepLR: --lr-step default 30)"
R50_DF = f"{ITN_PT} ImageNet/experiments/resnet50_ItN_DF.sh (--arch-cfg=last=True)"
SWBN = "Zhang et al. CVPR 2021 as quoted by lucanunz/Stochastic-Whitening-Batch-Normalization; He et al. 2016 ResNetV2 CIFAR schedule"

_WRN = {
    "epochs": 200,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "milestones": [60, 120, 160],
    "gamma": 0.2,
    "lr_schedule": "step",
    "seed": 1,
}
_VGG = {
    "epochs": 160,
    "batch_size": 256,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "milestones": [60, 120],
    "gamma": 0.2,
    "lr_schedule": "step",
    "seed": 1,
}
_R50 = {
    "epochs": 100,
    "batch_size": 256,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "milestones": [30, 60, 90],
    "gamma": 0.1,
    "lr_schedule": "step",
}
_V2 = {"epochs": 164, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
       "milestones": [82, 123], "gamma": 0.1, "lr_schedule": "step"}  # fmt: skip

#: recipe -> (source, what its header must cite, {setting: value the source fixes}).
#: ``layer`` None: no conversion.
SOURCES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "cifar10_wrn28_10_iternorm": (WRN, "wrn_28_10_ItN.sh", {**_WRN, "layer": "iternorm", "group_size": 64, "iterations": 5}),
    "cifar10_wrn28_10_iternorm_ddp": (WRN, "wrn_28_10_ItN.sh", {**_WRN, "layer": "iternorm", "group_size": 64, "iterations": 5}),
    "cifar10_wrn28_10_bn": (WRN_BN, "wrn_28_10_BN.sh", {**_WRN, "layer": None}),
    "cifar10_vgg_iternorm": (VGG, "vgg_base_ItN.sh", {**_VGG, "layer": "iternorm", "group_size": 512, "iterations": 5}),
    "cifar10_vgg_bn": (VGG_BN, "vgg_base_BN.sh", {**_VGG, "layer": None}),
    "imagenet_resnet50_iternorm_first": (R50, "resnet50_ItN.sh", {**_R50, "layer": "iternorm", "group_size": 64, "iterations": 5, "placement": "first", "insert": []}),
    "imagenet_resnet50_iternorm_df": (R50_DF, "resnet50_ItN_DF.sh", {**_R50, "layer": "iternorm", "group_size": 64, "iterations": 5, "placement": "first", "insert": ["net.fc"]}),
    "imagenet_resnet50_bn": (R50, "resnet50_ItN.sh", {**_R50, "layer": None}),
    "cifar10_resnetv2_56_swbn": (SWBN, "lucanunz/Stochastic-Whitening-Batch-Normalization", {**_V2, "layer": "swbn", "criterion": "kl", "eps": 1e-8, "layer_momentum": 0.05, "tie_whitening_rate_to_lr": 1e-4}),
    "cifar10_resnetv2_56_bn": (SWBN, "cifar10_resnetv2_56_swbn.yaml for the sources", {**_V2, "layer": None}),
}  # fmt: skip


def _defaults(cls) -> dict[str, Any]:
    return {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def settings(recipe: str) -> dict[str, Any]:
    """The settings a recipe runs with: its YAML, and the defaults of what it leaves out."""
    config = yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())
    trainer = config.get("trainer", {})
    model = {**_defaults(lw.ImageClassifier), **config["model"].get("init_args", {})}
    data = config["data"].get("init_args", {})
    devices = trainer.get("devices", 1)
    found: dict[str, Any] = {
        "epochs": trainer.get("max_epochs"),
        "batch_size": data.get("batch_size") * (devices if isinstance(devices, int) else 1),
        "seed": config.get("seed_everything"),
        "layer": None,
        **{k: model[k] for k in ("lr", "momentum", "weight_decay", "milestones", "gamma",
                                 "lr_schedule", "label_smoothing")},
    }  # fmt: skip
    sections = [config["whiten"]] if config.get("whiten") else []  # the whiten section
    sections += [  # or the older form, in the trainer's callbacks
        c.get("init_args", {})
        for c in trainer.get("callbacks", [])
        if c["class_path"].endswith("WhiteningCallback")
    ]
    for args in sections:
        if "class_path" in args:
            args = args.get("init_args", {})
        options = args.get("layer_options", {})
        found.update(
            layer=args.get("layer"), placement=args.get("placement", "all"),
            insert=list(args.get("insert") or []),
            tie_whitening_rate_to_lr=args.get("tie_whitening_rate_to_lr"),
            layer_momentum=options.get("momentum"),
            **{k: v for k, v in options.items() if k != "momentum"},
        )  # fmt: skip
    return found


@pytest.mark.parametrize("recipe", sorted(SOURCES))
def test_recipe_matches_its_source(recipe):
    source, cite, expected = SOURCES[recipe]
    actual = settings(recipe)
    differs = {
        key: (actual.get(key), value) for key, value in expected.items() if actual.get(key) != value
    }
    assert not differs, f"{recipe} differs from {source}: {{setting: (recipe, source)}} {differs}"
    header = (RECIPES / f"{recipe}.yaml").read_text().split("\nseed_everything")[0]
    assert " ".join(cite.split()) in " ".join(header.replace("#", " ").split()), (
        f"{recipe}'s header does not cite {cite}"
    )


def test_every_paper_recipe_has_a_source_row():
    # A recipe whose header cites an author's script must be in the table above.
    for path in RECIPES.glob("*.yaml"):
        header = path.read_text().split("\nseed_everything")[0]
        if "IterNorm-pytorch" in header and "Not a setup of the paper" not in header:
            assert path.stem in SOURCES, path.name
