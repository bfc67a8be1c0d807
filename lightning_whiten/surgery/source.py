"""Where a converted layer came from: its name in the model and the module it replaced."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .classpath import class_path, import_class
from .targets import TargetKind, num_channels

__all__ = ["NormSource", "Origin"]


@dataclass(frozen=True)
class NormSource:
    """How to rebuild the normalization module a layer replaced (``export`` puts it back)."""

    cls: str
    kind: TargetKind
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    @classmethod
    def of(cls, module: nn.Module, kind: TargetKind) -> NormSource:
        return cls(
            cls=class_path(type(module)),
            kind=kind,
            num_features=int(num_channels(module) or 0),
            eps=float(getattr(module, "eps", 1e-5)),
            momentum=getattr(module, "momentum", 0.1),
            affine=getattr(module, "weight", None) is not None,
            track_running_stats=getattr(module, "running_mean", None) is not None,
        )

    def build(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        # Written by convert from a live module of this process, never read from a file.
        module_cls = import_class(self.cls)
        if self.kind == "frozen":
            module = module_cls(self.num_features, eps=self.eps)
        else:
            module = module_cls(
                self.num_features,
                eps=self.eps,
                momentum=self.momentum,
                affine=self.affine,
                track_running_stats=self.track_running_stats,
            )
        return module.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class Origin:
    """Set on every layer that :func:`~lightning_whiten.convert` puts in a model
    (``layer.origin``): its qualified name (for messages) and, for normalization targets, the
    module it replaced (for ``export``)."""

    name: str
    source: NormSource | None = None
    #: The shape of the input ``convert`` traced the model on successfully (``None``: not
    #: traced); ``export`` without ``example_input`` traces a random batch of this shape.
    example_shape: tuple[int, ...] | None = None
