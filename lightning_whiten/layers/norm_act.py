"""Normalization layers fused with an activation, the counterparts of timm's ``BatchNormAct2d``.

timm fuses BatchNorm with its activation (and an optional drop layer) in one module whose
``weight``/``bias`` live at the top level. Replacing it with a plain normalization would silently
drop the activation, and wrapping it would rename the parameters; ``class MyNormAct(NormActMixin,
MyNorm)`` keeps both the behaviour (``act(drop(norm(x)))``) and the parameter names. Each layer
file defines its own (``IterNormAct`` beside ``IterNorm``) and registers it with its family.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["NormActMixin", "norm_act_class"]


class NormActMixin:
    """Adds ``drop`` and ``act`` submodules applied after the normalization layer's output."""

    def __init__(
        self,
        num_features: int,
        *args: Any,
        act: nn.Module | None = None,
        drop: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, *args, **kwargs)  # type: ignore[call-arg]
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))  # type: ignore[misc]


def norm_act_class(layer_class: type[nn.Module]) -> type[nn.Module]:
    """The activation-carrying counterpart of a normalization layer class.

    A registered family's ``act_layer`` (``IterNorm`` -> ``IterNormAct``); a class that already
    carries an activation is returned as is; for other classes a subclass is built on the fly
    (define ``class MyNormAct(NormActMixin, MyNorm)`` at module level instead if the model must
    be pickled whole, and register it as your family's ``act_layer``).
    """
    from ..registry import family_of

    if issubclass(layer_class, NormActMixin):
        return layer_class
    family = family_of(layer_class)
    if family is not None and family.layer is layer_class and family.act_layer is not None:
        return family.act_layer
    return type(f"{layer_class.__name__}Act", (NormActMixin, layer_class), {"__module__": __name__})
