"""Datamodules for the recipes: Digits (offline), synthetic images, CIFAR-10/100, ImageFolder.

Every datamodule exposes ``num_classes`` and ``image_size`` (linked to the model by the CLI),
``batch_size`` and ``num_workers``, and uses the standard augmentations of its dataset.
``input_space`` says how its normalized images relate to pixels in ``[0, 1]`` (per-channel mean
and std), which adversarial attacks need to bound perturbations in pixel units.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .adversarial import InputSpace

__all__ = ["CIFAR10", "CIFAR100", "Digits", "ImageDataModule", "ImageFolder", "SyntheticImages"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDataModule(pl.LightningDataModule):
    """Base of the datamodules: ``num_classes``, ``batch_size``, ``num_workers`` and loaders."""

    num_classes: int = 0
    #: Pixels in [0, 1] -> model inputs ``(p - mean) / std`` (``None``: unknown).
    input_space: InputSpace | None = None

    def __init__(
        self, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False
    ) -> None:
        super().__init__()
        # batch_size=1 (online learning) needs a normalizer without batch statistics
        # (StreamingNorm): ImageClassifier checks its layers at the first such batch.
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"{type(self).__name__}: batch_size must be a positive integer, got {batch_size!r}"
            )
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        #: A held-out test split, where the data has one; ``None``: ``test`` evaluates the
        #: validation split (and says so).
        self.test_set: Dataset | None = None

    #: ``{class: noisy class}`` of asymmetric label noise for this dataset (None: none known).
    asymmetric_map: ClassVar[dict[int, int] | None] = None
    #: After ``setup`` with ``label_noise``: the training samples' clean and noisy labels.
    clean_labels: torch.Tensor | None = None
    noisy_labels: torch.Tensor | None = None
    #: Where ``setup`` wrote the noisy labels (``noisy_labels.csv`` in the run's log dir).
    noisy_labels_path: Path | None = None

    def _check_label_noise(self, label_noise: dict[str, Any] | None) -> dict[str, Any] | None:
        """Validate ``label_noise``: ``{rate, mode, seed, mapping}`` (see :mod:`lightning_whiten.
        noise`); returns it with defaults filled in."""
        if not label_noise:
            return None
        from .noise import NOISE_MODES

        name = type(self).__name__
        unknown = sorted(set(label_noise) - {"rate", "mode", "seed", "mapping"})
        if unknown:
            raise ValueError(
                f"{name}: label_noise takes rate, mode, seed and mapping, got {unknown}"
            )
        noise = {"mode": "symmetric", "seed": 0, "mapping": None, **label_noise}
        if "rate" not in label_noise or not 0 <= noise["rate"] <= 1:
            raise ValueError(
                f"{name}: label_noise.rate must be in [0, 1], got {noise.get('rate')!r}"
            )
        if noise["mode"] not in NOISE_MODES:
            raise ValueError(
                f"{name}: label_noise.mode must be one of {NOISE_MODES}, got {noise['mode']!r}"
            )
        if noise["mode"] == "asymmetric":
            mapping = noise["mapping"] or self.asymmetric_map
            if not mapping:
                raise ValueError(
                    f"{name}: asymmetric label noise needs label_noise.mapping ({{class: noisy "
                    "class}}): this dataset has no standard one"
                )
            noise["mapping"] = {int(k): int(v) for k, v in mapping.items()}
        return noise

    def _noisy(self, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The training labels with ``self.label_noise`` applied (fixed by its seed), saved to
        ``noisy_labels.csv`` in the trainer's log dir (its ``default_root_dir`` without a
        logger) when a trainer runs this datamodule."""
        noise = getattr(self, "label_noise", None)
        if not noise:
            return labels
        from .noise import corrupt_labels, save_noisy_labels

        noisy = corrupt_labels(labels, self.num_classes, noise["rate"], noise["mode"],
                               noise["seed"], noise["mapping"])  # fmt: skip
        self.clean_labels, self.noisy_labels = labels.clone(), noisy
        trainer = getattr(self, "trainer", None)  # set by the Trainer that runs setup()
        if trainer is not None and trainer.is_global_zero:
            folder = trainer.log_dir or trainer.default_root_dir
            self.noisy_labels_path = save_noisy_labels(
                Path(folder) / "noisy_labels.csv", indices, labels, noisy
            )
        return noisy

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() first")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.batch_size,  # no 1-sample last batch
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is not None:
            return self._loader(self.test_set, train=False)
        rank_zero_warn(
            f"{type(self).__name__} has no separate test split: `test` evaluates the validation "
            "split (its test/ metrics are the val/ metrics)"
        )
        return self._loader(self.val_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)


