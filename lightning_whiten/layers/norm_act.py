"""Whitening layers fused with an activation, the counterparts of timm's ``BatchNormAct2d``.

timm fuses BatchNorm with its activation (and an optional drop layer) in one module whose
``weight``/``bias`` live at the top level. Replacing it with a plain normalization would silently
drop the activation, and wrapping it would rename the parameters; these classes keep both the
behaviour (``act(drop(norm(x)))``) and the parameter names.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import WhiteningNorm
from .dbn import DBN
from .iternorm import IterNorm
from .swbn import SWBN

__all__ = ["DBNAct", "IterNormAct", "NormActMixin", "SWBNAct", "norm_act_class"]


class NormActMixin:
    """Adds ``drop`` and ``act`` submodules applied after the whitening layer's output."""

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


class IterNormAct(NormActMixin, IterNorm):
    """:class:`IterNorm` followed by ``drop`` and ``act`` (replaces timm's ``BatchNormAct2d``)."""


class DBNAct(NormActMixin, DBN):
    """:class:`DBN` followed by ``drop`` and ``act`` (replaces timm's ``BatchNormAct2d``)."""


class SWBNAct(NormActMixin, SWBN):
    """:class:`SWBN` followed by ``drop`` and ``act`` (replaces timm's ``BatchNormAct2d``)."""


_BUILTIN: dict[type, type] = {IterNorm: IterNormAct, DBN: DBNAct, SWBN: SWBNAct}


def norm_act_class(layer_class: type[WhiteningNorm]) -> type[WhiteningNorm]:
    """The activation-carrying counterpart of a whitening layer class.

    Built-in layers map to :class:`IterNormAct`, :class:`DBNAct`, :class:`SWBNAct`; a layer
    class that already carries an activation is returned as is. Custom subclasses of
    :class:`WhiteningNorm` get a subclass built on the fly: define your own
    ``class MyNormAct(NormActMixin, MyNorm)`` instead if the model must be pickled whole.
    """
    if issubclass(layer_class, NormActMixin):
        return layer_class
    for base, act_class in _BUILTIN.items():
        if layer_class is base:
            return act_class
    return type(f"{layer_class.__name__}Act", (NormActMixin, layer_class), {"__module__": __name__})
