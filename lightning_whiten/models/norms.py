"""The ``norm`` option of the recipe backbones: which normalization layer a network is built with."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from ..layers import LpNorm, StreamingNorm

__all__ = ["NORMS", "NormName", "make_norm"]

NormName = Literal["batchnorm", "lpnorm", "streaming", "layernorm", "none"]
NORMS: tuple[str, ...] = ("batchnorm", "lpnorm", "streaming", "layernorm", "none")


def make_norm(
    name: NormName, num_features: int, spatial_dims: int = 0, **options: Any
) -> nn.Module:
    """A normalization layer for ``num_features`` channels.

    Args:
        name: ``"batchnorm"`` (``nn.BatchNorm1d/2d``), ``"lpnorm"`` (:class:`LpNorm`),
            ``"streaming"`` (:class:`StreamingNorm`), ``"layernorm"`` (``nn.LayerNorm`` over the
            features of ``(N, C)`` inputs; ``nn.GroupNorm(1, C)``, i.e. over ``(C, H, W)``, for
            feature maps) or ``"none"`` (``nn.Identity``).
        num_features: channels ``C``.
        spatial_dims: 0 for ``(N, C)`` inputs, 2 for ``(N, C, H, W)``.
        **options: constructor options of the layer (``p``, ``momentum``, ``alpha``, ...).
    """
    if name not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {name!r}")
    if name == "none":
        if options:
            raise ValueError(f"norm='none' takes no options, got {sorted(options)}")
        return nn.Identity()
    if name == "batchnorm":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm1d)(num_features, **options)
    if name == "lpnorm":
        return LpNorm(num_features, **options)
    if name == "streaming":
        return StreamingNorm(num_features, **options)
    if spatial_dims == 0:
        return nn.LayerNorm(num_features, **options)
    return nn.GroupNorm(1, num_features, **options)
