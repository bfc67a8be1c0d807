"""The registry of normalization families: what model surgery can convert a model to.

A family is a layer class together with what the surgery needs to know about it: which modules
it replaces, how it is built from one of them, and whether its eval-time map folds back into
the producing convolution on export. Each family registers itself once, in the file that
defines its layer::

    register_family(NormFamily("iternorm", IterNorm, act_layer=IterNormAct))

after which ``convert(model, "iternorm")``, ``WhiteningCallback(layer="iternorm")``, checkpoints
and ``load_converted`` know it; the surgery itself has no per-family code. Names are resolved
only through this registry, so a checkpoint that names a family never imports a module.

Plain PyTorch: no Lightning import here.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

__all__ = [
    "NormFamily",
    "Targets",
    "families",
    "family_of",
    "get_family",
    "register_family",
    "unregister_family",
]

#: Which modules a family replaces: normalization layers (BatchNorm and friends) or 2-D
#: convolutions. The surgery knows how to find and judge each kind of target.
Targets = Literal["batchnorm", "conv2d"]

_FAMILIES: dict[str, NormFamily] = {}


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


@dataclass(frozen=True)
class NormFamily:
    """A normalization family that model surgery can convert to.

    Args:
        name: the name users write (``convert(model, "iternorm")``); matched ignoring case,
            ``_`` and ``-``.
        layer: the layer class. Its keyword constructor options are the family's options;
            its ``schedulable`` class attribute lists what schedules may change.
        targets: what it replaces: ``"batchnorm"`` (normalization layers, built with
            ``layer.from_batchnorm(module, **options)``) or ``"conv2d"`` (convolutions, built
            with ``layer.from_conv(module, **options)``).
        act_layer: the counterpart that also applies an activation and a drop layer, for
            timm's fused ``BatchNormAct2d`` (``class MyNormAct(NormActMixin, MyNorm)``).
            Without one, such fused modules are left as they are (reported).
        build: overrides how a replacement is built: ``build(module, layer_class, options)``.
        group_option: the option holding channels per group, if the layer mixes channels
            within groups (whitening): the surgery caps it to stay inside the channel groups of
            a grouped producer and skips layers after depthwise convolutions. ``None`` for
            per-channel layers, which fold into any producer.
        export: ``"fold"`` when the layer's eval map is affine (``inference_map()``, plus
            ``weight``/``bias``), so ``export`` folds it into the producer; otherwise the
            reason it cannot be exported, which ``export`` raises.
        aliases: other accepted names.
        description: one line for listings.
    """

    name: str
    layer: type[nn.Module]
    targets: Targets = "batchnorm"
    act_layer: type[nn.Module] | None = None
    build: Callable[[nn.Module, type[nn.Module], dict[str, Any]], nn.Module] | None = None
    group_option: str | None = "group_size"
    export: str = "fold"
    aliases: tuple[str, ...] = ()
    description: str = ""
    _options: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from .layers.base import layer_options

        if not isinstance(self.layer, type) or not issubclass(self.layer, nn.Module):
            raise TypeError(f"NormFamily {self.name!r}: layer must be an nn.Module subclass")
        if self.targets not in ("batchnorm", "conv2d"):
            raise ValueError(
                f"NormFamily {self.name!r}: targets must be 'batchnorm' or 'conv2d', "
                f"got {self.targets!r}"
            )
        options = layer_options(self.layer)
        if self.group_option is not None and self.group_option not in options:
            raise ValueError(
                f"NormFamily {self.name!r}: group_option {self.group_option!r} is not an option "
                f"of {self.layer.__name__}"
            )
        object.__setattr__(self, "_options", options)

    @property
    def options(self) -> dict[str, Any]:
        """``{option: default}`` of the layer's constructor (see :func:`layer_options`)."""
        return dict(self._options)

    @property
    def schedulable(self) -> tuple[str, ...]:
        return tuple(getattr(self.layer, "schedulable", ()))

    @property
    def layer_types(self) -> tuple[type[nn.Module], ...]:
        """The classes a converted model holds for this family."""
        return (self.layer,) if self.act_layer is None else (self.layer, self.act_layer)

    @property
    def folds(self) -> bool:
        return self.export == "fold"

    def check_options(self, options: dict[str, Any]) -> None:
        """A ``TypeError`` naming the layer for an option its constructor does not take."""
        for key in options:
            if key not in self._options:
                close = difflib.get_close_matches(key, list(self._options), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(
                    f"{self.layer.__name__} does not take the option {key!r}{hint} "
                    f"(it takes: {', '.join(self._options)})"
                )

    def validate(self, options: dict[str, Any]) -> None:
        """Build one layer with ``options`` from a small probe module, so that bad values
        raise (naming the layer and the option) before any model is touched."""
        probe = nn.BatchNorm2d(1) if self.targets == "batchnorm" else nn.Conv2d(1, 1, 3)
        self.create(probe, options)

    def create(self, module: nn.Module, options: dict[str, Any]) -> nn.Module:
        """The replacement of ``module``, built with ``options`` (its act/drop kept)."""
        act = getattr(module, "act", None)
        cls: type[nn.Module] = self.layer
        kwargs = dict(options)
        if isinstance(act, nn.Module) and self.targets == "batchnorm":
            if self.act_layer is None:
                raise TypeError(
                    f"family {self.name!r} has no act_layer for {type(module).__name__}, which "
                    "fuses an activation"
                )
            cls = self.act_layer
            drop = getattr(module, "drop", None)
            kwargs.update(act=act, drop=drop if isinstance(drop, nn.Module) else None)
        if self.build is not None:
            return self.build(module, cls, kwargs)
        if self.targets == "conv2d":
            return cls.from_conv(module, **kwargs)  # type: ignore[attr-defined]
        return cls.from_batchnorm(module, **kwargs)  # type: ignore[attr-defined]


def register_family(family: NormFamily, *, replace: bool = False) -> NormFamily:
    """Make ``family`` known by its name and aliases (``replace=True`` to redefine one)."""
    keys = [_key(family.name), *(_key(a) for a in family.aliases)]
    for key in keys:
        existing = _FAMILIES.get(key)
        if existing is not None and existing != family and not replace:
            raise ValueError(
                f"a normalization family is already registered as {key!r} "
                f"({existing.layer.__name__}); pass replace=True to redefine it"
            )
    for key in keys:
        _FAMILIES[key] = family
    return family


def unregister_family(name: str) -> None:
    """Forget a family (and its aliases); mainly for tests."""
    family = get_family(name)
    for key in [k for k, f in _FAMILIES.items() if f is family]:
        del _FAMILIES[key]


def _builtins() -> None:
    # The built-in families register themselves when their layer files are imported.
    import lightning_whiten.layers  # noqa: F401


def families() -> dict[str, NormFamily]:
    """Every registered family by its name."""
    _builtins()
    return {f.name: f for f in _FAMILIES.values()}


def get_family(name: str) -> NormFamily:
    """The family registered as ``name`` (case, ``_`` and ``-`` ignored)."""
    _builtins()
    family = _FAMILIES.get(_key(name))
    if family is None:
        names = sorted(families())
        close = difflib.get_close_matches(_key(name), names, n=2, cutoff=0.4)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown layer {name!r}: choose one of {names}{hint}")
    return family


def family_of(module_or_class: nn.Module | type[nn.Module]) -> NormFamily | None:
    """The registered family a layer (or layer class) belongs to, if any."""
    cls = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    for family in _FAMILIES.values():
        if cls in family.layer_types:
            return family
    for family in _FAMILIES.values():
        if issubclass(cls, family.layer):
            return family
    return None
