"""Inserting a normalization layer where a model has none: at the input of a linear layer or
an unpadded convolution (e.g. decorrelated features before the classifier, the IterNorm
paper's "DF" variant), and folding it back into that layer on export."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["NormalizedInput", "fold_input_map", "input_channels", "insertion_problem"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FORWARDS = tuple(c.forward for c in _CONVS)


class NormalizedInput(nn.Module):
    """``layer(norm(x))``: a normalization that surgery inserted at the input of ``layer``.

    ``export`` folds ``norm``'s eval map into ``layer`` (:func:`fold_input_map`) and puts
    ``layer`` back in its place, so the exported model has the original architecture.
    """

    def __init__(self, norm: nn.Module, layer: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(self.norm(x))


def input_channels(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, _CONVS):
        return module.in_channels
    return None


def insertion_problem(module: nn.Module) -> str | None:
    """Why a normalization cannot be inserted at ``module``'s input (``None``: it can).

    Its eval map ``x -> A x + b`` must fold into the layer: ``W (A x + b) + c``. That holds for
    a linear layer and for a convolution without padding and groups (zero padding would be
    shifted by ``b``; groups would be mixed by ``A``).
    """
    if isinstance(module, NormalizedInput):
        return "it already has an inserted normalization"
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return None
    if isinstance(module, _CONVS) and type(module).forward in _CONV_FORWARDS:
        if any(p != 0 for p in _as_tuple(module.padding)):
            return f"{type(module).__name__} pads its input (padding={module.padding})"
        if module.groups != 1:
            return f"{type(module).__name__} has groups={module.groups}"
        return None
    return f"{type(module).__name__} is not a linear layer or convolution"


def _as_tuple(padding) -> tuple:
    if isinstance(padding, str):
        return (1,) if padding != "valid" else (0,)
    return tuple(padding) if isinstance(padding, (tuple, list)) else (padding,)


@torch.no_grad()
def fold_input_map(layer: nn.Module, matrix: Tensor, shift: Tensor) -> None:
    """Fold ``x -> A x + b`` into the input side of ``layer`` (``W x + c``), in place:
    ``W' = W A`` (over input channels, for every kernel position) and ``c' = c + W b``
    (summed over kernel positions for a convolution without padding)."""
    w = layer.weight.detach().double()
    a, b = matrix.double(), shift.double()
    folded = torch.einsum("oi...,ij->oj...", w, a)
    added = torch.einsum("oi...,i->o", w, b)
    layer.weight.copy_(folded.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(added.to(layer.weight.dtype))
    else:
        layer.bias.copy_((layer.bias.double() + added).to(layer.bias.dtype))
