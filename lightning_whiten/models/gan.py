"""A small DCGAN/SNGAN-style GAN whose convolutions the surgery can turn into ConvNorm.

* :class:`Generator` -- ``z -> Linear -> 4x4 map -> (Upsample x2, Conv3x3, BatchNorm, ReLU) x n
  -> Conv3x3 -> tanh`` (SNGAN's upsample-and-convolve generator, no transposed convolutions, so
  every convolution is an ``nn.Conv2d`` ConvNorm can replace).
* :class:`Discriminator` -- ``(Conv3x3, LeakyReLU, Conv3x3 stride 2, LeakyReLU) x n -> Linear``
  (DCGAN/SNGAN's CNN discriminator; optional spectral normalization).
* :class:`GAN` -- the LightningModule: manual optimization (one discriminator step per batch,
  one generator step every ``n_dis`` batches), hinge or non-saturating loss, a grid of samples
  from fixed noise saved (and logged to TensorBoard/W&B loggers) every epoch, and the Frechet
  distance between real and generated images in the feature space of a small classifier
  trained on the same data at setup (:func:`frechet_distance`), an offline stand-in for FID.

ConvNorm in the generator and/or the discriminator: a ``WhiteningCallback(layer="convnorm",
include="generator.*")`` (or ``"discriminator.*"``, or both) converts the chosen convolutions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

__all__ = ["GAN", "Discriminator", "FeatureNet", "Generator", "frechet_distance"]


class Generator(nn.Module):
    """``(N, z_dim)`` noise -> ``(N, channels, image_size, image_size)`` images in ``[-1, 1]``.

    ``image_size`` must be ``4 * 2^n`` (16: two upsampling blocks, 32: three); ``width``
    channels at 4x4, halved at every block (at least 16).
    """

    def __init__(self, z_dim: int = 64, channels: int = 3, image_size: int = 32,
                 width: int = 128) -> None:  # fmt: skip
        super().__init__()
        blocks = math.log2(image_size / 4)
        if image_size < 8 or blocks != int(blocks):
            raise ValueError(f"Generator: image_size must be 4 * 2^n >= 8, got {image_size}")
        self.z_dim, self.width = z_dim, width
        self.project = nn.Linear(z_dim, width * 16)
        layers: list[nn.Module] = [nn.BatchNorm2d(width), nn.ReLU()]
        c = width
        for _ in range(int(blocks)):
            out = max(c // 2, 16)
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(c, out, 3, padding=1),
                       nn.BatchNorm2d(out), nn.ReLU()]  # fmt: skip
            c = out
        layers += [nn.Conv2d(c, channels, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.project(z).view(z.shape[0], self.width, 4, 4))


class Discriminator(nn.Module):
    """Images ``(N, channels, S, S)`` -> one score per image ``(N,)``.

    ``log2(S / 4)`` blocks of a 3x3 convolution and a 3x3 stride-2 convolution (LeakyReLU 0.1
    after each), channels ``width / 2^(n-1) ... width``; a linear layer on the ``4x4`` map.
    ``spectral_norm`` wraps every convolution and the linear layer in
    ``torch.nn.utils.parametrizations.spectral_norm`` (SNGAN).
    """

    def __init__(self, channels: int = 3, image_size: int = 32, width: int = 128,
                 spectral_norm: bool = False) -> None:  # fmt: skip
        super().__init__()
        blocks = math.log2(image_size / 4)
        if image_size < 8 or blocks != int(blocks):
            raise ValueError(f"Discriminator: image_size must be 4 * 2^n >= 8, got {image_size}")
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        layers: list[nn.Module] = []
        c = channels
        for i in range(int(blocks)):
            out = max(width // 2 ** (int(blocks) - 1 - i), 16)
            layers += [sn(nn.Conv2d(c, out, 3, padding=1)), nn.LeakyReLU(0.1),
                       sn(nn.Conv2d(out, out, 3, stride=2, padding=1)), nn.LeakyReLU(0.1)]  # fmt: skip
            c = out
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.head = sn(nn.Linear(c * 16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.net(x)).flatten()


class FeatureNet(nn.Module):
    """The small classifier whose penultimate features the Frechet distance compares:
    ``(Conv3x3, BN, ReLU, MaxPool2) x 3``, global average pooling (``features``: ``(N, 128)``),
    a linear classifier."""

    def __init__(self, channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for out in (32, 64, 128):
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.MaxPool2d(2)]  # fmt: skip
            c = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.body(x))


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets ``(N, D)``, ``(M, D)``:

        ||mu_r - mu_f||^2 + tr(C_r + C_f - 2 (C_r C_f)^(1/2))

    (FID's formula, Heusel et al. 2017). Computed in float64; ``tr (C_r C_f)^(1/2)`` as
    ``sum sqrt(eig(C_r^(1/2) C_f C_r^(1/2)))`` (a symmetric PSD matrix with the same
    eigenvalues), negative round-off eigenvalues clamped to 0.
    """
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"frechet_distance: expected (N, D) and (M, D) features, got {tuple(real.shape)} "
            f"and {tuple(fake.shape)}"
        )
    if min(real.shape[0], fake.shape[0]) < 2:
        raise ValueError("frechet_distance: needs at least 2 samples of each set")
    r, f = real.double(), fake.double()
    mu_r, mu_f = r.mean(0), f.mean(0)
    c_r, c_f = torch.cov(r.T).reshape(r.shape[1], -1), torch.cov(f.T).reshape(f.shape[1], -1)
    vals, vecs = torch.linalg.eigh(c_r)
    sqrt_r = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    middle = sqrt_r @ c_f @ sqrt_r
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_r - mu_f).pow(2).sum() + c_r.trace() + c_f.trace() - 2 * trace_sqrt)


