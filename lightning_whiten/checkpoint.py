"""Loading checkpoints of whitened models without the callback (plain PyTorch)."""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import nn

from .layers import WhiteningNorm
from .surgery import convert

__all__ = [
    "CHECKPOINT_KEY",
    "apply_layer_attributes",
    "conversion_spec",
    "layer_attributes",
    "load_converted",
]

#: Key under which ``WhiteningCallback`` stores the conversion spec in a Lightning checkpoint.
CHECKPOINT_KEY = "lightning_whiten"


def conversion_spec(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The conversion recorded in a (loaded) checkpoint by ``WhiteningCallback``."""
    entry = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not entry or "spec" not in entry:
        raise ValueError(
            "the checkpoint holds no whitening conversion: it was not written by a Trainer with "
            "WhiteningCallback (load it with load_state_dict into the original model instead)"
        )
    return entry["spec"]


def layer_attributes(model: nn.Module, scheduler: Any = None) -> dict[str, dict[str, Any]]:
    """``{module name: {attribute: value}}``: the schedulable attributes of every whitening
    layer (``iterations``, ``eps``, ``whitening_rate``, ...) and every attribute ``scheduler``
    (a :class:`~lightning_whiten.schedules.LayerScheduler`) drives on other modules."""
    attributes: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, WhiteningNorm):
            attributes[name] = {a: getattr(module, a) for a in module.schedulable}
    if scheduler is not None:
        for name, values in scheduler.scheduled_attributes().items():
            attributes.setdefault(name, {}).update(values)
    return attributes


def apply_layer_attributes(model: nn.Module, attributes: dict[str, dict[str, Any]]) -> None:
    """Set the attributes recorded by :func:`layer_attributes` on a rebuilt model."""
    for name, values in attributes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the checkpoint records attributes of {name!r}, which the rebuilt model lacks"
            ) from None
        for attribute, value in values.items():
            setattr(module, attribute, value)


def convert_from_spec(model: nn.Module, spec: dict[str, Any]):
    """Redo a recorded conversion on a freshly built model (same selection, same options)."""
    options = dict(spec.get("options", {}))
    kwargs = {k: spec[k] for k in ("include", "exclude", "min_channels", "placement", "stages",
                                    "frozen", "respect_conv_groups") if k in spec}  # fmt: skip
    return convert(model, spec["layer"], **kwargs, **options)


def load_converted(
    module: nn.Module | type[nn.Module],
    checkpoint_path: str | os.PathLike,
    *,
    map_location: Any = "cpu",
    strict: bool = True,
    weights_only: bool | None = None,
    **init_kwargs: Any,
) -> nn.Module:
    """Rebuild the whitened architecture stored in a checkpoint and load its weights strictly.

    Works without the callback and without a Trainer: the checkpoint records how the model was
    converted, so the same conversion is redone on a freshly built model before loading, and
    the layer attributes schedules had reached (``iterations``, ``eps``, ...) are set back.

    Args:
        module: a LightningModule (or ``nn.Module``) class, instantiated from the checkpoint's
            ``hyper_parameters`` (and ``init_kwargs``), or an instance with the original
            (unconverted) architecture. ``configure_model`` is called if defined.
        checkpoint_path: a checkpoint written by a Trainer with ``WhiteningCallback``.
        map_location, weights_only: passed to ``torch.load``.
        strict: passed to ``load_state_dict``.

    Returns:
        The converted module with the checkpoint's weights, in eval mode.
    """
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=weights_only)
    spec = conversion_spec(checkpoint)
    if isinstance(module, type):
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        hparams.update(init_kwargs)
        signature = inspect.signature(module.__init__)
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            hparams = {k: v for k, v in hparams.items() if k in signature.parameters}
        module = module(**hparams)
    configure = getattr(module, "configure_model", None)
    if callable(configure):
        configure()
    convert_from_spec(module, spec)
    apply_layer_attributes(module, checkpoint[CHECKPOINT_KEY].get("attributes", {}))
    module.load_state_dict(checkpoint.get("state_dict", checkpoint), strict=strict)
    return module.eval()
