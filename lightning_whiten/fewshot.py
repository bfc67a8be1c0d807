"""Few-shot classification: episodic N-way K-shot data and Prototypical Networks.

* :class:`EpisodeSampler` -- a seeded batch sampler: each batch is one episode of ``n_way``
  classes drawn from a class pool, ``k_shot`` support and ``n_query`` query samples per class.
* :class:`FewShotDigits` -- offline episodes from scikit-learn's bundled digits, with disjoint
  training and evaluation classes (digits 0-5 / 6-9 by default).
* :class:`FewShotImageFolder` -- episodes from ``root/train``, ``root/val``, ``root/test`` with
  one folder per class (miniImageNet in the Ravi & Larochelle split, Omniglot, ...).
* :class:`ProtoNet` -- Prototypical Networks (Snell et al., NeurIPS 2017) on a Conv-4 backbone
  whose BatchNorms the :class:`~lightning_whiten.WhiteningCallback` converts; accuracy with a 95%
  confidence interval over the evaluation episodes.

An episode batch is a dict: ``support`` ``(N*K, C, H, W)``, ``support_labels`` ``(N*K,)`` in
``0..N-1``, ``query`` ``(N*Q, C, H, W)``, ``query_labels`` ``(N*Q,)`` and ``classes`` ``(N,)``
(the dataset's class of each episode label), class-major (class 0's samples first).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

__all__ = [
    "EpisodeSampler",
    "FewShotDataModule",
    "FewShotDigits",
    "FewShotImageFolder",
    "ProtoNet",
    "conv4",
    "mean_confidence_interval",
]


class EpisodeSampler(Sampler[list[int]]):
    """Yields episodes: lists of dataset indices, ``n_way * k_shot`` support indices (class by
    class) followed by ``n_way * n_query`` query indices (class by class).

    Each episode draws ``n_way`` distinct classes from ``classes`` and, per class,
    ``k_shot + n_query`` distinct samples without replacement. The episodes depend only on
    ``seed`` and the number of completed passes: with ``reshuffle=False`` (evaluation) every pass
    yields the same episodes; with ``reshuffle=True`` (training) pass ``e`` uses seed
    ``seed + e``, so runs repeat exactly.

    Args:
        labels: ``(num_samples,)`` class of every sample of the dataset.
        classes: the class pool episodes draw from (e.g. the training classes).
        n_way, k_shot, n_query: classes per episode, support and query samples per class.
        episodes: episodes per pass (per epoch).
        seed: the random seed.
        reshuffle: draw new episodes at each pass.
    """

    def __init__(self, labels: Tensor | Sequence[int], classes: Sequence[int], n_way: int,
                 k_shot: int, n_query: int, episodes: int, seed: int = 0,
                 reshuffle: bool = True) -> None:  # fmt: skip
        labels = torch.as_tensor(labels, dtype=torch.long)
        classes = sorted(int(c) for c in classes)
        for name, value, low in (("n_way", n_way, 2), ("k_shot", k_shot, 1),
                                 ("n_query", n_query, 1), ("episodes", episodes, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"EpisodeSampler: {name} must be an integer >= {low}, got {value!r}"
                )
        if n_way > len(classes):
            raise ValueError(
                f"EpisodeSampler: n_way={n_way} but the class pool has only {len(classes)} "
                f"classes ({classes})"
            )
        self.by_class = {c: (labels == c).nonzero().flatten() for c in classes}
        short = {c: len(i) for c, i in self.by_class.items() if len(i) < k_shot + n_query}
        if short:
            raise ValueError(
                f"EpisodeSampler: k_shot + n_query = {k_shot + n_query} samples per class, but "
                f"classes {sorted(short)} have only {sorted(short.values())}"
            )
        self.classes = classes
        self.n_way, self.k_shot, self.n_query, self.episodes = n_way, k_shot, n_query, episodes
        self.seed, self.reshuffle = seed, reshuffle
        self.passes = 0

    def __len__(self) -> int:
        return self.episodes

    def __iter__(self) -> Iterator[list[int]]:
        seed = self.seed + (self.passes if self.reshuffle else 0)
        self.passes += 1
        gen = torch.Generator().manual_seed(seed)
        k = self.k_shot
        for _ in range(self.episodes):
            chosen = torch.randperm(len(self.classes), generator=gen)[: self.n_way]
            support, query = [], []
            for c in chosen.tolist():
                pool = self.by_class[self.classes[c]]
                picked = pool[torch.randperm(len(pool), generator=gen)[: k + self.n_query]]
                support += picked[:k].tolist()
                query += picked[k:].tolist()
            yield support + query


class _EpisodeCollate:
    """Stacks an episode's samples and relabels its classes ``0..n_way-1`` (picklable, for
    worker processes)."""

    def __init__(self, n_way: int, k_shot: int, n_query: int) -> None:
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query

    def __call__(self, samples: list[tuple[Tensor, Any]]) -> dict[str, Tensor]:
        images = torch.stack([s[0] for s in samples])
        labels = torch.as_tensor([int(s[1]) for s in samples])
        n, k = self.n_way, self.k_shot
        if images.shape[0] != n * (k + self.n_query):
            raise ValueError(
                f"episode of {images.shape[0]} samples, expected n_way * (k_shot + n_query) = "
                f"{n * (k + self.n_query)}"
            )
        return {
            "support": images[: n * k],
            "support_labels": torch.arange(n).repeat_interleave(k),
            "query": images[n * k :],
            "query_labels": torch.arange(n).repeat_interleave(self.n_query),
            "classes": labels[: n * k : k],
        }


class FewShotDataModule(pl.LightningDataModule):
    """Base of the episodic datamodules: subclasses set ``train_set``, ``val_set``,
    ``test_set`` (datasets of ``(image, class)``), their ``*_labels`` and ``*_classes``.

    Args:
        n_way, k_shot, n_query: episode shape (training and evaluation).
        train_n_way, train_k_shot: training episodes with other shapes (Snell et al. train
            with more ways than they test with); ``None``: ``n_way`` / ``k_shot``.
        episodes_per_epoch: training episodes per epoch.
        val_episodes, test_episodes: evaluation episodes (fixed by ``seed``: every validation
            sees the same episodes).
        seed: seed of the episodes (training pass ``e`` uses ``seed + e``).
        num_workers: data loader workers.
    """

    #: Linked by the CLI to the model's ``num_classes``: the training classes.
    num_classes: int = 0

    def __init__(self, n_way: int = 5, k_shot: int = 1, n_query: int = 15,
                 train_n_way: int | None = None, train_k_shot: int | None = None,
                 episodes_per_epoch: int = 100, val_episodes: int = 100,
                 test_episodes: int = 600, seed: int = 0, num_workers: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        self.train_n_way = train_n_way or n_way
        self.train_k_shot = train_k_shot or k_shot
        self.episodes_per_epoch = episodes_per_epoch
        self.val_episodes, self.test_episodes = val_episodes, test_episodes
        self.seed, self.num_workers = seed, num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.train_labels = self.val_labels = self.test_labels = torch.empty(0, dtype=torch.long)
        self.train_classes: list[int] = []
        self.val_classes: list[int] = []
        self.test_classes: list[int] = []

    def sampler(self, stage: str) -> EpisodeSampler:
        """The episode sampler of ``"train"``, ``"val"`` or ``"test"``."""
        train = stage == "train"
        n = self.train_n_way if train else self.n_way
        k = self.train_k_shot if train else self.k_shot
        episodes = {"train": self.episodes_per_epoch, "val": self.val_episodes,
                    "test": self.test_episodes}[stage]  # fmt: skip
        # different seeds per split: validation and test episodes are not training episodes
        offset = {"train": 0, "val": 1_000_003, "test": 2_000_003}[stage]
        return EpisodeSampler(getattr(self, f"{stage}_labels"), getattr(self, f"{stage}_classes"),
                              n, k, self.n_query, episodes, self.seed + offset,
                              reshuffle=train)  # fmt: skip

    def _loader(self, stage: str) -> DataLoader:
        dataset = getattr(self, f"{stage}_set")
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() first")
        sampler = self.sampler(stage)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers,
                          collate_fn=_EpisodeCollate(sampler.n_way, sampler.k_shot, self.n_query),
                          persistent_workers=self.num_workers > 0)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class FewShotDigits(FewShotDataModule):
    """Episodes from scikit-learn's bundled digits (offline), with disjoint class pools.

    Training episodes draw from ``train_classes``; validation and test episodes from the other
    digits (the same pool: the digits have too few classes for three splits; the test episodes
    differ from the validation ones). Images: ``image_size`` pixels, 3 channels, normalized as
    :class:`lightning_whiten.data.Digits`.
    """

    def __init__(self, train_classes: Sequence[int] = (0, 1, 2, 3, 4, 5), image_size: int = 16,
                 n_way: int = 4, k_shot: int = 1, n_query: int = 15,
                 train_n_way: int | None = None, train_k_shot: int | None = None,
                 episodes_per_epoch: int = 100, val_episodes: int = 100,
                 test_episodes: int = 600, seed: int = 0, num_workers: int = 0) -> None:  # fmt: skip
        super().__init__(n_way, k_shot, n_query, train_n_way, train_k_shot, episodes_per_epoch,
                         val_episodes, test_episodes, seed, num_workers)  # fmt: skip
        train = sorted(set(int(c) for c in train_classes))
        if not train or any(not 0 <= c <= 9 for c in train) or len(train) > 8:
            raise ValueError(
                "FewShotDigits: train_classes must be 1 to 8 distinct digits in 0..9 (the rest "
                f"are the evaluation classes), got {list(train_classes)}"
            )
        self.train_classes = train
        self.val_classes = self.test_classes = [c for c in range(10) if c not in train]
        self.num_classes = len(train)
        self.image_size = image_size

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from .data import Digits

        images, labels = Digits.tensors(self.image_size)
        train = torch.isin(labels, torch.tensor(self.train_classes))
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = self.test_set = TensorDataset(images[~train], labels[~train])
        self.train_labels, self.val_labels = labels[train], labels[~train]
        self.test_labels = self.val_labels


class _Targets(Dataset):
    """A torchvision ImageFolder whose labels are readable without loading images."""

    def __init__(self, root: Path, transform: Any) -> None:
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(root, transform=transform)
        self.labels = torch.tensor(self.folder.targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        return self.folder[index]


class FewShotImageFolder(FewShotDataModule):
    """Episodes from ``root/<split>/<class>/*`` folders (``split``: ``train``, ``val``,
    ``test``), e.g. miniImageNet in the Ravi & Larochelle split (64 / 16 / 20 classes) or
    Omniglot. Each split's classes are its own folders: the splits must not share a class name.

    Images are resized to ``image_size`` (84 for miniImageNet), ImageNet-normalized; training
    adds horizontal flips when ``flip`` is set (Snell et al. use no augmentation).
    """

    def __init__(self, root: str, image_size: int = 84, flip: bool = False, n_way: int = 5,
                 k_shot: int = 1, n_query: int = 15, train_n_way: int | None = None,
                 train_k_shot: int | None = None, episodes_per_epoch: int = 100,
                 val_episodes: int = 100, test_episodes: int = 600, seed: int = 0,
                 num_workers: int = 4, train_dir: str = "train", val_dir: str = "val",
                 test_dir: str = "test") -> None:  # fmt: skip
        super().__init__(n_way, k_shot, n_query, train_n_way, train_k_shot, episodes_per_epoch,
                         val_episodes, test_episodes, seed, num_workers)  # fmt: skip
        self.root, self.image_size, self.flip = Path(root), image_size, flip
        self.dirs = {"train": train_dir, "val": val_dir, "test": test_dir}
        names: dict[str, set[str]] = {}
        for split, sub in self.dirs.items():
            folder = self.root / sub
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"FewShotImageFolder: expected a folder {folder} with one subfolder per class"
                )
            names[split] = {p.name for p in folder.iterdir() if p.is_dir()}
        shared = (names["train"] & (names["val"] | names["test"])) | (names["val"] & names["test"])
        if shared:
            raise ValueError(
                f"FewShotImageFolder: few-shot splits must have disjoint classes; shared: "
                f"{sorted(shared)[:5]}"
            )
        self.num_classes = len(names["train"])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        import torchvision.transforms as T

        from .data import IMAGENET_MEAN, IMAGENET_STD

        base = [T.Resize((self.image_size, self.image_size)), T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]  # fmt: skip
        train_ops = ([T.RandomHorizontalFlip()] if self.flip else []) + base
        for split, sub in self.dirs.items():
            dataset = _Targets(self.root / sub, T.Compose(train_ops if split == "train" else base))
            setattr(self, f"{split}_set", dataset)
            setattr(self, f"{split}_labels", dataset.labels)
            setattr(self, f"{split}_classes", sorted(set(dataset.labels.tolist())))


def conv4(in_channels: int = 3, hidden: int = 64, depth: int = 4) -> nn.Sequential:
    """The Conv-4 embedding of Vinyals et al. / Snell et al.: ``depth`` blocks of 3x3
    convolution (``hidden`` channels), BatchNorm, ReLU, 2x2 max-pooling; flattened output
    (1600 values for 84x84 inputs, 64 for 16x16)."""
    layers: list[nn.Module] = []
    width = in_channels
    for _ in range(depth):
        layers += [nn.Conv2d(width, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
                   nn.MaxPool2d(2)]  # fmt: skip
        width = hidden
    return nn.Sequential(*layers, nn.Flatten())


def mean_confidence_interval(values: Tensor, z: float = 1.96) -> tuple[float, float]:
    """Mean of ``values`` ``(n,)`` and the half-width of its normal-approximation confidence
    interval, ``z * std / sqrt(n)`` (``z = 1.96``: 95%; ``std`` with Bessel's correction), the
    few-shot literature's "accuracy +- 95% CI over test episodes"."""
    values = values.double().flatten()
    if values.numel() < 2:
        return float(values.mean()) if values.numel() else math.nan, math.nan
    return float(values.mean()), float(z * values.std() / math.sqrt(values.numel()))


class ProtoNet(pl.LightningModule):
    """Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

    The support and query images of an episode go through the embedding ``f`` in one batch;
    a class prototype is the mean embedding of its support samples, ``p_c = mean_k f(x_ck)``,
    and a query ``q`` is classified by ``softmax_c(-||f(q) - p_c||^2)`` (squared Euclidean
    distance), trained with cross-entropy on the queries.

    Normalization: the backbone is Conv-4 with BatchNorm; a
    :class:`~lightning_whiten.WhiteningCallback` converts its BNs (SWBN, IterNorm, ...). In
    training, normalization layers use the episode's batch statistics (support and query
    together); evaluation uses their running statistics (not transductive: a test query never
    changes another query's embedding).

    Logs ``train/loss``, ``train/acc``, and at the end of each evaluation ``val/acc`` (mean
    query accuracy over the episodes) and ``val/acc_ci95`` (the half-width of its 95% confidence
    interval; ``test/...`` in test).

    Args:
        num_classes: the number of training classes (linked by the CLI; unused by the model).
        in_channels, hidden, depth: the Conv-4 backbone.
        lr: Adam learning rate.
        lr_step_episodes, gamma: the learning rate times ``gamma`` every ``lr_step_episodes``
            training episodes (Snell et al.: halved every 2000 episodes).
        weight_decay: Adam weight decay.
    """

    def __init__(self, num_classes: int = 0, in_channels: int = 3, hidden: int = 64,
                 depth: int = 4, lr: float = 1e-3, lr_step_episodes: int = 2000,
                 gamma: float = 0.5, weight_decay: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        if not lr > 0:
            raise ValueError(f"ProtoNet: lr must be > 0, got {lr!r}")
        if lr_step_episodes < 1:
            raise ValueError(f"ProtoNet: lr_step_episodes must be >= 1, got {lr_step_episodes!r}")
        self.net = conv4(in_channels, hidden, depth)
        self._episode_acc: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings ``(B, D)`` of images ``(B, C, H, W)``."""
        return self.net(x)

    def recalibration_step(self, batch: dict[str, Tensor]) -> Tensor:
        """What :func:`lightning_whiten.recalibrate` runs per episode (``WhiteningCallback``'s
        ``recalibrate_batches``): support and query images through the embedding in one
        batch, as in training."""
        return self(torch.cat([batch["support"], batch["query"]]))

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        """``-||f(q) - p_c||^2``: ``(N*Q, N)`` logits of an episode's queries."""
        support, query = batch["support"], batch["query"]
        n = int(batch["support_labels"].max()) + 1
        embedded = self(torch.cat([support, query]))
        s, q = embedded[: support.shape[0]], embedded[support.shape[0] :]
        # one_hot^T s / counts: the class means without assuming the samples' order
        onehot = nn.functional.one_hot(batch["support_labels"], n).to(s.dtype)
        prototypes = (onehot.T @ s) / onehot.sum(0)[:, None]
        return -torch.cdist(q.float(), prototypes.float()).pow(2)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.logits(batch)
        loss = nn.functional.cross_entropy(logits, batch["query_labels"])
        acc = (logits.argmax(-1) == batch["query_labels"]).float().mean()
        size = batch["query_labels"].numel()
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def _evaluate(self, batch: dict[str, Tensor]) -> None:
        logits = self.logits(batch)
        self._episode_acc.append((logits.argmax(-1) == batch["query_labels"]).float().mean())

    def _log_episodes(self, stage: str) -> None:
        if not self._episode_acc:
            return
        accs = torch.stack(self._episode_acc)
        self._episode_acc = []
        mean, ci = mean_confidence_interval(accs.cpu())
        self.log(f"{stage}/acc", mean, prog_bar=True)
        self.log(f"{stage}/acc_ci95", ci)
        self.log(f"{stage}/episodes", float(accs.numel()))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_episodes("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch)

    def on_test_epoch_end(self) -> None:
        self._log_episodes("test")

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.Adam(self.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, h.lr_step_episodes, h.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