class GAN(pl.LightningModule):
    """A DCGAN/SNGAN-style GAN trained by manual optimization.

    Each training batch: one discriminator step on real images and generated ones; every
    ``n_dis``-th batch also one generator step (a fresh noise batch). Losses, with ``D`` the
    discriminator's score:

    * ``"hinge"`` (SNGAN): ``L_D = E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]``,
      ``L_G = -E[D(G(z))]``;
    * ``"nonsaturating"`` (DCGAN): ``L_D = E[softplus(-D(x))] + E[softplus(D(G(z)))]``,
      ``L_G = E[softplus(-D(G(z)))]``.

    Real images come from the datamodule normalized (``(p - mean) / std``, pixels ``p`` in
    [0, 1]); the GAN works in ``2p - 1`` (the generator's tanh range), using the datamodule's
    ``input_space`` (or ``pixel_mean`` / ``pixel_std``).

    Every epoch: a grid of ``grid_size`` samples from fixed noise goes to
    ``<log_dir>/samples/epoch_<n>.png`` (and to the logger, if it has ``add_image`` or
    ``log_image``). Every validation: ``val/fd``, the Frechet distance between
    ``fd_samples`` validation images and as many generated ones, in the features of a
    :class:`FeatureNet` trained at setup on the training images (``feature_epochs`` of Adam,
    seeded by ``feature_seed``; ``feature_checkpoint`` loads a saved one instead, and the
    trained one is saved as ``feature_net.pt`` in the log dir); ``val/fd_real``, the same
    distance between training and validation images (the floor a perfect generator reaches at
    this sample size), and ``val/feature_acc``, that classifier's validation accuracy.

    Args:
        num_classes: classes of the data (linked by the CLI; for the feature classifier).
        image_size, channels: of the data.
        z_dim, g_width, d_width: network sizes.
        loss: ``"hinge"`` or ``"nonsaturating"``.
        lr_g, lr_d, betas: Adam for each network.
        n_dis: discriminator steps per generator step.
        spectral_norm: spectral normalization in the discriminator.
    """

    def __init__(self, num_classes: int = 10, image_size: int = 32, channels: int = 3,
                 z_dim: int = 128, g_width: int = 256, d_width: int = 128,
                 loss: Literal["hinge", "nonsaturating"] = "hinge", lr_g: float = 2e-4,
                 lr_d: float = 2e-4, betas: tuple[float, float] = (0.0, 0.9), n_dis: int = 1,
                 spectral_norm: bool = False, grid_size: int = 64, fd_samples: int = 1000,
                 feature_epochs: int = 5, feature_seed: int = 0,
                 feature_checkpoint: str | None = None, pixel_mean: list[float] | None = None,
                 pixel_std: list[float] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        if loss not in ("hinge", "nonsaturating"):
            raise ValueError(f"GAN: loss must be 'hinge' or 'nonsaturating', got {loss!r}")
        for name, value in (("lr_g", lr_g), ("lr_d", lr_d)):
            if not value > 0:
                raise ValueError(f"GAN: {name} must be > 0, got {value!r}")
        if n_dis < 1:
            raise ValueError(f"GAN: n_dis must be >= 1, got {n_dis!r}")
        if (pixel_mean is None) != (pixel_std is None):
            raise ValueError("GAN: give both pixel_mean and pixel_std, or neither")
        self.automatic_optimization = False
        self.generator = Generator(z_dim, channels, image_size, g_width)
        self.discriminator = Discriminator(channels, image_size, d_width, spectral_norm)
        gen = torch.Generator().manual_seed(feature_seed)
        self.register_buffer("fixed_noise", torch.randn(grid_size, z_dim, generator=gen))
        # Outside the module tree: not trained by the GAN's optimizers, not converted by the
        # surgery, not in the GAN's checkpoint (it is retrained or loaded at setup).
        self._aux: dict[str, Any] = {}
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self._real: list[tuple[Tensor, Tensor]] = []  # validation images and labels
        self._dis_steps = 0

    # -- pixel spaces -------------------------------------------------------------------------
    def _space(self) -> None:
        h = self.hparams
        if h.pixel_mean is not None:
            mean, std = h.pixel_mean, h.pixel_std
        else:
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
            space = getattr(datamodule, "input_space", None)
            if space is None or not math.isfinite(space.std[0]):
                raise ValueError(
                    "GAN: needs the input normalization to map images to [-1, 1]: set "
                    "pixel_mean and pixel_std, or use a datamodule with an input_space"
                )
            mean, std = space.mean, space.std
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(shape)
        self.std = torch.tensor(std, dtype=torch.float32).view(shape)

    def to_gan(self, x: Tensor) -> Tensor:
        """Datamodule images -> ``[-1, 1]``."""
        return (x * self.std.to(x) + self.mean.to(x)) * 2 - 1  # type: ignore[union-attr]

    def from_gan(self, x: Tensor) -> Tensor:
        """``[-1, 1]`` -> the datamodule's normalization (what the feature classifier saw)."""
        return ((x + 1) / 2 - self.mean.to(x)) / self.std.to(x)  # type: ignore[union-attr]

    def forward(self, z: Tensor) -> Tensor:
        """Generated images ``(N, C, S, S)`` in ``[-1, 1]``."""
        return self.generator(z)

    def recalibration_step(self, batch: Any) -> None:
        """What :func:`lightning_whiten.recalibrate` runs per batch (``WhiteningCallback``'s
        ``recalibrate_batches``): the normalization layers of both networks see what they see
        in a training step -- the generator a fresh noise batch, the discriminator the real
        images and the generated ones."""
        x = self.to_gan(batch[0] if isinstance(batch, (list, tuple)) else batch)
        fake = self.sample(x.shape[0])
        self.discriminator(x)
        self.discriminator(fake)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.hparams.z_dim, generator=generator).to(self.device)
        return self(z)

    # -- setup: the feature classifier --------------------------------------------------------
    def setup(self, stage: str) -> None:
        self._space()
        if "features" in self._aux or stage not in ("fit", "validate"):
            return
        datamodule = self.trainer.datamodule
        h = self.hparams
        net = FeatureNet(h.channels, h.num_classes)
        if h.feature_checkpoint:
            net.load_state_dict(torch.load(h.feature_checkpoint, map_location="cpu",
                                           weights_only=True))  # fmt: skip
        else:
            net = self._train_features(net, datamodule)
            if self.trainer.is_global_zero:
                folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
                folder.mkdir(parents=True, exist_ok=True)
                torch.save(net.state_dict(), folder / "feature_net.pt")
        self._aux["features"] = net.eval()

    def _train_features(self, net: FeatureNet, datamodule: Any) -> FeatureNet:
        """``feature_epochs`` of Adam (lr 1e-3) on the training set, seeded; on the module's
        device."""
        from torch.utils.data import DataLoader

        datamodule.setup("fit")
        fork = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):  # leave the run's random stream alone
            torch.manual_seed(self.hparams.feature_seed)
            net = net.to(self.device).train()
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
            loader = DataLoader(datamodule.train_set, batch_size=128, shuffle=True)
            for _ in range(self.hparams.feature_epochs):
                for x, y in loader:
                    loss = nn.functional.cross_entropy(net(x.to(self.device)), y.to(self.device))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        return net.cpu()

    # -- training -----------------------------------------------------------------------------
    def _d_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        if self.hparams.loss == "hinge":
            return torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
        return nn.functional.softplus(-real).mean() + nn.functional.softplus(fake).mean()

    def _g_loss(self, fake: Tensor) -> Tensor:
        if self.hparams.loss == "hinge":
            return -fake.mean()
        return nn.functional.softplus(-fake).mean()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x = self.to_gan(batch[0] if isinstance(batch, (list, tuple)) else batch)
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        n = x.shape[0]
        fake = self.sample(n).detach()
        loss_d = self._d_loss(self.discriminator(x), self.discriminator(fake))
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        self._dis_steps += 1
        self.log("train/loss_d", loss_d, prog_bar=True)
        if self._dis_steps % self.hparams.n_dis == 0:
            # only the generator's gradients are used; the discriminator's are zeroed next step
            loss_g = self._g_loss(self.discriminator(self.sample(n)))
            opt_g.zero_grad()
            self.manual_backward(loss_g)
            opt_g.step()
            self.log("train/loss_g", loss_g, prog_bar=True)

    def on_train_epoch_end(self) -> None:
        from torchvision.utils import make_grid, save_image

        was_training = self.generator.training
        self.generator.eval()
        with torch.no_grad():
            images = (self(self.fixed_noise) + 1) / 2
        self.generator.train(was_training)
        grid = make_grid(images.clamp(0, 1).cpu(), nrow=int(math.sqrt(images.shape[0])))
        #: the last sample grid ``(C, H, W)`` in [0, 1]
        self.last_grid = grid
        if self.trainer.is_global_zero:
            folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            save_image(grid, folder / f"epoch_{self.current_epoch:03d}.png")
            for logger in self.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_image"):  # TensorBoard
                    experiment.add_image("samples", grid, self.current_epoch)
                elif hasattr(logger, "log_image"):  # W&B, Neptune, ...
                    logger.log_image("samples", [grid])  # type: ignore[attr-defined]

    # -- evaluation: Frechet distance in the feature classifier's space -----------------------
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if sum(r[0].shape[0] for r in self._real) < self.hparams.fd_samples:
            self._real.append((batch[0].detach(), batch[1].detach()))

    @torch.no_grad()
    def _features(self, x: Tensor) -> Tensor:
        net = self._aux["features"].to(x.device)
        out = []
        for chunk in x.split(256):
            out.append(net.features(chunk).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def on_validation_epoch_end(self) -> None:
        if not self._real or "features" not in self._aux:
            return
        real = torch.cat([r[0] for r in self._real])[: self.hparams.fd_samples]
        labels = torch.cat([r[1] for r in self._real])[: self.hparams.fd_samples].cpu()
        self._real = []
        gen = torch.Generator().manual_seed(self.hparams.feature_seed + 1)
        was_training = self.generator.training
        self.generator.eval()
        fake = self.from_gan(torch.cat([self.sample(c.shape[0], gen) for c in real.split(256)]))
        self.generator.train(was_training)
        real_features, fake_features = self._features(real), self._features(fake)
        self.log("val/fd", frechet_distance(real_features, fake_features), prog_bar=True)
        if "fd_real" not in self._aux:  # real vs real at this sample size: the floor
            train = self.trainer.datamodule.train_set
            n = min(len(train), real.shape[0])
            picked = torch.randperm(len(train), generator=gen)[:n].tolist()  # a random subset
            images = torch.stack([train[i][0] for i in picked]).to(real.device)
            self._aux["fd_real"] = frechet_distance(self._features(images), real_features)
            net = self._aux["features"].to(real.device)
            predicted = torch.cat([net(c).argmax(-1).cpu() for c in real.split(256)])
            self._aux["feature_acc"] = float((predicted == labels).float().mean())
        self.log("val/fd_real", self._aux["fd_real"])
        self.log("val/feature_acc", self._aux["feature_acc"])

    def configure_optimizers(self):
        h = self.hparams
        betas = tuple(h.betas)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=h.lr_g, betas=betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=h.lr_d, betas=betas)
        return [opt_g, opt_d]
