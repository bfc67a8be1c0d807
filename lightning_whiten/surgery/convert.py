"""``convert``: replace the batch normalization layers of a model by whitening layers, in place."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..layers import WhiteningNorm, norm_act_class
from .registry import check_layer_options, class_path, import_class, resolve_layer
from .report import ConversionReport, ReplacedModule, SkippedModule
from .select import (
    Candidate,
    Pattern,
    check_patterns_match,
    find_normalization_modules,
    matches,
    normalization_kind,
    normalize_patterns,
    num_channels,
    pattern_to_str,
    preceding_conv,
    stage_of,
)
from .trace import TracedInput, default_example_input, trace_inputs

__all__ = ["NormSource", "convert"]

Placement = Literal["all", "first"]


@dataclass(frozen=True)
class NormSource:
    """How to rebuild the normalization module a whitening layer replaced (used by ``export``)."""

    cls: str
    kind: str  # "batchnorm" or "frozen"
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def build(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        cls = import_class(self.cls)
        if self.kind == "frozen":
            module = cls(self.num_features, eps=self.eps)
        else:
            module = cls(
                self.num_features,
                eps=self.eps,
                momentum=self.momentum,
                affine=self.affine,
                track_running_stats=self.track_running_stats,
            )
        return module.to(device=device, dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _refuse_wrapped(model: nn.Module) -> None:
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    for name, module in model.named_modules():
        if isinstance(module, wrappers) or type(module).__name__ == "FullyShardedDataParallel":
            where = f" (at '{name}')" if name else ""
            raise TypeError(
                f"convert() got a {type(module).__name__}-wrapped model{where}: the wrapper has "
                "already registered the parameters it synchronizes, and the new layers' would "
                "never be synchronized. Convert the plain module first, then wrap it (or use "
                "WhiteningCallback, which converts before Lightning wraps the model)."
            )
    optimized = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    optimized = getattr(optimized, "OptimizedModule", None)
    if optimized is not None:
        for name, module in model.named_modules():
            if isinstance(module, optimized):
                where = f"'{name}'" if name else "the model"
                raise TypeError(
                    f"convert() got a torch.compile'd module ({where}): compiled graphs keep the "
                    "old layers. Convert the original module, then call torch.compile on it."
                )


def _skip_reason(
    c: Candidate,
    cls: type[WhiteningNorm],
    include: list[Pattern],
    exclude: list[Pattern],
    min_channels: int,
    stages: Sequence[int] | None,
    stage_map: dict[int, int],
    frozen: bool,
) -> str | None:
    module = c.module
    if c.kind == "whitening":
        return "already a whitening layer"
    if c.kind == "other":
        return f"{type(module).__name__} is not batch normalization (statistics per sample)"
    if c.kind == "frozen" and not frozen:
        return "frozen BatchNorm (pass frozen=True to convert it)"
    for pattern in exclude:
        if matches(c, pattern):
            return f"excluded by {pattern_to_str(pattern)!r}"
    if include and not any(matches(c, p) for p in include):
        return "not matched by include"
    channels = num_channels(module) or 0
    if channels < min_channels:
        return f"{channels} channels < min_channels={min_channels}"
    if stages is not None and stage_map.get(id(module)) not in stages:
        return f"in stage {stage_map.get(id(module))}, not in stages={list(stages)}"
    if getattr(module, "running_mean", None) is None and not cls._exact_without_running_stats:
        return (
            f"track_running_stats=False: its eval output uses batch statistics, which "
            f"{cls.__name__} cannot reproduce"
        )
    return None


def _producer_blocks(
    model: nn.Module, c: Candidate, traced: dict[int, TracedInput]
) -> tuple[list[int], str] | None:
    """Channel blocks that the producer of ``c``'s input keeps separate, and what it is.

    From the trace of the model's forward when available (the real producer: a convolution, or
    a channel concatenation of convolutions as in timm's ``MixedConv2d``); otherwise the
    convolution registered just before the layer.
    """
    channels = num_channels(c.module)
    t = traced.get(id(c.module))
    if t is not None and t.calls == 1 and t.blocks is not None and sum(t.blocks) == channels:
        assert t.segments is not None
        names = " + ".join(f"{type(s.module).__name__} {s.name}" for s in t.segments)
        return t.blocks, names
    conv = preceding_conv(model, c)
    if conv is None or conv.out_channels != channels or conv.out_channels % conv.groups:
        return None
    width = conv.out_channels // conv.groups
    return [width] * conv.groups, type(conv).__name__


def _conv_group_cap(
    model: nn.Module,
    c: Candidate,
    requested: int,
    caps: dict[int, tuple[int, str]],
    traced: dict[int, TracedInput],
) -> str | None:
    """Skip reason, or record a capped group size, for a layer after a grouped convolution."""
    found = _producer_blocks(model, c, traced)
    if found is None or len(found[0]) == 1:
        return None
    blocks, producer = found
    if min(blocks) == 1:
        return (
            f"follows a depthwise convolution ({producer}): whitening would mix channels it "
            "keeps separate and could not be folded back by export "
            "(respect_conv_groups=False converts it anyway)"
        )
    channels = num_channels(c.module) or requested
    size = min(requested, channels)
    width = math.gcd(*blocks)
    if width % size:
        capped = max(d for d in range(1, min(size, width) + 1) if width % d == 0)
        caps[id(c.module)] = (
            capped,
            f"group_size {requested} -> {capped} to stay inside the channel groups "
            f"({'/'.join(map(str, sorted(set(blocks))))} channels) of the preceding {producer}",
        )
    return None


def _trace_candidates(model: nn.Module, candidates: list[Candidate]) -> dict[int, TracedInput]:
    """Trace the model on a guessed input; an empty result (structural fallback) when the input
    cannot be guessed, the model lives on the meta device, or its forward rejects the guess."""
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        return {}
    example = default_example_input(model)
    if example is None:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return trace_inputs(model, example, [c.module for c in candidates])
    except Exception:  # any failure means: no trace, fall back to module order
        return {}


def _source_of(module: nn.Module, kind: str) -> NormSource:
    return NormSource(
        cls=class_path(type(module)),
        kind=kind,
        num_features=int(num_channels(module) or 0),
        eps=float(getattr(module, "eps", 1e-5)),
        momentum=getattr(module, "momentum", 0.1),
        affine=getattr(module, "weight", None) is not None,
        track_running_stats=getattr(module, "running_mean", None) is not None,
    )


def _build(c: Candidate, cls: type[WhiteningNorm], options: dict[str, Any]) -> WhiteningNorm:
    module = c.module
    kwargs = dict(options)
    act = getattr(module, "act", None)
    if isinstance(act, nn.Module):
        # timm's BatchNormAct2d and friends: keep the activation and drop layer, in order.
        target = norm_act_class(cls)
        kwargs["act"] = act
        drop = getattr(module, "drop", None)
        kwargs["drop"] = drop if isinstance(drop, nn.Module) else None
    else:
        target = cls
    layer = target.from_batchnorm(module, **kwargs)
    layer.qualified_name = c.name
    layer.converted_from = _source_of(module, c.kind)
    return layer


def convert(
    model: nn.Module,
    layer: str | type[WhiteningNorm] = "iternorm",
    *,
    include: Pattern | Sequence[Pattern] | None = None,
    exclude: Pattern | Sequence[Pattern] | None = None,
    min_channels: int = 1,
    placement: Placement = "all",
    stages: Sequence[int] | None = None,
    frozen: bool = False,
    respect_conv_groups: bool = True,
    **layer_options: Any,
) -> ConversionReport:
    """Replace the batch normalization layers of ``model`` by whitening layers, in place.

    Every replacement is built with ``from_batchnorm``, so the converted model's eval output
    equals the original's until training changes it, and parameters keep their names
    (``...weight`` / ``...bias``), ``requires_grad``, device, dtype and the train/eval mode.
    Shared modules stay shared.

    Converted: ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, timm's ``BatchNormAct2d`` and
    ``SyncBatchNormAct`` (their activation and drop keep running, in order: the replacement is
    an ``*Act`` whitening layer), and, with ``frozen=True``, torchvision/timm
    ``FrozenBatchNorm2d`` / ``FrozenBatchNormAct2d``. Other normalizations (GroupNorm, LayerNorm,
    ...) are reported as skipped.

    Args:
        model: the model to modify (not wrapped by DDP, not compiled).
        layer: ``"iternorm"``, ``"dbn"``, ``"swbn"`` or a :class:`WhiteningNorm` subclass.
        include: only convert modules matching these patterns: globs on qualified module names
            (``"layer1"`` selects everything inside ``layer1``, ``"*.bn1"`` every ``bn1``) or
            module types; ``"type:pkg.Class"`` strings name a type.
        exclude: never convert modules matching these patterns.
        min_channels: skip layers with fewer channels.
        placement: ``"all"`` or ``"first"`` (only the first selected normalization layer: the
            IterNorm paper's ImageNet placement).
        stages: only convert layers in these stages (timm ``feature_info`` levels, or
            torchvision ``layer1..N``; stage 0 is the stem).
        frozen: also convert frozen BatchNorm (its affine stays frozen).
        respect_conv_groups: keep whitening groups inside the channel groups of the
            convolution(s) producing the layer's input, so that :func:`export` can fold the
            layer back into them: ``group_size`` is capped to a divisor of the group width (a
            note says so), and a BatchNorm after a depthwise convolution (one channel per group)
            is left as it is (reported as skipped). The producer is found by tracing one eval
            forward pass on a small random batch (timm ``pretrained_cfg`` or the first conv's
            channels; the global RNG is not touched); when that input cannot be guessed, the
            convolution registered just before the layer is used. ``False`` whitens across conv
            groups anyway.
        **layer_options: passed to the layer (``group_size``, ``iterations``, ...). A
            ``group_size`` larger than a layer's channels is clamped to them, with a note.

    Returns:
        A :class:`ConversionReport` of replaced and skipped normalization modules.

    Raises:
        ValueError: unknown layer name, a pattern matching no normalization module, bad options.
        TypeError: options the layer does not take; a DDP-wrapped or compiled model.
    """
    _refuse_wrapped(model)
    cls = resolve_layer(layer)
    check_layer_options(cls, layer_options)
    if placement not in ("all", "first"):
        raise ValueError(f"placement must be 'all' or 'first', got {placement!r}")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 0:
        raise ValueError(f"min_channels must be a non-negative integer, got {min_channels!r}")
    if stages is not None:
        stages = [int(s) for s in ([stages] if isinstance(stages, int) else stages)]
    include_patterns = normalize_patterns(include)
    exclude_patterns = normalize_patterns(exclude)

    candidates = find_normalization_modules(model)
    if normalization_kind(model) is not None:
        raise ValueError(
            f"convert() replaces submodules of a model; for a single {type(model).__name__} use "
            f"{cls.__name__}.from_batchnorm(module)"
        )
    check_patterns_match(include_patterns, candidates, "include", model)
    check_patterns_match(exclude_patterns, candidates, "exclude", model)
    stage_map = stage_of(model, candidates) if stages is not None else {}
    # Validate the option values once, before touching the model (e.g. iterations=0).
    cls(1, **layer_options)

    spec = {
        "layer": layer if isinstance(layer, str) else class_path(layer),
        "options": dict(layer_options),
        "include": [pattern_to_str(p) for p in include_patterns],
        "exclude": [pattern_to_str(p) for p in exclude_patterns],
        "min_channels": min_channels,
        "placement": placement,
        "stages": stages,
        "frozen": frozen,
        "respect_conv_groups": respect_conv_groups,
    }
    report = ConversionReport(layer=cls.__name__, spec=spec)
    selected: list[Candidate] = []
    group_caps: dict[int, tuple[int, str]] = {}
    group_size = layer_options.get("group_size")
    requested = int(cls.default_group_size if group_size is None else group_size)
    traced = _trace_candidates(model, candidates) if respect_conv_groups else {}
    for c in candidates:
        reason = _skip_reason(
            c, cls, include_patterns, exclude_patterns, min_channels, stages, stage_map, frozen
        )
        if reason is None and respect_conv_groups:
            reason = _conv_group_cap(model, c, requested, group_caps, traced)
        if reason is None:
            selected.append(c)
        else:
            report.skipped.append(
                SkippedModule(c.name, type(c.module).__name__, num_channels(c.module), reason)
            )
    if placement == "first":
        for c in selected[1:]:
            report.skipped.append(
                SkippedModule(
                    c.name,
                    type(c.module).__name__,
                    num_channels(c.module),
                    "placement='first': only the first selected layer is converted",
                )
            )
        selected = selected[:1]

    for c in selected:
        options = dict(layer_options)
        if id(c.module) in group_caps:
            options["group_size"] = group_caps[id(c.module)][0]
        new = _build(c, cls, options)
        for parent, attr, _ in c.slots:
            setattr(parent, attr, new)
        notes = []
        if id(c.module) in group_caps:
            notes.append(group_caps[id(c.module)][1])
        elif new.group_size < new.requested_group_size:
            notes.append(
                f"group_size {new.requested_group_size} clamped to {new.group_size} channels"
            )
        if c.kind == "frozen":
            notes.append("was frozen: affine kept frozen (requires_grad=False)")
        if len(c.slots) > 1:
            notes.append("shared, also at " + ", ".join(c.names[1:]))
        report.replaced.append(
            ReplacedModule(
                c.name,
                type(c.module).__name__,
                type(new).__name__,
                new.num_features,
                new.group_sizes,
                tuple(notes),
            )
        )

    order = {c.name: c.index for c in candidates}
    report.replaced.sort(key=lambda r: order[r.name])
    report.skipped.sort(key=lambda s: order[s.name])
    return report
