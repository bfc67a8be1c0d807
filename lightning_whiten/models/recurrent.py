"""Recurrent-convolutional networks with the normalization inside the recurrence.

* :class:`ConvGRU` -- a convolutional GRU that reads an image row by row: every row is a 1-D
  feature map ``(N, C, W)``, the hidden state a 1-D map ``(N, hidden, W)``, and the gates are
  1-D convolutions of both (the mixed recurrent + convolutional setting of Liao, Kawaguchi &
  Poggio 2016). ``"small/conv_gru"`` backbone of :class:`~lightning_whiten.ImageClassifier`.
* :class:`CharRNN` -- an Elman RNN over characters, ``h_t = tanh(norm(W_x e(c_t) + W_h h_(t-1)
  + b))``, predicting the next character at every step (:class:`~lightning_whiten.text.CharLM`).

Statistics across time steps, as the streaming-normalization paper defines them: with
``norm_per_step=False`` (default) ONE normalization layer serves every time step, so a
:class:`~lightning_whiten.StreamingNorm` averages its short-term statistics over the steps of
a sequence and folds them into its long-term ones once per weight update (the paper's recurrent
setting); ``norm_per_step=True`` gives every time step its own layer (separate statistics per
step, as recurrent BatchNorm, Cooijmans et al. 2017, needs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .norms import NormName, make_norm

__all__ = ["CharRNN", "ConvGRU"]


def _norms(norm: NormName, channels: int, spatial_dims: int, per_step: bool, steps: int,
           options: dict[str, Any] | None) -> nn.ModuleList:  # fmt: skip
    """One shared layer, or one per time step."""
    count = steps if per_step else 1
    if per_step and steps < 1:
        raise ValueError(f"norm_per_step needs steps >= 1, got {steps}")
    # spatial_dims=2 selects GroupNorm(1, C) for "layernorm" (it takes (N, C, W) too);
    # BatchNorm1d takes (N, C) and (N, C, W).
    dims = 2 if spatial_dims and norm == "layernorm" else 0
    return nn.ModuleList(make_norm(norm, channels, dims, **(options or {})) for _ in range(count))


class ConvGRU(nn.Module):
    """A convolutional GRU over the rows of an image, normalization inside the recurrence.

    An image ``(N, C, H, W)`` is read as ``H`` time steps of 1-D maps ``x_t`` ``(N, C, W)``;
    with ``*`` a 1-D convolution (``kernel_size``, same padding) and ``h_0 = 0``::

        [r_t, z_t] = sigmoid(norm_g(W_g * x_t + U_g * h_(t-1)))
        n_t        = tanh(norm_c(W_c * x_t + U_c * (r_t h_(t-1))))
        h_t        = (1 - z_t) h_(t-1) + z_t n_t

    and a linear classifier reads ``h_H`` averaged over ``W``. ``norm_g`` (``2 * hidden``
    channels) and ``norm_c`` (``hidden``) are shared by all steps unless ``norm_per_step``.

    Args:
        num_classes: outputs.
        in_channels: ``C`` of the rows (3 for the RGB Digits).
        hidden: channels of the hidden state.
        kernel_size: of the 1-D convolutions.
        norm, norm_options: the normalization layers (:func:`make_norm`; ``"layernorm"``
            normalizes each sample over ``(channels, W)``).
        norm_per_step: one normalization layer per time step (needs ``steps``).
        steps: ``H``, the number of time steps (rows), for ``norm_per_step``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, hidden: int = 32,
                 kernel_size: int = 3, norm: NormName = "streaming",
                 norm_options: dict[str, Any] | None = None, norm_per_step: bool = False,
                 steps: int = 16) -> None:  # fmt: skip
        super().__init__()
        pad = kernel_size // 2
        self.hidden, self.norm_per_step, self.steps = hidden, norm_per_step, steps
        self.input = nn.Conv1d(in_channels, 3 * hidden, kernel_size, padding=pad)
        self.recurrent_gates = nn.Conv1d(hidden, 2 * hidden, kernel_size, padding=pad, bias=False)
        self.recurrent_candidate = nn.Conv1d(hidden, hidden, kernel_size, padding=pad, bias=False)
        self.norm_gates = _norms(norm, 2 * hidden, 1, norm_per_step, steps, norm_options)
        self.norm_candidate = _norms(norm, hidden, 1, norm_per_step, steps, norm_options)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"ConvGRU: expected images (N, C, H, W), got {tuple(x.shape)}")
        n, _, rows, width = x.shape
        if self.norm_per_step and rows != self.steps:
            raise ValueError(
                f"ConvGRU: norm_per_step has {self.steps} per-step layers (steps) but the images "
                f"have {rows} rows"
            )
        # all rows' input convolutions at once: (N*H, C, W) -> (N, H, 3*hidden, W)
        inputs = self.input(x.permute(0, 2, 1, 3).reshape(n * rows, -1, width))
        inputs = inputs.view(n, rows, 3 * self.hidden, width)
        h = inputs.new_zeros(n, self.hidden, width)
        k = self.hidden
        for t in range(rows):
            i = t if self.norm_per_step else 0
            gates = self.norm_gates[i](inputs[:, t, : 2 * k] + self.recurrent_gates(h))
            r, z = torch.sigmoid(gates).chunk(2, dim=1)
            candidate = inputs[:, t, 2 * k :] + self.recurrent_candidate(r * h)
            h = (1 - z) * h + z * torch.tanh(self.norm_candidate[i](candidate))
        return self.classifier(h.mean(-1))


class CharRNN(nn.Module):
    """An Elman RNN language model over token ids ``(N, T)`` -> next-token logits
    ``(N, T, vocab)``: ``h_t = tanh(norm(W_x e(c_t) + W_h h_(t-1) + b))``, ``h_0 = 0``,
    logits ``= V h_t + c``; the normalization inside the recurrence (shared by every step
    unless ``norm_per_step``)."""

    def __init__(self, vocab: int, embedding: int = 64, hidden: int = 256,
                 norm: NormName = "streaming", norm_options: dict[str, Any] | None = None,
                 norm_per_step: bool = False, steps: int = 64) -> None:  # fmt: skip
        super().__init__()
        self.norm_per_step, self.steps = norm_per_step, steps
        self.embed = nn.Embedding(vocab, embedding)
        self.input = nn.Linear(embedding, hidden)
        self.recurrent = nn.Linear(hidden, hidden, bias=False)
        nn.init.orthogonal_(self.recurrent.weight)
        self.norm = _norms(norm, hidden, 0, norm_per_step, steps, norm_options)
        self.output = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        n, length = tokens.shape
        if self.norm_per_step and length > self.steps:
            raise ValueError(
                f"CharRNN: sequences of {length} steps, but norm_per_step has {self.steps} layers"
            )
        inputs = self.input(self.embed(tokens))  # (N, T, hidden): every step's input at once
        h = inputs.new_zeros(n, self.recurrent.out_features)
        states = []
        for t in range(length):
            h = torch.tanh(
                self.norm[t if self.norm_per_step else 0](inputs[:, t] + self.recurrent(h))
            )
            states.append(h)
        return self.output(torch.stack(states, 1))
