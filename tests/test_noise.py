"""Label noise: exact rates, seeded, asymmetric flips, saved with the run."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from lightning.pytorch import Trainer

import lightning_whiten as lw
from lightning_whiten.data import Digits
from lightning_whiten.noise import ASYMMETRIC_MAPS, corrupt_labels

LABELS = torch.arange(10).repeat(97)  # 970 labels, 97 per class


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.8, 1.0])
def test_symmetric_noise_changes_exactly_the_rate_and_spreads_over_other_classes(rate):
    noisy = corrupt_labels(LABELS, 10, rate, "symmetric", seed=0)
    changed = noisy != LABELS
    assert int(changed.sum()) == round(rate * LABELS.numel())
    assert noisy.min() >= 0 and noisy.max() <= 9
    if rate >= 0.4:  # every (true, noisy) pair of different classes occurs
        pairs = {(int(a), int(b)) for a, b in zip(LABELS[changed], noisy[changed], strict=True)}
        assert len(pairs) == 90


def test_uniform_noise_is_the_authors_convention():
    # ceil(rate * N) labels redrawn from all classes: about 1/C of them keep their class
    noisy = corrupt_labels(LABELS, 10, 0.5, "uniform", seed=0)
    changed = int((noisy != LABELS).sum())
    redrawn = math.ceil(0.5 * 970)
    assert changed <= redrawn and abs(changed - 0.9 * redrawn) < 0.1 * redrawn


def test_asymmetric_noise_flips_the_rate_of_each_mapped_class():
    mapping = ASYMMETRIC_MAPS["cifar10"]
    noisy = corrupt_labels(LABELS, 10, 0.4, "asymmetric", seed=0, mapping=mapping)
    for c in range(10):
        members = noisy[torch.eq(LABELS, c)]
        if c in mapping:
            assert int((members == mapping[c]).sum()) == math.ceil(0.4 * 97)
            assert int((members == c).sum()) == 97 - math.ceil(0.4 * 97)
        else:
            assert (members == c).all()


def test_noise_is_fixed_by_its_seed():
    a = corrupt_labels(LABELS, 10, 0.4, seed=3)
    assert torch.equal(a, corrupt_labels(LABELS, 10, 0.4, seed=3))
    assert not torch.equal(a, corrupt_labels(LABELS, 10, 0.4, seed=4))
    assert torch.equal(LABELS, torch.arange(10).repeat(97))  # the input is not modified


def test_bad_noise_options_name_the_option():
    with pytest.raises(ValueError, match="rate must be in"):
        Digits(label_noise={"rate": 1.5})
    with pytest.raises(ValueError, match="takes rate, mode, seed and mapping"):
        Digits(label_noise={"rate": 0.2, "ratio": 0.1})
    with pytest.raises(ValueError, match="mode must be one of"):
        Digits(label_noise={"rate": 0.2, "mode": "pairs"})
    with pytest.raises(ValueError, match="needs a class mapping"):
        corrupt_labels(LABELS, 10, 0.2, "asymmetric")


def test_digits_noise_hits_training_labels_only_and_is_saved_with_the_run(tmp_path):
    data = Digits(image_size=8, batch_size=64, label_noise={"rate": 0.4, "seed": 1})
    model = lw.ImageClassifier("small/mlp", num_classes=10,
                               backbone_options={"in_features": 192, "norm": "batchnorm"})  # fmt: skip
    Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            default_root_dir=str(tmp_path)).fit(model, data)  # fmt: skip
    train_labels = data.train_set.labels
    assert torch.equal(train_labels, data.noisy_labels)
    assert int((data.noisy_labels != data.clean_labels).sum()) == round(0.4 * len(train_labels))
    clean = Digits(image_size=8)  # the same split without noise: val labels equal the true ones
    clean.setup()
    assert torch.equal(data.val_set.tensors[1], clean.val_set.tensors[1])
    assert torch.equal(data.clean_labels, clean.train_set.labels)
    assert data.noisy_labels_path == tmp_path / "noisy_labels.csv"
    with data.noisy_labels_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["noisy"]) for r in rows] == data.noisy_labels.tolist()
    assert [int(r["clean"]) for r in rows] == data.clean_labels.tolist()
    assert len({int(r["index"]) for r in rows}) == len(rows)


def test_cifar10_noise_replaces_the_training_targets_with_the_authors_flips(monkeypatch):
    from lightning_whiten.data import CIFAR10

    class Fake:  # stands in for torchvision's CIFAR10 (no download): only the targets matter
        def __init__(self, train: bool) -> None:
            self.targets = list(range(10)) * 5 if train else [0] * 3

    monkeypatch.setattr(CIFAR10, "_dataset", lambda self, train, transform=None: Fake(train))
    data = CIFAR10(label_noise={"rate": 0.4, "mode": "asymmetric", "seed": 0})
    data.setup()
    clean = torch.tensor(list(range(10)) * 5)
    noisy = torch.tensor(data.train_set.targets)
    flips = {
        9: 1,
        2: 0,
        3: 5,
        5: 3,
        4: 7,
    }  # truck->automobile, bird->airplane, cat<->dog, deer->horse
    for c in range(10):
        members = noisy[torch.eq(clean, c)]
        expected_flipped = math.ceil(0.4 * 5) if c in flips else 0
        assert int((members != c).sum()) == expected_flipped
        if c in flips:
            assert set(members[members != c].tolist()) == {flips[c]}
    assert data.val_set.targets == [0] * 3  # the test set stays clean
