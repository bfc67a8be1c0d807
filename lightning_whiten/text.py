"""Character-level language modelling: a text-file datamodule and the ``CharLM`` LightningModule.

The streaming-normalization paper (Liao, Kawaguchi & Poggio 2016) evaluates normalization
inside the recurrence of character-level language models. :class:`TextFile` reads any UTF-8
text file (offline default: the source of a module of Python's standard library), and
:class:`CharLM` trains :class:`~lightning_whiten.models.recurrent.CharRNN` on it, reporting
bits per character.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from .models.norms import NormName
from .models.recurrent import CharRNN

__all__ = ["CharLM", "TextFile"]


def stdlib_source(module: str) -> Path:
    """The source file of a pure-Python standard-library module (``"difflib"``, ...)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    origin = getattr(spec, "origin", None)
    if spec is None or not origin or not origin.endswith(".py"):
        raise ValueError(f"TextFile: {module!r} is not a pure-Python standard-library module")
    return Path(origin)


class TextFile(pl.LightningDataModule):
    """Sequences of ``seq_len + 1`` characters from a text file: input = the first
    ``seq_len``, target = the last ``seq_len`` (the next character at every position).

    The text is cut into non-overlapping chunks; the last ``val_fraction`` of the text is the
    validation set (the split is contiguous: no chunk of the validation text is trained on).
    The vocabulary is the sorted set of the file's characters; ``num_classes`` is its size
    (the CLI links it to the model's).

    Args:
        path: a UTF-8 text file; ``None``: the source of the standard-library module
            ``stdlib_module`` (offline, ships with Python).
        stdlib_module: see ``path``.
        seq_len: characters per training sequence.
        val_fraction: the fraction of the text held out, at its end.
        batch_size, num_workers: loader settings.
    """

    def __init__(self, path: str | None = None, stdlib_module: str = "difflib",
                 seq_len: int = 64, val_fraction: float = 0.1, batch_size: int = 32,
                 num_workers: int = 0) -> None:  # fmt: skip
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"TextFile: val_fraction must be in (0, 1), got {val_fraction}")
        if seq_len < 2:
            raise ValueError(f"TextFile: seq_len must be >= 2, got {seq_len}")
        self.path = Path(path) if path is not None else stdlib_source(stdlib_module)
        if not self.path.is_file():
            raise FileNotFoundError(f"TextFile: {str(self.path)!r} is not a file")
        self.text = self.path.read_text(encoding="utf-8")
        self.vocab = sorted(set(self.text))
        self.num_classes = len(self.vocab)
        self.seq_len, self.val_fraction = seq_len, val_fraction
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        if len(self.text) * val_fraction < seq_len + 1:
            raise ValueError(
                f"TextFile: {self.path} has {len(self.text)} characters, too few for a "
                f"validation chunk of seq_len + 1 = {seq_len + 1} at val_fraction={val_fraction}"
            )

    def encode(self, text: str) -> Tensor:
        index = {c: i for i, c in enumerate(self.vocab)}
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.vocab[i] for i in ids.tolist())

    def _chunks(self, ids: Tensor) -> TensorDataset:
        n = (ids.numel() - 1) // self.seq_len
        inputs = ids[: n * self.seq_len].view(n, self.seq_len)
        targets = ids[1 : n * self.seq_len + 1].view(n, self.seq_len)
        return TensorDataset(inputs, targets)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        ids = self.encode(self.text)
        cut = int(ids.numel() * (1 - self.val_fraction))
        self.train_set, self.val_set = self._chunks(ids[:cut]), self._chunks(ids[cut:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          drop_last=True, num_workers=self.num_workers)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


class CharLM(pl.LightningModule):
    """A character-level language model: :class:`~lightning_whiten.models.recurrent.CharRNN`
    with ``norm`` (``"streaming"``, ``"layernorm"``, ``"none"``, ...) inside the recurrence.

    Logs ``train/loss`` and ``val/loss`` (cross-entropy per character, nats) and ``val/bpc``
    (bits per character, ``val/loss / ln 2``).

    Args:
        num_classes: the vocabulary size (linked by the CLI from :class:`TextFile`).
        embedding, hidden: sizes.
        norm, norm_options, norm_per_step, steps: the normalization inside the recurrence.
        optimizer: ``"adam"`` or ``"sgd"``; lr, weight_decay.
    """

    def __init__(self, num_classes: int = 128, embedding: int = 64, hidden: int = 256,
                 norm: NormName = "streaming", norm_options: dict[str, Any] | None = None,
                 norm_per_step: bool = False, steps: int = 64,
                 optimizer: Literal["adam", "sgd"] = "adam", lr: float = 2e-3,
                 weight_decay: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"CharLM: optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if not lr > 0:
            raise ValueError(f"CharLM: lr must be > 0, got {lr!r}")
        self.net = CharRNN(num_classes, embedding, hidden, norm, norm_options, norm_per_step, steps)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens)

    def recalibration_step(self, batch: Any) -> Tensor:
        """What :func:`lightning_whiten.recalibrate` runs per batch: the input tokens through
        the model (``WhiteningCallback``'s ``recalibrate_batches``)."""
        return self(batch[0])

    def _loss(self, batch: Any) -> Tensor:
        tokens, targets = batch
        logits = self(tokens)
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/bpc", loss / math.log(2), prog_bar=True)

    @torch.no_grad()
    def generate(self, prompt: Tensor, length: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
        """``length`` token ids sampled after ``prompt`` ``(T,)`` (re-reads the whole prefix at
        every step: simple, for short samples)."""
        ids = prompt.clone()
        for _ in range(length):
            logits = self(ids[None])[0, -1] / temperature
            nxt = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator)
            ids = torch.cat([ids, nxt.to(ids.device)])
        return ids[prompt.numel() :]

    def configure_optimizers(self):
        h = self.hparams
        if h.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        return torch.optim.SGD(
            self.parameters(), lr=h.lr, momentum=0.9, weight_decay=h.weight_decay
        )
