"""``ConversionSpec``: the one description of a conversion, validated once.

``convert``, ``WhiteningCallback``, the checkpoint entry and ``load_converted`` all use it: an
option exists in exactly one place (a field here, or a layer's constructor for ``options``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from ..registry import NormFamily, family_of, get_family
from .classpath import class_path, import_class
from .select import Pattern, normalize_patterns, pattern_to_str

__all__ = ["SPEC_VERSION", "ConversionSpec", "Placement", "resolve_family"]

#: Version of :meth:`ConversionSpec.to_dict`'s layout. Version 0 is the unversioned dict that
#: checkpoints held before (the same keys, without ``version`` and ``types``).
SPEC_VERSION = 1
Placement = Literal["all", "first"]

_SELECTION = (
    "include",
    "exclude",
    "types",
    "min_channels",
    "placement",
    "stages",
    "frozen",
    "respect_conv_groups",
    "insert",
    "drop_following_norm",
)


def resolve_family(layer: str | type[nn.Module], *, allow_import: bool = True) -> NormFamily:
    """The family of a registered name (``"iternorm"``), a layer class, or a dotted class path.

    An unregistered :class:`~lightning_whiten.layers.WhiteningNorm` subclass (given as a class,
    or as a path when ``allow_import``) gets a family of its own on the fly; register it with
    :func:`~lightning_whiten.registry.register_family` so that checkpoints naming it load without
    ``trust``. With ``allow_import=False`` (a name read from a checkpoint) only registered
    names and classes of modules already imported resolve.
    """
    from ..layers import WhiteningNorm, norm_act_class

    cls: Any = layer
    if isinstance(layer, str):
        if "." not in layer:
            return get_family(layer)
        cls = import_class(layer, allow_import=allow_import)
    family = family_of(cls) if isinstance(cls, type) and issubclass(cls, nn.Module) else None
    if family is not None and cls in family.layer_types:
        return family
    if isinstance(cls, type) and issubclass(cls, WhiteningNorm):
        return NormFamily(class_path(cls), cls, act_layer=norm_act_class(cls))
    shown = layer if isinstance(layer, str) else repr(layer)
    raise ValueError(
        f"{shown!r} is not a whitening layer or a registered normalization layer (register a "
        "family with lightning_whiten.registry.register_family)"
    )


def _patterns(value: Any, option: str, allow_import: bool) -> tuple[Pattern, ...]:
    try:
        return tuple(normalize_patterns(value, allow_import=allow_import))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{option}: {err}") from None


@dataclass(frozen=True)
class ConversionSpec:
    """Everything a conversion needs, validated at construction.

    Args:
        layer: a registered family name (``"iternorm"``, ``"dbn"``, ``"swbn"``, ...), its layer
            class, or a ``WhiteningNorm`` subclass; stored as the family's name.
        options: constructor options of the layer (``{"group_size": 16, "iterations": 5}``),
            checked against its signature and by building one layer.
        include: convert only modules matching these patterns: globs on qualified module names
            (``"layer1"`` selects everything inside ``layer1``, ``"*.bn1"`` every ``bn1``) or
            module types (``"type:pkg.Class"`` strings name a type, for YAML).
        exclude: never convert modules matching these patterns.
        types: convert only modules of these types (default: every module the family
            replaces); the same forms as a type pattern.
        min_channels: skip modules with fewer channels.
        placement: ``"all"`` or ``"first"`` (only the first selected module: the IterNorm
            paper's ImageNet placement).
        stages: only modules in these stages (timm ``feature_info`` levels, or torchvision
            ``layer1..N``; stage 0 is the stem).
        frozen: also convert frozen BatchNorm (its affine stays frozen).
        respect_conv_groups: keep channel groups inside the groups of the convolution(s)
            producing the input (see :func:`lightning_whiten.convert`).
        insert: qualified names (globs) of linear layers or unpadded convolutions that get a new
            layer of the family at their input, where the model has no normalization (the
            IterNorm paper's "DF" variant whitens the features the classifier sees:
            ``insert=["fc"]``). ``export`` folds it into that layer.
        drop_following_norm: for families that replace convolutions (``convnorm``): also
            remove the normalization layer that directly follows each converted convolution
            (found by tracing the forward; a fused timm ``BatchNormAct2d`` keeps its activation).
            ConvNorm's paper trains with and without that BatchNorm.
        version: the layout version of :meth:`to_dict`.
        trusted: whether names may import modules (``False`` for specs read from files).
    """

    layer: str = "iternorm"
    options: dict[str, Any] = field(default_factory=dict)
    include: tuple[Pattern, ...] = ()
    exclude: tuple[Pattern, ...] = ()
    types: tuple[Pattern, ...] = ()
    min_channels: int = 1
    placement: Placement = "all"
    stages: tuple[int, ...] | None = None
    frozen: bool = False
    respect_conv_groups: bool = True
    insert: tuple[str, ...] = ()
    drop_following_norm: bool = False
    version: int = SPEC_VERSION
    trusted: bool = field(default=True, compare=False, repr=False)
    _family: NormFamily = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        family = resolve_family(self.layer, allow_import=self.trusted)
        put("_family", family)
        put("layer", family.name)
        if not isinstance(self.options, dict):
            raise TypeError(f"options must be a dict of layer options, got {self.options!r}")
        put("options", dict(self.options))
        for option in ("include", "exclude", "types"):
            put(option, _patterns(getattr(self, option), option, self.trusted))
        if self.placement not in ("all", "first"):
            raise ValueError(f"placement must be 'all' or 'first', got {self.placement!r}")
        value = self.min_channels
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"min_channels must be a non-negative integer, got {value!r}")
        if self.stages is not None:
            stages = [self.stages] if isinstance(self.stages, int) else self.stages
            if not isinstance(stages, Sequence) or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in stages
            ):
                raise ValueError(f"stages must be a list of stage indices, got {self.stages!r}")
            put("stages", tuple(stages))
        insert = (self.insert,) if isinstance(self.insert, str) else tuple(self.insert or ())
        if not all(isinstance(p, str) and p for p in insert):
            raise TypeError(f"insert: expected glob strings naming modules, got {self.insert!r}")
        if insert and family.targets != "batchnorm":
            raise ValueError(
                f"insert: {family.layer.__name__} replaces convolutions; only a normalization "
                "family can be inserted"
            )
        put("insert", insert)
        if self.drop_following_norm is True and family.targets != "conv2d":
            raise ValueError(
                f"drop_following_norm: {family.layer.__name__} replaces normalization layers; "
                "only a family that replaces convolutions (convnorm) can drop the one after it"
            )
        for option in ("frozen", "respect_conv_groups", "drop_following_norm"):
            if not isinstance(getattr(self, option), bool):
                raise TypeError(f"{option} must be True or False, got {getattr(self, option)!r}")
        if not isinstance(self.version, int) or not 0 <= self.version <= SPEC_VERSION:
            raise ValueError(
                f"conversion spec version {self.version!r} is not supported (this lightning-whiten "
                f"reads versions 0 to {SPEC_VERSION}): it was written by a newer release"
            )
        put("version", SPEC_VERSION)
        family.check_options(self.options)
        family.validate(self.options)

    @property
    def family(self) -> NormFamily:
        """The normalization family this spec converts to."""
        return self._family

    @classmethod
    def of(cls, layer: str | type[nn.Module] = "iternorm", **kwargs: Any) -> ConversionSpec:
        """A spec from ``convert``-style arguments: selection keywords (``include``, ``exclude``,
        ``types``, ``min_channels``, ``placement``, ``stages``, ``frozen``,
        ``respect_conv_groups``) and the layer's options as further keywords."""
        selection = {k: kwargs.pop(k) for k in _SELECTION if k in kwargs}
        selection = {k: v for k, v in selection.items() if v is not None or k == "stages"}
        return cls(layer, kwargs, **selection)  # type: ignore[arg-type]

    def replace(self, **changes: Any) -> ConversionSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON/YAML-serializable dict (checkpoints store this)."""
        return {
            "version": self.version,
            "layer": self.layer,
            "options": dict(self.options),
            "include": [pattern_to_str(p) for p in self.include],
            "exclude": [pattern_to_str(p) for p in self.exclude],
            "types": [pattern_to_str(p) for p in self.types],
            "min_channels": self.min_channels,
            "placement": self.placement,
            "stages": None if self.stages is None else list(self.stages),
            "frozen": self.frozen,
            "respect_conv_groups": self.respect_conv_groups,
            "insert": list(self.insert),
            "drop_following_norm": self.drop_following_norm,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, trusted: bool = False) -> ConversionSpec:
        """The spec a :meth:`to_dict` dict describes (any version up to :data:`SPEC_VERSION`).

        With ``trusted=False`` (the default: a dict read from a file) names resolve only
        through the registry of families and modules already imported; nothing is imported.
        """
        if not isinstance(data, dict):
            raise TypeError(f"a conversion spec is a dict, got {type(data).__name__}")
        # version 0 has no types and no insert; drop_following_norm is optional (default False)
        known = {"version", "layer", "options", *_SELECTION}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"conversion spec: unknown keys {unknown} (known: {sorted(known)})")
        fields = dict(data)
        fields.setdefault("version", 0)
        for option in ("include", "exclude", "types", "insert"):
            fields[option] = tuple(fields.get(option) or ())
        return cls(**fields, trusted=trusted)
