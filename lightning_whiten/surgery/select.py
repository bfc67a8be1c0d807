"""Finding normalization modules in a model and deciding which ones to convert."""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..layers import WhiteningNorm
from .registry import class_path, import_class

__all__ = ["Candidate", "NormKind", "Pattern", "find_normalization_modules", "normalize_patterns"]

#: A selection pattern: a glob on qualified module names, or a module type.
Pattern = Union[str, type]  # noqa: UP007 (a runtime alias, not an annotation)
NormKind = Literal["batchnorm", "frozen", "whitening", "other"]

_OTHER_NORMS: tuple[type, ...] = (nn.GroupNorm, nn.LayerNorm, _InstanceNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _OTHER_NORMS = (*_OTHER_NORMS, nn.RMSNorm)
_NORM_NAME = re.compile(r"norm", re.IGNORECASE)
# Submodules a normalization layer may carry (timm's fused norm + activation layers).
_NORM_CHILDREN = {"act", "drop"}


@functools.cache
def _frozen_types() -> tuple[type, ...]:
    types: list[type] = []
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d

        types.append(FrozenBatchNorm2d)
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    try:
        from timm.layers.norm_act import FrozenBatchNormAct2d

        types.append(FrozenBatchNormAct2d)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return tuple(types)


def normalization_kind(module: nn.Module) -> NormKind | None:
    """Classify a module: a BatchNorm we can convert, a frozen BN, a whitening layer, another
    normalization (GroupNorm, LayerNorm, ...), or ``None`` for anything else."""
    if isinstance(module, WhiteningNorm):
        return "whitening"
    if isinstance(module, _BatchNorm):
        return "batchnorm"
    if isinstance(module, _frozen_types()):
        return "frozen"
    if isinstance(module, _OTHER_NORMS):
        return "other"
    # Other libraries' norms (timm's RmsNorm, LayerNorm2d, ...): a leaf-like module named *Norm*.
    # Containers such as ConvNormAct or NormMlpClassifierHead have other children and are skipped.
    if (
        _NORM_NAME.search(type(module).__name__)
        and set(dict(module.named_children())) <= _NORM_CHILDREN
    ):
        return "other"
    return None


def num_channels(module: nn.Module) -> int | None:
    for attr in ("num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    for attr in ("running_mean", "weight"):
        value = getattr(module, attr, None)
        if value is not None and hasattr(value, "numel") and value.dim() == 1:
            return int(value.numel())
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(shape[0]) if len(shape) == 1 else None
    return None


@dataclass
class Candidate:
    """One normalization module instance and every place it is registered in the model."""

    name: str
    module: nn.Module
    kind: NormKind
    slots: list[tuple[nn.Module, str, str]]  # (parent, attribute, qualified name)
    index: int  # position in module order

    @property
    def names(self) -> list[str]:
        return [q for _, _, q in self.slots]


def find_normalization_modules(model: nn.Module) -> list[Candidate]:
    """Every normalization module instance in ``model``, in module order; shared instances once."""
    parents: dict[str, nn.Module] = {"": model}
    found: dict[int, Candidate] = {}
    for index, (name, module) in enumerate(model.named_modules(remove_duplicate=False)):
        parents[name] = module
        kind = normalization_kind(module)
        if kind is None or not name:
            continue
        parent_name, _, attr = name.rpartition(".")
        slot = (parents[parent_name], attr, name)
        if id(module) in found:
            found[id(module)].slots.append(slot)
        else:
            found[id(module)] = Candidate(name, module, kind, [slot], index)
    return list(found.values())


def normalize_patterns(patterns: Pattern | Sequence[Pattern] | None) -> list[Pattern]:
    """Accept one pattern or a list; ``"type:pkg.Class"`` strings name a type (for YAML)."""
    if patterns is None:
        return []
    if isinstance(patterns, (str, type)):
        patterns = [patterns]
    elif not isinstance(patterns, (list, tuple)):
        raise TypeError(
            f"selection patterns are a glob string, a type or a list of them, got {patterns!r}"
        )
    result: list[Pattern] = []
    for p in patterns:
        if isinstance(p, str) and p.startswith("type:"):
            cls = import_class(p[len("type:") :])
            if not isinstance(cls, type):
                raise ValueError(f"{p!r} does not name a class")
            result.append(cls)
        elif isinstance(p, (str, type)):
            result.append(p)
        else:
            raise TypeError(f"selection patterns are glob strings or types, got {p!r}")
    return result


def pattern_to_str(pattern: Pattern) -> str:
    return pattern if isinstance(pattern, str) else f"type:{class_path(pattern)}"


def matches(candidate: Candidate, pattern: Pattern) -> bool:
    """A name pattern matches a module whose qualified name, or an ancestor's, fits the glob
    (so ``"layer1"`` selects everything inside ``layer1``); a type matches by ``isinstance``."""
    if isinstance(pattern, type):
        return isinstance(candidate.module, pattern)
    for name in candidate.names:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if fnmatch.fnmatchcase(".".join(parts[:i]), pattern):
                return True
    return False


def check_patterns_match(
    patterns: list[Pattern], candidates: list[Candidate], option: str, model: nn.Module
) -> None:
    """A pattern that matches no normalization module is an error listing close names."""
    for pattern in patterns:
        if any(matches(c, pattern) for c in candidates):
            continue
        if isinstance(pattern, type):
            present = sorted({type(c.module).__name__ for c in candidates})
            raise ValueError(
                f"{option} type {pattern.__name__} matches no normalization module; the model "
                f"has: {', '.join(present) or 'none'}"
            )
        pool = list(
            dict.fromkeys([c.name for c in candidates] + [n for n, _ in model.named_modules() if n])
        )
        matched = [n for n in pool if fnmatch.fnmatchcase(n, pattern)]
        if matched:
            more = f" and {len(matched) - 5} more" if len(matched) > 5 else ""
            raise ValueError(
                f"{option} pattern {pattern!r} matches modules ({', '.join(matched[:5])}{more}) "
                "but none of them is or contains a normalization layer"
            )
        close = difflib.get_close_matches(pattern, pool, n=5, cutoff=0.5)
        if not close:
            stem = pattern.split("*")[0].split("?")[0].rstrip(".")
            close = [n for n in pool if stem and n.startswith(stem.split(".")[0])][:5]
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(f"{option} pattern {pattern!r} matches no normalization module{hint}")


def stage_of(model: nn.Module, candidates: list[Candidate]) -> dict[int, int]:
    """Stage index per candidate (keyed by ``id(module)``).

    Uses timm's ``feature_info`` (the module ending each feature level: stage 0 ends with the
    first entry, e.g. the stem) or, failing that, torchvision-style ``layer1..layerN`` children
    (stage ``k`` is ``layerk``, stage 0 everything before ``layer1``).
    """
    order = [name for name, _ in model.named_modules()]
    position = {name: i for i, name in enumerate(order)}
    boundaries: list[int] = []
    feature_info = getattr(model, "feature_info", None)
    if feature_info is not None:
        try:
            modules = [f["module"] for f in feature_info]
        except (TypeError, KeyError):
            modules = (
                list(feature_info.module_name()) if hasattr(feature_info, "module_name") else []
            )
        for mod in modules:
            inside = [i for n, i in position.items() if n == mod or n.startswith(mod + ".")]
            if inside:
                boundaries.append(max(inside))
    if not boundaries:
        layers = sorted(
            (int(m.group(1)), n) for n in position if (m := re.fullmatch(r"layer(\d+)", n))
        )
        if not layers:
            raise ValueError(
                "stages= needs a timm model with feature_info or torchvision-style layer1..N "
                "children; select modules with include= glob patterns instead"
            )
        first = position[layers[0][1]]
        boundaries.append(first - 1)
        for _, n in layers:
            boundaries.append(
                max(i for m, i in position.items() if m == n or m.startswith(n + "."))
            )
    boundaries.sort()
    stages: dict[int, int] = {}
    for c in candidates:
        p = position.get(c.name, c.index)
        stage = next((k for k, end in enumerate(boundaries) if p <= end), len(boundaries))
        stages[id(c.module)] = stage
    return stages


def preceding_conv(model: nn.Module, candidate: Candidate) -> nn.Module | None:
    """The convolution registered just before ``candidate`` in its parent, if any.

    Module order is how torchvision's ``Conv2dNormActivation`` and timm's blocks lay out
    ``conv -> norm``; it is only used to keep whitening groups inside the groups of a grouped
    convolution, where a wrong guess costs decorrelation but never correctness.
    """
    parent, attr, _ = candidate.slots[0]
    previous = None
    for name, child in parent.named_children():
        if name == attr:
            break
        previous = child
    if previous is None:
        return None
    leaves = [m for m in previous.modules() if next(m.children(), None) is None] or [previous]
    last = leaves[-1]
    return last if isinstance(last, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else None