class _Augmented(Dataset):
    """A tensor dataset with a per-sample augmentation (random shift and flip) on the fly."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, pad: int = 0, flip: bool = False
    ) -> None:
        self.images, self.labels, self.pad, self.flip = images, labels, pad, flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.pad:
            h, w = image.shape[-2:]
            padded = torch.nn.functional.pad(image, (self.pad,) * 4)
            i, j = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            image = padded[:, i : i + h, j : j + w]
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, self.labels[index]


class Digits(ImageDataModule):
    """scikit-learn's bundled handwritten digits (1797 images, offline), as small RGB images.

    The 8x8 grayscale images are resized to ``image_size`` (bilinear) and repeated over 3
    channels; a stratified split holds out ``val_fraction``. Training augmentation: random
    shifts of up to ``image_size // 8`` pixels (no flips: digits are not symmetric).

    ``label_noise`` (e.g. ``{rate: 0.4, mode: symmetric, seed: 0}``, :mod:`lightning_whiten.
    noise`) corrupts the training labels only; validation labels stay clean. Asymmetric noise
    uses Patrini et al.'s MNIST flips (2 -> 7, 3 -> 8, 5 <-> 6, 7 -> 1).
    """

    num_classes = 10
    asymmetric_map: ClassVar[dict[int, int]] = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}  # Patrini et al.

    def __init__(self, image_size: int = 32, val_fraction: float = 0.2, augment: bool = True,
                 seed: int = 0, batch_size: int = 64, num_workers: int = 0,
                 pin_memory: bool = False,
                 label_noise: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(batch_size, num_workers, pin_memory)
        self.label_noise = self._check_label_noise(label_noise)
        if not 0 < val_fraction < 1:
            raise ValueError(f"Digits: val_fraction must be in (0, 1), got {val_fraction}")
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.augment = augment
        self.seed = seed
        self._input_space: InputSpace | None = None

    @property
    def input_space(self) -> InputSpace:  # type: ignore[override]
        if self._input_space is None:  # loads the digits: only when an attack asks
            self._input_space = self.pixel_space(self.image_size)
        return self._input_space

    @staticmethod
    def tensors(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """All 1797 digits as ``(N, 3, image_size, image_size)`` normalized images and labels."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = Digits._pixels(digits.images, image_size)
        images = (images - images.mean()) / images.std()
        return images.repeat(1, 3, 1, 1).contiguous(), torch.tensor(digits.target, dtype=torch.long)

    @staticmethod
    def _pixels(raw, image_size: int) -> torch.Tensor:
        images = torch.tensor(raw, dtype=torch.float32).unsqueeze(1) / 16.0
        return torch.nn.functional.interpolate(
            images, size=image_size, mode="bilinear", align_corners=False
        )

    @staticmethod
    def pixel_space(image_size: int = 32) -> InputSpace:
        """The normalization of :meth:`tensors`: one mean and std over all pixels in [0, 1]."""
        from sklearn.datasets import load_digits

        images = Digits._pixels(load_digits().images, image_size)
        mean, std = images.mean().item(), images.std().item()
        return InputSpace((mean,) * 3, (std,) * 3)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self.tensors(self.image_size)
        gen = torch.Generator().manual_seed(self.seed)
        train_idx, val_idx = [], []
        for c in range(self.num_classes):  # stratified split
            idx = (labels == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            n_val = round(len(idx) * self.val_fraction)
            val_idx.append(idx[:n_val])
            train_idx.append(idx[n_val:])
        tr, va = torch.cat(train_idx), torch.cat(val_idx)
        pad = self.image_size // 8 if self.augment else 0
        self.train_set = _Augmented(images[tr], self._noisy(labels[tr], tr), pad=pad)
        self.val_set = TensorDataset(images[va], labels[va])


class SyntheticImages(ImageDataModule):
    """Made-up images for smoke tests: each class is a fixed random pattern plus noise.

    They are not images in [0, 1]: ``input_space`` is unbounded (attack epsilons in input units).
    """

    input_space = InputSpace.unbounded()

    def __init__(self, num_classes: int = 10, image_size: int = 32, num_train: int = 512,
                 num_val: int = 128, noise: float = 1.0, seed: int = 0, batch_size: int = 64,
                 num_workers: int = 0, pin_memory: bool = False) -> None:  # fmt: skip
        super().__init__(batch_size, num_workers, pin_memory)
        self.num_classes = num_classes
        self.image_size = image_size
        self.num_train, self.num_val, self.noise, self.seed = num_train, num_val, noise, seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        gen = torch.Generator().manual_seed(self.seed)
        size = self.image_size
        prototypes = torch.randn(self.num_classes, 3, size, size, generator=gen)

        def make(n: int) -> TensorDataset:
            labels = torch.randint(0, self.num_classes, (n,), generator=gen)
            images = prototypes[labels] + self.noise * torch.randn(n, 3, size, size, generator=gen)
            return TensorDataset(images, labels)

        self.train_set, self.val_set = make(self.num_train), make(self.num_val)


class _CIFAR(ImageDataModule):
    image_size = 32
    _mean: tuple[float, ...] = ()
    _std: tuple[float, ...] = ()
    _torchvision_name = ""  # the torchvision.datasets class

    def __init__(self, data_dir: str = "data", download: bool = True, batch_size: int = 128,
                 num_workers: int = 4, pin_memory: bool = False,
                 autoaugment: bool = False,
                 label_noise: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(batch_size, num_workers, pin_memory)
        self.label_noise = self._check_label_noise(label_noise)
        self.data_dir = data_dir
        self.download = download
        self.autoaugment = autoaugment
        self.input_space = InputSpace(self._mean, self._std)

    def _dataset(self, train: bool, transform: Any = None):
        import torchvision.datasets

        cls = getattr(torchvision.datasets, self._torchvision_name)
        try:
            return cls(self.data_dir, train=train, transform=transform, download=self.download)
        except (RuntimeError, OSError) as err:
            name = type(self).__name__
            raise RuntimeError(
                f"{name}: the dataset is not in {os.path.abspath(self.data_dir)!r} and could not be "
                f"downloaded ({err.__class__.__name__}: {err}). Without network access, put the "
                f"torchvision {name} files there (e.g. copied from another machine), or use the "
                "ImageFolder or Digits datamodules."
            ) from err

    def prepare_data(self) -> None:
        for train in (True, False):
            self._dataset(train, transform=None)

    def setup(self, stage: str | None = None) -> None:
        import torchvision.transforms as T

        val = T.Compose([T.ToTensor(), T.Normalize(self._mean, self._std)])
        self.train_set = self._dataset(True, transform=self.train_transform())
        if self.label_noise:
            clean = torch.as_tensor(self.train_set.targets, dtype=torch.long)
            noisy = self._noisy(clean, torch.arange(clean.numel()))
            self.train_set.targets = noisy.tolist()
        # CIFAR has no validation split: the test set serves as both (the papers' practice)
        self.val_set = self.test_set = self._dataset(False, transform=val)

    def train_transform(self):
        """Random crop 32 with 4 pixels of padding, horizontal flip, then (``autoaugment``)
        AutoAugment's CIFAR-10 policy, on PIL images; then to a normalized tensor."""
        import torchvision.transforms as T

        ops: list[Any] = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        if self.autoaugment:
            ops.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10))
        return T.Compose([*ops, T.ToTensor(), T.Normalize(self._mean, self._std)])


