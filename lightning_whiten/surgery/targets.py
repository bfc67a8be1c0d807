"""Finding the modules a family may replace, and what kind each one is.

Two kinds of targets (:data:`lightning_whiten.registry.Targets`): normalization layers
(``"batchnorm"``: BatchNorm and its variants are convertible; other normalizations and layers
already converted are listed so the report accounts for every normalization module) and 2-D
convolutions (``"conv2d"``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..registry import Targets, family_of

__all__ = ["Candidate", "TargetKind", "find_targets", "normalization_kind", "num_channels"]

#: ``batchnorm``/``frozen``/``conv``: convertible (frozen only on request); ``converted``: a
#: layer of a registered family already; ``other``: a normalization that is not batch
#: normalization, or a convolution that is not a plain 2-D one.
TargetKind = Literal["batchnorm", "frozen", "conv", "converted", "other"]

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


def normalization_kind(module: nn.Module) -> TargetKind | None:
    """Classify a module as a normalization target: a BatchNorm we can convert, a frozen BN, a
    layer of a registered family, another normalization (GroupNorm, LayerNorm, ...), or
    ``None`` for anything else."""
    family = family_of(module)
    if family is not None and family.targets == "batchnorm":
        return "converted"
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


def convolution_kind(module: nn.Module) -> TargetKind | None:
    """Classify a module as a convolution target: a plain ``nn.Conv2d`` (or a subclass with
    the same forward), a layer of a registered family, another convolution, or ``None``."""
    family = family_of(module)
    if family is not None and family.targets == "conv2d":
        return "converted"
    if isinstance(module, nn.Conv2d):
        return "conv" if type(module).forward is nn.Conv2d.forward else "other"
    if isinstance(module, (nn.Conv1d, nn.Conv3d)):
        return "other"
    return None


_CLASSIFIERS = {"batchnorm": normalization_kind, "conv2d": convolution_kind}


def num_channels(module: nn.Module) -> int | None:
    """Output channels of a normalization layer or convolution (``None`` if unknown)."""
    for attr in ("num_features", "num_channels", "out_channels"):
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
    """One target module instance and every place it is registered in the model."""

    name: str
    module: nn.Module
    kind: TargetKind
    slots: list[tuple[nn.Module, str, str]]  # (parent, attribute, qualified name)
    index: int  # position in module order

    @property
    def names(self) -> list[str]:
        return [q for _, _, q in self.slots]


def find_targets(model: nn.Module, targets: Targets = "batchnorm") -> list[Candidate]:
    """Every module of ``model`` of the given target kind, in module order; shared instances
    once (with all their names)."""
    classify = _CLASSIFIERS[targets]
    parents: dict[str, nn.Module] = {"": model}
    found: dict[int, Candidate] = {}
    for index, (name, module) in enumerate(model.named_modules(remove_duplicate=False)):
        parents[name] = module
        kind = classify(module)
        if kind is None or not name:
            continue
        parent_name, _, attr = name.rpartition(".")
        slot = (parents[parent_name], attr, name)
        if id(module) in found:
            found[id(module)].slots.append(slot)
        else:
            found[id(module)] = Candidate(name, module, kind, [slot], index)
    return list(found.values())
