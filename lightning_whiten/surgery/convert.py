"""``convert``: replace the normalization layers of a model, in place (plan, then apply)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .plan import plan_conversion
from .report import ConversionReport
from .select import Pattern
from .spec import ConversionSpec, Placement

__all__ = ["convert"]


def convert(
    model: nn.Module,
    layer: str | type[nn.Module] | ConversionSpec = "iternorm",
    *,
    include: Pattern | Sequence[Pattern] | None = None,
    exclude: Pattern | Sequence[Pattern] | None = None,
    types: Pattern | Sequence[Pattern] | None = None,
    min_channels: int = 1,
    placement: Placement = "all",
    stages: Sequence[int] | None = None,
    frozen: bool = False,
    respect_conv_groups: bool = True,
    insert: str | Sequence[str] | None = None,
    drop_following_norm: bool = False,
    example_input: Tensor | None = None,
    **layer_options: Any,
) -> ConversionReport:
    """Replace the batch normalization layers of ``model`` by whitening (or other registered)
    layers, in place: ``plan_conversion(model, spec).apply(model)``.

    Every replacement is built with ``from_batchnorm``, so the converted model's eval output
    equals the original's until training changes it, and parameters keep their names
    (``...weight`` / ``...bias``), ``requires_grad``, device, dtype and the train/eval mode.
    Shared modules stay shared.

    Converted: ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, timm's ``BatchNormAct2d`` and
    ``SyncBatchNormAct`` (their activation and drop keep running, in order: the replacement is
    the family's ``*Act`` layer), and, with ``frozen=True``, torchvision/timm
    ``FrozenBatchNorm2d`` / ``FrozenBatchNormAct2d``. Other normalizations (GroupNorm, LayerNorm,
    ...) are reported as skipped. Families that replace convolutions (``targets="conv2d"``)
    select ``nn.Conv2d`` modules the same way.

    Args:
        model: the model to modify (not wrapped by DDP, not compiled).
        layer: a registered family name (``"iternorm"``, ``"dbn"``, ``"swbn"``, ...), a layer
            class, or a whole :class:`ConversionSpec` (then no other argument is allowed).
        include, exclude, types, min_channels, placement, stages, frozen: selection, see
            :class:`ConversionSpec`.
        respect_conv_groups: keep whitening groups inside the channel groups of the
            convolution(s) producing the layer's input, so that :func:`export` can fold the
            layer back into them: ``group_size`` is capped to a divisor of the group width (a
            note says so), and a BatchNorm after a depthwise convolution (one channel per group)
            is left as it is (reported as skipped). The producer is found by tracing one eval
            forward pass on a small random batch (timm ``pretrained_cfg`` or the first conv's
            channels; the global RNG is not touched); when that fails, the convolution
            registered just before the layer is used and the report says so. ``False`` whitens
            across conv groups anyway. Per-channel families ignore it.
        insert: names (globs) of linear layers or unpadded convolutions that get a new layer at
            their input, e.g. ``"fc"`` (decorrelated features before the classifier); ``export``
            folds it into that layer.
        drop_following_norm: with ``"convnorm"``, also remove the normalization layer right
            after each converted convolution (see :class:`ConversionSpec`).
        example_input: a small input batch to trace the forward on (guessed when omitted).
        **layer_options: passed to the layer (``group_size``, ``iterations``, ...). A
            ``group_size`` larger than a layer's channels is clamped to them, with a note.

    Returns:
        A :class:`ConversionReport` of replaced and skipped modules.

    Raises:
        ValueError: unknown layer name, a pattern matching no candidate module, bad options.
        TypeError: options the layer does not take; a DDP-wrapped or compiled model.
    """
    selection = {
        "include": include,
        "exclude": exclude,
        "types": types,
        "min_channels": min_channels,
        "placement": placement,
        "stages": stages,
        "frozen": frozen,
        "respect_conv_groups": respect_conv_groups,
        "insert": insert,
        "drop_following_norm": drop_following_norm,
    }
    if isinstance(layer, ConversionSpec):
        defaults = ConversionSpec.of().to_dict()
        given = [k for k, v in selection.items() if v is not None and v != defaults[k]]
        if given or layer_options:
            raise TypeError(
                "convert(model, spec) takes the whole conversion from the spec; got also "
                f"{sorted([*given, *layer_options])} (use spec.replace(...))"
            )
        spec = layer
    else:
        spec = ConversionSpec.of(layer, **selection, **layer_options)
    return plan_conversion(model, spec, example_input).apply(model)