class CIFAR10(_CIFAR):
    """CIFAR-10 from torchvision (downloaded into ``data_dir`` when the network allows).

    Augmentation: random crop 32 with 4 pixels of padding and horizontal flips (the standard
    CIFAR setup of the IterNorm and SWBN papers); ``autoaugment=True`` adds AutoAugment's CIFAR-10
    policy after them (torchvision's ``AutoAugment``; the SAM-ON authors' command line uses the
    same policy, for CIFAR-100 too).

    ``label_noise`` (``{rate, mode, seed}``, :mod:`lightning_whiten.noise`) corrupts the training
    labels; asymmetric noise uses the ConvNorm authors' flips (truck -> automobile, bird ->
    airplane, cat <-> dog, deer -> horse). CIFAR-100 has no built-in asymmetric map (give
    ``mapping``).
    """

    num_classes = 10
    asymmetric_map: ClassVar[dict[int, int]] = {9: 1, 2: 0, 3: 5, 5: 3, 4: 7}  # the authors'
    _mean = (0.4914, 0.4822, 0.4465)
    _std = (0.2470, 0.2435, 0.2616)
    _torchvision_name = "CIFAR10"


class CIFAR100(_CIFAR):
    """CIFAR-100 from torchvision; as :class:`CIFAR10`."""

    num_classes = 100
    _mean = (0.5071, 0.4865, 0.4409)
    _std = (0.2673, 0.2564, 0.2762)
    _torchvision_name = "CIFAR100"


