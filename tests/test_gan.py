"""The GAN: Frechet distance, both optimizers step, ConvNorm placement, sample grids."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from lightning.pytorch import Trainer

import lightning_whiten as lw
from lightning_whiten.data import Digits
from lightning_whiten.models.gan import GAN, Discriminator, Generator, frechet_distance


def test_frechet_distance_matches_scipy_sqrtm_reference():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=gen, dtype=torch.float64) @ torch.randn(
        6, 6, generator=gen, dtype=torch.float64
    )
    b = torch.randn(150, 6, generator=gen, dtype=torch.float64) * 2 + 1  # fmt: skip
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    c_a, c_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    covmean = scipy.linalg.sqrtm(c_a @ c_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(c_a + c_b - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, a + 3) == pytest.approx(9 * 6, rel=1e-6)  # a shift only


def test_frechet_distance_rejects_mismatched_features():
    with pytest.raises(ValueError, match="expected \\(N, D\\) and \\(M, D\\)"):
        frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))


@pytest.mark.parametrize("size", [8, 16, 32])
def test_networks_shapes(size):
    g, d = Generator(16, 3, size, 32), Discriminator(3, size, 32, spectral_norm=True)
    images = g(torch.randn(5, 16))
    assert images.shape == (5, 3, size, size) and images.abs().max() <= 1
    assert d(images).shape == (5,)
    with pytest.raises(ValueError, match="image_size must be 4 \\* 2\\^n"):
        Generator(16, 3, 24)


def tiny_gan(**options) -> GAN:
    return GAN(image_size=8, z_dim=8, g_width=16, d_width=16, grid_size=4, fd_samples=40,
               feature_epochs=1, **options)  # fmt: skip


def fit(model, tmp_path, callbacks=(), steps=2):
    trainer = Trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=1,
                      accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                      callbacks=list(callbacks))  # fmt: skip
    trainer.fit(model, Digits(image_size=8, batch_size=16, augment=False))
    return trainer


@pytest.mark.parametrize("loss", ["hinge", "nonsaturating"])
def test_both_optimizers_step_and_samples_are_finite(tmp_path, loss):
    torch.manual_seed(0)
    model = tiny_gan(loss=loss, n_dis=2)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if k.endswith("weight")}
    trainer = fit(model, tmp_path, steps=2)
    # every weight of both networks moved (a bias can have an exactly zero gradient: with the
    # hinge loss and every score inside the margin, D's last bias gets -1 + 1 = 0)
    after = dict(model.named_parameters())
    unchanged = [k for k, v in before.items() if torch.equal(v, after[k])]
    assert not unchanged
    assert any(k.startswith("generator.") for k in before)
    assert any(k.startswith("discriminator.") for k in before)
    opt_g, opt_d = trainer.optimizers
    # n_dis=2: two discriminator steps, one generator step
    assert opt_d.state[next(iter(model.discriminator.parameters()))]["step"] == 2
    assert opt_g.state[next(iter(model.generator.parameters()))]["step"] == 1
    assert torch.isfinite(model.sample(8)).all()
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["val/fd"]) and metrics["val/fd"] > 0
    assert (tmp_path / "samples" / "epoch_000.png").is_file()
    assert (tmp_path / "feature_net.pt").is_file()
    assert (
        model.last_grid.shape[0] == 3 and 0 <= model.last_grid.min() <= model.last_grid.max() <= 1
    )


@pytest.mark.parametrize("where", ["generator", "discriminator"])
def test_convnorm_placement_through_the_surgery(tmp_path, where):
    model = tiny_gan()
    callback = lw.WhiteningCallback("convnorm", include=f"{where}.*", log_report=False)
    fit(model, tmp_path, [callback], steps=1)
    for part in ("generator", "discriminator"):
        convs = [m for m in getattr(model, part).modules() if isinstance(m, torch.nn.Conv2d)]
        converted = [isinstance(m, lw.ConvNorm2d) for m in convs]
        assert all(converted) if part == where else not any(converted), part


def test_gan_maps_data_to_the_generator_range_and_back():
    model = GAN(
        image_size=8, pixel_mean=[0.5, 0.4, 0.3], pixel_std=[0.2, 0.25, 0.3], feature_epochs=0
    )
    model._space()
    pixels = torch.rand(2, 3, 8, 8)
    normalized = (pixels - model.mean) / model.std
    torch.testing.assert_close(model.to_gan(normalized), pixels * 2 - 1)
    torch.testing.assert_close(model.from_gan(pixels * 2 - 1), normalized)
