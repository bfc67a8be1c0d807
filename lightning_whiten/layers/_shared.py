"""What every layer base of this package shares: float32 buffers under half-precision casts,
the checks of an input tensor, and what ``from_batchnorm`` reads of a BatchNorm."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "FLOAT_BUFFER_DTYPES",
    "BatchNormState",
    "Float32Buffers",
    "check_eps",
    "check_input",
    "check_momentum",
    "read_batchnorm",
]

FLOAT_BUFFER_DTYPES = (torch.float32, torch.float64)


class Float32Buffers(nn.Module):
    """Keeps the module's floating-point buffers in at least float32 when it is cast to
    fp16/bf16 (``module.half()``, ``Trainer(precision="16-true")``): a running average in half
    precision drifts. A buffer that was float32/float64 before the cast is put back to float32;
    parameters follow the cast as usual."""

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        dtypes = {name: buf.dtype for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if (
                buf is not None
                and buf.dtype.is_floating_point
                and buf.dtype not in FLOAT_BUFFER_DTYPES
                and dtypes.get(name) in FLOAT_BUFFER_DTYPES
            ):
                self._buffers[name] = buf.to(torch.float32)
        return self


def check_input(layer: str, x: object, num_features: int) -> None:
    """A ``TypeError``/``ValueError`` naming ``layer`` unless ``x`` is a floating-point tensor
    of shape ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)`` with
    ``C == num_features``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{layer}: expected a Tensor input, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{layer}: expected a floating-point input, got dtype {x.dtype}")
    if not 2 <= x.dim() <= 5:
        raise ValueError(
            f"{layer}: expected an input of shape (N, C), (N, C, L), (N, C, H, W) "
            f"or (N, C, D, H, W), got shape {tuple(x.shape)}"
        )
    if x.shape[1] != num_features:
        raise ValueError(
            f"{layer}: expected {num_features} channels (num_features) in "
            f"dim 1, got input of shape {tuple(x.shape)}"
        )


@dataclass(frozen=True)
class BatchNormState:
    """What ``from_batchnorm`` reads of the normalization module it replaces."""

    module: nn.Module
    num_features: int
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    eps: float

    @property
    def tracks(self) -> bool:
        """Whether it has running statistics (``track_running_stats=True``)."""
        return self.running_mean is not None and self.running_var is not None

    def layer_options(self) -> dict[str, Any]:
        """The constructor options it implies: ``affine``, ``track_running_stats`` and the
        ``device``/``dtype`` of its tensors."""
        ref = self.weight if self.weight is not None else self.running_mean
        assert ref is not None
        return {
            "affine": self.weight is not None,
            "track_running_stats": self.tracks,
            "device": ref.device,
            "dtype": ref.dtype if ref.dtype.is_floating_point else None,
        }

    def copy_trainability(self, layer: nn.Module) -> None:
        """Give the new affine parameters the old ones' ``requires_grad`` (a frozen BatchNorm's
        buffers stay frozen)."""
        for name, old in (("weight", self.weight), ("bias", self.bias)):
            new = getattr(layer, name, None)
            if new is not None and old is not None:
                new.requires_grad_(isinstance(old, nn.Parameter) and old.requires_grad)

    def copy_counter(self, layer: nn.Module) -> None:
        """Carry ``num_batches_tracked`` over (schedules and resumes read it)."""
        tracked = getattr(self.module, "num_batches_tracked", None)
        if tracked is not None and getattr(layer, "num_batches_tracked", None) is not None:
            with torch.no_grad():
                layer.num_batches_tracked.copy_(tracked)


def read_batchnorm(bn: nn.Module, caller: str) -> BatchNormState:
    """The state of ``bn`` (any BatchNorm-like module: torch's, timm's fused and frozen ones),
    or a ``ValueError`` naming ``caller`` when it has neither affine weights nor running
    statistics."""
    running_mean = getattr(bn, "running_mean", None)
    running_var = getattr(bn, "running_var", None)
    weight = getattr(bn, "weight", None)
    ref = weight if weight is not None else running_mean
    if ref is None:
        raise ValueError(
            f"{caller}: {type(bn).__name__} has neither affine weights nor running statistics; "
            "nothing to convert"
        )
    return BatchNormState(
        bn,
        int(getattr(bn, "num_features", ref.numel())),
        weight,
        getattr(bn, "bias", None),
        running_mean,
        running_var,
        float(getattr(bn, "eps", 1e-5)),
    )


def check_eps(owner: str, value: Any) -> float:
    """``eps`` as a float, or a ``ValueError`` naming ``owner`` unless it is a positive finite
    number (checked at construction and on every assignment: schedules change it)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
        or not math.isfinite(value)
    ):
        raise ValueError(f"{owner}: eps must be a positive number, got {value!r}")
    return float(value)


def check_momentum(owner: str, value: Any, allow_none: bool = True) -> None:
    """A ``ValueError`` naming ``owner`` unless ``value`` is a number in [0, 1] (or ``None``,
    a cumulative average, where ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{owner}: momentum must be a number in [0, 1]{extra}, got {value!r}")