_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _classes_without_images(folder: Path) -> list[str]:
    """The class subfolders of ``folder`` in which torchvision's ImageFolder would find no
    image (it searches them recursively), stopping at each folder's first image."""

    def has_image(path: Path) -> bool:
        for _, _, files in os.walk(path, followlinks=True):
            if any(f.lower().endswith(_IMAGE_EXTENSIONS) for f in files):
                return True
        return False

    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not has_image(p))


class ImageFolder(ImageDataModule):
    """ImageNet-style folders: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``
    (and, with ``test_dir``, a labelled test split ``root/<test_dir>/<class>/*.jpg`` that
    ``test`` evaluates; without it ``test`` evaluates ``val``).

    Training: random resized crop to ``image_size`` and horizontal flips; validation: resize to
    ``image_size / 0.875`` and center crop (the standard ImageNet evaluation).
    """

    def __init__(self, root: str, image_size: int = 224, train_dir: str = "train", val_dir: str = "val",
                 batch_size: int = 64, num_workers: int = 4, pin_memory: bool = False,
                 test_dir: str | None = None) -> None:  # fmt: skip
        super().__init__(batch_size, num_workers, pin_memory)
        self.input_space = InputSpace(IMAGENET_MEAN, IMAGENET_STD)
        self.root = Path(root)
        self.image_size = image_size
        self.train_dir, self.val_dir, self.test_dir = train_dir, val_dir, test_dir
        splits = (train_dir, val_dir) if test_dir is None else (train_dir, val_dir, test_dir)
        for sub in splits:
            if not (self.root / sub).is_dir():
                raise FileNotFoundError(
                    f"ImageFolder: expected a folder {self.root / sub} with one subfolder per class"
                )
        self.num_classes = len([p for p in (self.root / train_dir).iterdir() if p.is_dir()])
        if self.num_classes == 0:
            raise FileNotFoundError(f"ImageFolder: {self.root / train_dir} has no class subfolders")
        for sub in splits:
            empty = _classes_without_images(self.root / sub)
            if empty:
                shown = ", ".join(empty[:3]) + (
                    f" and {len(empty) - 3} more" if len(empty) > 3 else ""
                )
                raise FileNotFoundError(
                    f"ImageFolder: {len(empty)} class folder(s) of {self.root / sub} hold no "
                    f"image ({shown}); images end in {', '.join(_IMAGE_EXTENSIONS)}"
                )

    def setup(self, stage: str | None = None) -> None:
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder as TVImageFolder

        normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        size = self.image_size
        train = T.Compose(
            [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
        )
        val = T.Compose(
            [T.Resize(round(size / 0.875)), T.CenterCrop(size), T.ToTensor(), normalize]
        )
        self.train_set = TVImageFolder(self.root / self.train_dir, transform=train)
        self.val_set = TVImageFolder(self.root / self.val_dir, transform=val)
        if self.val_set.classes != self.train_set.classes:
            raise ValueError("ImageFolder: train and val have different class folders")
        if self.test_dir is not None:
            self.test_set = TVImageFolder(self.root / self.test_dir, transform=val)
            if self.test_set.classes != self.train_set.classes:
                raise ValueError(
                    f"ImageFolder: train and {self.test_dir} have different class folders"
                )
