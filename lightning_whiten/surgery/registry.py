"""Names of the whitening layers and validation of their options."""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from ..layers import DBN, SWBN, IterNorm, WhiteningNorm
from ..layers.norm_act import NormActMixin

__all__ = ["LAYERS", "check_layer_options", "class_path", "import_class", "resolve_layer"]

#: Layer names accepted by :func:`lightning_whiten.convert` and the callback.
LAYERS: dict[str, type[WhiteningNorm]] = {"iternorm": IterNorm, "dbn": DBN, "swbn": SWBN}

# Set by convert itself or taken from the normalization module being replaced.
_RESERVED = {"num_features", "affine", "track_running_stats", "device", "dtype", "act", "drop"}


def resolve_layer(layer: str | type[WhiteningNorm]) -> type[WhiteningNorm]:
    """A whitening layer class from a name (``"iternorm"``, ``"dbn"``, ``"swbn"``) or a class."""
    if isinstance(layer, str):
        key = layer.lower().replace("_", "").replace("-", "")
        if key in LAYERS:
            return LAYERS[key]
        if "." in layer:
            cls = import_class(layer)
            if isinstance(cls, type) and issubclass(cls, WhiteningNorm):
                return cls
            raise ValueError(f"{layer!r} is not a whitening layer (a WhiteningNorm subclass)")
        close = difflib.get_close_matches(key, list(LAYERS), n=2, cutoff=0.4)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown whitening layer {layer!r}: choose one of {sorted(LAYERS)}{hint}")
    if isinstance(layer, type) and issubclass(layer, WhiteningNorm):
        return layer
    raise TypeError(
        f"layer must be one of {sorted(LAYERS)} or a subclass of WhiteningNorm, got {layer!r}"
    )


def layer_option_names(cls: type[WhiteningNorm]) -> list[str]:
    """Constructor options of a whitening layer class that a user may set."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass in (NormActMixin, object) or not issubclass(klass, WhiteningNorm):
            continue
        for p in list(inspect.signature(klass.__init__).parameters.values())[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in _RESERVED:
                continue
            if p.name not in names:
                names.append(p.name)
        break  # the most derived WhiteningNorm class declares every option explicitly
    return names


def check_layer_options(cls: type[WhiteningNorm], options: dict[str, Any]) -> None:
    """Raise a ``TypeError`` naming the layer for options its constructor does not take."""
    accepted = layer_option_names(cls)
    for key in options:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"{cls.__name__} does not take the option {key!r}{hint} "
                f"(it takes: {', '.join(accepted)})"
            )


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(path: str) -> Any:
    """The object a dotted path names (``"torch.nn.BatchNorm2d"``), or a ``ValueError`` that
    says which part of the path was not found."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"not a class path: {path!r} (expected 'package.module.Class')")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError:
        # nested qualname (Outer.Inner): import the longest importable prefix
        parent, _, outer = module_name.rpartition(".")
        try:
            obj = getattr(importlib.import_module(parent), outer) if parent else None
        except (ImportError, AttributeError):
            obj = None
        if obj is None:
            raise ValueError(f"cannot import {module_name!r} for the class path {path!r}") from None
    if not hasattr(obj, attr):
        public = [n for n in dir(obj) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, public, n=1)
        hint = f"; did you mean {module_name}.{close[0]}?" if close else ""
        raise ValueError(f"{module_name!r} has no {attr!r} (class path {path!r}){hint}")
    return getattr(obj, attr)
