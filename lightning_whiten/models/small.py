"""Small networks for online (batch size 1) and recurrent training on Digits.

* :class:`MLP` -- a multilayer perceptron on the flattened image, a normalization layer after
  every hidden linear layer.
* :class:`RowRNN` -- an Elman RNN that reads an image row by row (a sequence of ``H`` rows of
  ``W`` pixels) with the normalization *inside the recurrence*: one layer, shared by every time
  step, ``h_t = tanh(norm(W_x x_t + W_h h_(t-1) + b))``.

Both take ``norm`` (``"streaming"``, ``"layernorm"``, ``"batchnorm"``, ``"lpnorm"``, ``"none"``)
and ``norm_options``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .norms import NormName, make_norm
from .recurrent import ConvGRU

__all__ = ["MLP", "SMALL_MODELS", "RowRNN"]


class MLP(nn.Module):
    """``depth`` hidden layers of ``Linear -> norm -> ReLU`` on the flattened input, then a
    linear classifier.

    Args:
        num_classes: outputs.
        in_features: ``C * H * W`` of the input images (192 for Digits at 8 x 8).
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        norm, norm_options: the normalization layer (:func:`make_norm`).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_features: int = 192,
        hidden: int = 128,
        depth: int = 2,
        norm: NormName = "streaming",
        norm_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), make_norm(norm, hidden, 0, **(norm_options or {}))]
            layers.append(nn.ReLU())
            width = hidden
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)
        self.in_features = in_features

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"MLP: expected inputs with {self.in_features} values (in_features), got "
                f"{x.shape[1]}; set backbone_options.in_features to C * H * W of the images"
            )
        return self.classifier(self.features(x))


class RowRNN(nn.Module):
    """An Elman RNN over the rows of a (grayscale) image, with the normalization inside the
    recurrence and a linear classifier on the last hidden state.

    An image ``(N, C, H, W)`` is averaged over channels and read as ``H`` time steps of ``W``
    inputs: ``h_t = tanh(norm(W_x x_t + W_h h_(t-1) + b))``, ``h_0 = 0``. The same ``norm``
    module serves every time step (a :class:`StreamingNorm` accumulates its short-term
    statistics over the steps of a sequence and updates them once per weight update).

    Args:
        num_classes: outputs.
        input_size: ``W``, pixels per row.
        hidden: size of the hidden state.
        norm, norm_options: the normalization layer (:func:`make_norm`), applied to the summed
            input of the tanh at every step.
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_size: int = 16,
        hidden: int = 128,
        norm: NormName = "streaming",
        norm_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.input = nn.Linear(input_size, hidden)
        self.recurrent = nn.Linear(hidden, hidden, bias=False)
        nn.init.orthogonal_(self.recurrent.weight)
        self.norm = make_norm(norm, hidden, 0, **(norm_options or {}))
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.mean(1) if x.dim() == 4 else x  # (N, H, W)
        if rows.dim() != 3 or rows.shape[-1] != self.input_size:
            raise ValueError(
                f"RowRNN: expected images (N, C, H, {self.input_size}) or sequences "
                f"(N, T, {self.input_size}) (input_size={self.input_size}), got {tuple(x.shape)}"
            )
        inputs = self.input(rows)  # all steps' input projections at once
        h = torch.zeros(rows.shape[0], self.recurrent.out_features, dtype=inputs.dtype,
                        device=inputs.device)  # fmt: skip
        for t in range(rows.shape[1]):
            h = torch.tanh(self.norm(inputs[:, t] + self.recurrent(h)))
        return self.classifier(h)


#: ``"small/<name>"`` backbones of :class:`lightning_whiten.ImageClassifier`.
SMALL_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "row_rnn": RowRNN,
    "conv_gru": ConvGRU,
}
