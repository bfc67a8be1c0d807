"""Adversarial training and robust evaluation: the attacks and the ImageClassifier options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_whiten as lw
from lightning_whiten.adversarial import (
    AdversarialTraining,
    InputSpace,
    RobustEvaluation,
    fgsm,
    pgd,
    robust_predictions,
)

SPACE = InputSpace((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
EPS = 8 / 255


def pixels(x: torch.Tensor, space: InputSpace = SPACE) -> torch.Tensor:
    mean = torch.tensor(space.mean).view(1, -1, 1, 1)
    std = torch.tensor(space.std).view(1, -1, 1, 1)
    return x * std + mean


def trained_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small BN CNN fitted a little on separable data (so attacks have something to undo)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4),
    )  # fmt: skip
    labels = torch.arange(64) % 4
    images = torch.rand(64, 3, 8, 8) * 0.4  # pixels in [0, 1]
    bright = labels < 3  # classes 0-2: one brighter channel each; class 3: all dark
    images[bright.nonzero().flatten(), labels[bright]] += 0.5
    mean = torch.tensor(SPACE.mean).view(1, -1, 1, 1)
    std = torch.tensor(SPACE.std).view(1, -1, 1, 1)
    x = (images - mean) / std
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        loss = F.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, x, labels


def test_attacks_stay_within_epsilon_in_pixel_space_and_in_the_image_range():
    model, x, y = trained_model()
    for adv in (
        pgd(model, x, y, EPS, 2 / 255, 10, SPACE),
        fgsm(model, x, y, EPS, SPACE),
        fgsm(model, x, y, EPS, SPACE, step_size=1.25 * EPS, random_start=True),
    ):
        delta = pixels(adv) - pixels(x)
        assert delta.abs().max() <= EPS + 1e-6
        assert pixels(adv).min() >= -1e-6 and pixels(adv).max() <= 1 + 1e-6
        assert delta.abs().max() > EPS / 2  # it did move


def test_pgd_increases_the_loss_more_than_random_noise_and_fgsm():
    model, x, y = trained_model()
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        noise = SPACE.perturb(x, (torch.rand_like(x) * 2 - 1) * EPS)
        noisy = F.cross_entropy(model(noise), y)
        one_step = F.cross_entropy(model(fgsm(model, x, y, EPS, SPACE)), y)
        many = F.cross_entropy(model(pgd(model, x, y, EPS, 2 / 255, 20, SPACE)), y)
    assert many > one_step > clean
    assert many > noisy
    assert many > 1.5 * clean


def test_robust_evaluation_leaves_modes_buffers_gradients_and_the_global_rng_alone():
    model, x, y = trained_model()
    model.zero_grad(set_to_none=True)
    model.train()
    model[0].eval()  # a mixed state must come back as it was
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    evaluation = RobustEvaluation(epsilon="8/255", pgd_steps=5, pgd_step_size="2/255")
    with torch.inference_mode():  # as in Lightning's validation loop
        out = robust_predictions(model, x, y, evaluation, SPACE)
    assert set(out) == {"acc_pgd5", "acc_fgsm"}
    assert model.training and not model[0].training and model[1].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    # the attacks ran in eval mode: same predictions as attacking the eval model directly
    model.eval()
    gen = torch.Generator().manual_seed(0)
    adv = pgd(model, x, y, EPS, 2 / 255, 5, SPACE, generator=gen)
    torch.testing.assert_close(out["acc_pgd5"], model(adv).argmax(-1))


def test_unbounded_space_does_not_clamp():
    space = InputSpace.unbounded()
    x = torch.full((1, 3, 2, 2), 5.0)
    assert torch.equal(space.perturb(x, torch.full_like(x, 0.1)), x + 0.1)
    assert torch.equal(space.project(x, torch.full_like(x, 3.0), 0.5), torch.full_like(x, 0.5))


def test_options_are_validated():
    assert AdversarialTraining.from_config({"epsilon": "8/255"}).step_size == pytest.approx(
        1.25 * 8 / 255
    )  # Wong et al.'s default step for fgsm_rs
    with pytest.raises(ValueError, match=r"adversarial: unknown option.*'eps'"):
        AdversarialTraining.from_config({"eps": 0.1})
    with pytest.raises(ValueError, match="adversarial: method"):
        AdversarialTraining.from_config({"method": "trades"})
    with pytest.raises(ValueError, match="robust_eval: epsilon must be a number or 'a/b'"):
        RobustEvaluation.from_config({"epsilon": "eight"})
    with pytest.raises(ValueError, match="robust_eval: nothing to measure"):
        RobustEvaluation(pgd_steps=0, fgsm=False)
    assert RobustEvaluation(pgd_steps=20).metric_names == ("acc_pgd20", "acc_fgsm")


def tiny_loader(n: int = 16, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(
        torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen)
    )
    return DataLoader(data, batch_size=8)


def classifier(**kwargs) -> lw.ImageClassifier:
    return lw.ImageClassifier(
        backbone="cifar/resnet18",
        num_classes=4,
        backbone_options={"width": 4, "conv": "convnorm", "conv_options": {"running_v": "cosine"}},
        lr=0.05,
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
        **kwargs,
    )


def fit(model, epochs: int = 1) -> Trainer:
    trainer = Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, tiny_loader(), tiny_loader(8, seed=1))
    return trainer


def test_classifier_fast_adversarial_training_logs_robust_accuracy():
    torch.manual_seed(1)
    model = classifier(
        adversarial={"method": "fgsm_rs", "epsilon": 0.1},
        robust_eval={"epsilon": 0.1, "pgd_steps": 3, "pgd_step_size": 0.05},
    )
    trainer = fit(model)
    metrics = trainer.callback_metrics
    assert {"val/acc_pgd3", "val/acc_fgsm", "val/acc1"} <= set(metrics)
    assert torch.isfinite(metrics["train/loss"])
    assert trainer.global_step == 2  # one optimizer step per batch
    # two training forwards per step (the attack's and the update's), as in the published code
    assert int(model.net.conv1.num_batches_tracked) == 4


def test_classifier_free_adversarial_training_replays_each_batch():
    torch.manual_seed(2)
    model = classifier(adversarial={"method": "free", "epsilon": 0.1, "replays": 3})
    before = model.net.fc.weight.detach().clone()
    trainer = fit(model)
    assert not model.automatic_optimization
    assert trainer.global_step == 2 * 3  # replays x batches optimizer steps
    assert not torch.equal(model.net.fc.weight, before)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_classifier_needs_the_input_normalization_for_attacks():
    model = lw.ImageClassifier(
        backbone="cifar/resnet18", num_classes=4, backbone_options={"width": 4},
        robust_eval={"pgd_steps": 2},
    )  # fmt: skip
    with pytest.raises(ValueError, match="pixel_mean and pixel_std"):
        fit(model)


def test_digits_datamodule_input_space_maps_back_to_pixels():
    from lightning_whiten.data import Digits

    images, _ = Digits.tensors(16)
    space = Digits.pixel_space(16)
    p = pixels(images, space)
    assert p.min() >= -1e-5 and p.max() <= 1 + 1e-5
    assert p.max() > 0.9  # the full range is used
