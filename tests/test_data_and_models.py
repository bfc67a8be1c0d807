"""Datamodules and the ImageClassifier used by the recipes."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torchvision

import lightning_whiten as lw
from lightning_whiten.data import CIFAR10, Digits, ImageFolder, SyntheticImages
from lightning_whiten.models import create_backbone


def test_digits_is_offline_stratified_and_deterministic():
    data = Digits(image_size=16, val_fraction=0.25, batch_size=32)
    data.setup()
    assert len(data.train_set) + len(data.val_set) == 1797
    x, y = next(iter(data.val_dataloader()))
    assert x.shape == (32, 3, 16, 16) and y.dtype == torch.long
    labels = torch.stack([data.val_set[i][1] for i in range(len(data.val_set))])
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() >= 40 and counts.max() <= 50  # ~25% of each class
    again = Digits(image_size=16, val_fraction=0.25)
    again.setup()
    assert torch.equal(again.val_set.tensors[0], data.val_set.tensors[0])


def test_datamodule_errors_are_clear(tmp_path):
    data = CIFAR10(data_dir=str(tmp_path), download=False, num_workers=0)
    with pytest.raises(
        RuntimeError, match=r"CIFAR10: the dataset is not in .* ImageFolder or Digits"
    ):
        data.prepare_data()
    with pytest.raises(FileNotFoundError, match=r"ImageFolder: expected a folder .*train"):
        ImageFolder(root=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="SyntheticImages: batch_size must be a positive integer"):
        SyntheticImages(batch_size=0)
    SyntheticImages(batch_size=1)  # online learning: the model checks its normalizers


def test_backbone_names_and_local_weights(tmp_path):
    with pytest.raises(ValueError, match="unknown library"):
        create_backbone("keras/resnet", 10)
    with pytest.raises(ValueError, match="unknown CIFAR backbone"):
        create_backbone("cifar/resnet9000", 10)
    with pytest.raises(ValueError, match="no downloadable weights"):
        create_backbone("cifar/resnetv2_20", 10, pretrained=True)
    for library in ("timm", "torchvision", "cifar"):
        with pytest.raises(
            FileNotFoundError, match=r"checkpoint_path '.*missing.pth' is not a file"
        ):
            create_backbone(
                f"{library}/resnet18", 10, checkpoint_path=str(tmp_path / "missing.pth")
            )
    # torchvision weights from a local file; the 1000-class head is re-initialized for 10 classes
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    with pytest.warns(UserWarning, match="fc.weight"):
        model = create_backbone("torchvision/resnet18", 10, checkpoint_path=str(path))
    assert model.fc.out_features == 10
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_learning_rate_schedules_follow_their_formulas(schedule, tmp_path):
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = lw.ImageClassifier(
        backbone="cifar/resnetv2_20", num_classes=4, lr=0.1, lr_schedule=schedule, warmup_epochs=1,
        milestones=[2, 3], gamma=0.5,
    )  # fmt: skip
    data = SyntheticImages(num_classes=4, image_size=8, num_train=32, num_val=8, batch_size=8)
    pl.Trainer(
        max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Record()], limit_val_batches=0,
    ).fit(model, data)  # fmt: skip
    total, per_epoch, warmup = 16, 4, 4
    for step, lr in enumerate(lrs):
        ramp = min(1.0, (step + 1) / warmup)
        if schedule == "cosine":
            progress = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
            expected = 0.1 * ramp * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            expected = 0.1 * ramp * 0.5 ** sum(step / per_epoch >= m for m in (2, 3))
        assert lr == pytest.approx(expected), (step, lr, expected)


def test_classifier_channels_last_and_predict():
    model = lw.ImageClassifier(backbone="cifar/resnetv2_20", num_classes=5, channels_last=True)
    model.eval()
    probs = model.predict_step((torch.randn(3, 3, 16, 16), torch.zeros(3)), 0)
    assert probs.shape == (3, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    assert model.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="lr_schedule='step' needs milestones"):
        lw.ImageClassifier(lr_schedule="step")


def test_cifar_autoaugment_adds_the_cifar10_policy():
    from PIL import Image

    from lightning_whiten.data import CIFAR100

    plain = CIFAR100(num_workers=0).train_transform()
    augmented = CIFAR100(num_workers=0, autoaugment=True).train_transform()
    names = [type(t).__name__ for t in augmented.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "AutoAugment", "ToTensor", "Normalize"]
    assert augmented.transforms[2].policy == torchvision.transforms.AutoAugmentPolicy.CIFAR10
    assert "AutoAugment" not in [type(t).__name__ for t in plain.transforms]
    image = Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy())
    torch.manual_seed(0)
    out = augmented(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


@pytest.mark.parametrize(
    ("backbone", "norm", "layer_type", "count"),
    [
        ("cifar/resnetv2_20", "lpnorm", lw.LpNorm, 19),
        ("cifar/resnetv2_20", "streaming", lw.StreamingNorm, 19),
        ("cifar/wrn16_4", "layernorm", torch.nn.GroupNorm, 13),
        ("cifar/vgg", "none", None, 0),
        ("small/mlp", "batchnorm", torch.nn.BatchNorm1d, 2),
        ("small/row_rnn", "layernorm", torch.nn.LayerNorm, 1),
    ],
)
def test_backbones_are_built_with_the_chosen_normalization(backbone, norm, layer_type, count):
    model = create_backbone(
        backbone, 10, norm=norm, norm_options={} if norm != "lpnorm" else {"p": 1}
    )
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm,
             lw.LpNorm, lw.StreamingNorm)  # fmt: skip
    found = [m for m in model.modules() if isinstance(m, norms)]
    assert len(found) == count and all(isinstance(m, layer_type) for m in found)
    shape = (2, 3, 8, 8) if backbone == "small/mlp" else (2, 3, 16, 16)
    assert model(torch.randn(shape)).shape == (2, 10)
    with pytest.raises(ValueError, match="norm must be one of"):
        create_backbone(backbone, 10, norm="groupnorm")


def test_small_backbones_check_their_input_and_the_rnn_shares_one_window_per_step():
    with pytest.raises(ValueError, match=r"MLP: expected inputs with 192 values \(in_features\)"):
        create_backbone("small/mlp", 10)(torch.randn(2, 3, 16, 16))
    rnn = create_backbone("small/row_rnn", 10, input_size=16)
    with pytest.raises(ValueError, match=r"RowRNN: expected images \(N, C, H, 16\)"):
        rnn(torch.randn(2, 3, 8, 8))
    norm = rnn.norm
    assert isinstance(norm, lw.StreamingNorm)
    logits = rnn(torch.randn(1, 3, 16, 16))  # 16 time steps, batch size 1
    assert int(norm.short_count) == 16 and int(norm.num_batches_tracked) == 0
    logits.sum().backward()
    assert int(norm.num_batches_tracked) == 1 and int(norm.grad_windows) == 1


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_batch_size_one_is_refused_for_batch_statistics_with_a_clear_error():
    Digits(batch_size=1)  # allowed by the datamodule
    x, y = torch.randn(1, 3, 16, 16), torch.zeros(1, dtype=torch.long)
    model = lw.ImageClassifier(backbone="cifar/resnetv2_20", num_classes=10)
    with pytest.raises(
        ValueError,
        match=r"one sample \(batch_size=1\), but 'net.layer1.0.bn1' \(BatchNorm2d\).*norm: streaming",
    ):
        model.training_step((x, y), 0)
    model = lw.ImageClassifier(backbone="cifar/resnetv2_20", num_classes=10,
                               backbone_options={"norm": "lpnorm"})  # fmt: skip
    with pytest.raises(ValueError, match=r"'net.layer1.0.bn1' \(LpNorm\)"):
        model.training_step((x, y), 0)
    model = lw.ImageClassifier(backbone="cifar/resnetv2_20", num_classes=10,
                               backbone_options={"norm": "streaming"})  # fmt: skip
    assert torch.isfinite(model.training_step((x, y), 0))
