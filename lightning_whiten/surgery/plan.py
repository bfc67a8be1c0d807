"""``plan_conversion``: decide, without changing anything, what a conversion will do and why.

A :class:`ConversionPlan` holds one :class:`Decision` per candidate module (replace or skip,
with the reason), the options each replacement gets (a group size capped to a producer's
channel groups), how the producer of its input was found, and whether tracing the model
worked. :meth:`ConversionPlan.apply` carries the plan out; :func:`lightning_whiten.convert` is
``plan_conversion(model, spec).apply(model)``.
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..registry import NormFamily
from .insert import NormalizedInput, input_channels, insertion_problem
from .report import ConversionReport, ReplacedModule, SkippedModule
from .select import check_patterns_match, matches, pattern_to_str, preceding_conv, stage_of
from .source import NormSource, Origin
from .spec import ConversionSpec
from .targets import Candidate, find_targets, normalization_kind, num_channels
from .trace import TracedInput, default_example_input, trace_inputs

__all__ = ["ConversionPlan", "Decision", "Producer", "TraceOutcome", "plan_conversion"]


@dataclass(frozen=True)
class Producer:
    """What computes a module's input: ``"Conv2d layer1.0.conv2"``, and how that was found."""

    description: str
    found_by: Literal["trace", "module order"]
    blocks: tuple[int, ...] = ()  # the channel widths the producer keeps separate

    def __str__(self) -> str:
        return f"{self.description} ({self.found_by})"


@dataclass(frozen=True)
class TraceOutcome:
    """Whether the model's forward was traced to find producers: ``"traced"``, ``"failed"``
    (producers then come from module order; ``detail`` holds the error) or ``"not needed"``."""

    status: Literal["traced", "failed", "not needed"]
    detail: str = ""
    shape: tuple[int, ...] | None = None  # of the input traced on, when it worked

    def __str__(self) -> str:
        return self.status + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class Decision:
    """What happens to one candidate module, and why."""

    name: str
    module_type: str
    channels: int | None
    replace: bool
    reason: str  # why it is skipped; "selected" for a replacement
    options: dict[str, Any] = field(default_factory=dict)  # per-module option overrides
    notes: tuple[str, ...] = ()
    producer: Producer | None = None
    also: tuple[str, ...] = ()  # other names of a shared module
    insert: bool = False  # a new layer at this module's input (``spec.insert``)
    drop: bool = False  # removed: it follows a converted convolution (``drop_following_norm``)
    no_producer: str = ""  # why ``producer`` is None, for the report's producer column


@dataclass
class ConversionPlan:
    """The decisions of a conversion, before anything changes (see :func:`plan_conversion`)."""

    spec: ConversionSpec
    decisions: list[Decision]
    trace: TraceOutcome
    _modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    @property
    def family(self) -> NormFamily:
        return self.spec.family

    @property
    def to_replace(self) -> list[Decision]:
        return [d for d in self.decisions if d.replace]

    @property
    def to_skip(self) -> list[Decision]:
        return [d for d in self.decisions if not (d.replace or d.insert or d.drop)]

    @property
    def to_drop(self) -> list[Decision]:
        return [d for d in self.decisions if d.drop]

    @property
    def to_insert(self) -> list[Decision]:
        return [d for d in self.decisions if d.insert]

    def report(self, applied: bool = False) -> ConversionReport:
        """The plan as a :class:`ConversionReport` (``applied=False``: a dry run)."""
        family = self.family
        replaced = [
            ReplacedModule(
                d.name,
                d.module_type,
                _new_type(family, self._modules.get(d.name)),
                d.channels or 0,
                _group_sizes(family, d, self.spec),
                d.notes,
                str(d.producer) if d.producer is not None else (d.no_producer or None),
            )
            for d in self.to_replace
        ]
        inserted = [
            ReplacedModule(
                f"{d.name}.norm",
                "-",
                family.layer.__name__,
                d.channels or 0,
                _group_sizes(family, d, self.spec),
                d.notes,
            )
            for d in self.to_insert
        ]
        removed = [
            ReplacedModule(
                d.name,
                d.module_type,
                type(_without_norm(self._modules[d.name])).__name__,
                d.channels or 0,
                (),
                d.notes,
                None if d.producer is None else str(d.producer),
            )
            for d in self.to_drop
        ]
        skipped = [
            SkippedModule(
                d.name,
                d.module_type,
                d.channels,
                d.reason,
                None if d.producer is None else str(d.producer),
            )
            for d in self.to_skip
        ]
        return ConversionReport(
            family.layer.__name__, self.spec, replaced, skipped, str(self.trace), applied,
            inserted, removed,
        )  # fmt: skip

    def table(self):
        """A :class:`rich.table.Table` of the decisions (the dry run)."""
        return self.report().table()

    def __str__(self) -> str:
        return str(self.report())

    def apply(self, model: nn.Module) -> ConversionReport:
        """Carry the plan out on ``model`` (the model it was made for), in place."""
        family = self.family
        for d in [*self.to_replace, *self.to_insert, *self.to_drop]:
            module = self._modules[d.name]
            for name in (d.name, *d.also):
                try:
                    current = model.get_submodule(name)
                except AttributeError:
                    current = None
                if current is not module:
                    raise RuntimeError(
                        f"the plan does not fit this model: '{name}' is not the module it was "
                        "planned for (plan again with plan_conversion)"
                    )
        for d in self.to_replace:
            module = self._modules[d.name]
            options = {**self.spec.options, **d.options}
            new = family.create(module, options)
            kind = normalization_kind(module)
            source = NormSource.of(module, kind) if family.targets == "batchnorm" else None
            new.origin = Origin(d.name, source, self.trace.shape)  # type: ignore[attr-defined]
            for name in (d.name, *d.also):
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name), attr, new)
        for d in self.to_insert:
            module = self._modules[d.name]
            ref = next(iter(module.parameters()))
            options = {**self.spec.options, **d.options}
            norm = family.layer(d.channels, device=ref.device, dtype=ref.dtype, **options)
            norm.train(module.training)
            norm.origin = Origin(f"{d.name}.norm")  # type: ignore[attr-defined]
            parent_name, _, attr = d.name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, NormalizedInput(norm, module))
        for d in self.to_drop:
            kept = _without_norm(self._modules[d.name])
            for name in (d.name, *d.also):
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name), attr, kept)
        report = self.report(applied=True)
        if not report.replaced and not report.inserted:
            warnings.warn(self._nothing_replaced(), UserWarning, stacklevel=3)
        if self.trace.status == "failed":
            warnings.warn(
                f"convert: tracing the model's forward failed ({self.trace.detail}); producers of "
                "each layer's input were taken from module order, which can miss a grouped "
                "convolution in another block (see the report's 'producer' column)",
                UserWarning,
                stacklevel=3,
            )
        return report

    def _nothing_replaced(self) -> str:
        family = self.family
        what = "BatchNorm layers" if family.targets == "batchnorm" else "2-D convolutions"
        present = Counter(d.module_type for d in self.decisions)
        if not present:
            found = f"the model has no {what} or other normalization layers"
        else:
            listed = ", ".join(f"{name} ({n})" for name, n in present.most_common())
            found = f"the model uses {listed}, none of them converted (reasons in the report)"
        return f"convert: nothing was converted to {family.layer.__name__}, which replaces {what}: {found}"


def _new_type(family: NormFamily, module: nn.Module | None) -> str:
    if family.act_layer is not None and isinstance(getattr(module, "act", None), nn.Module):
        return family.act_layer.__name__
    return family.layer.__name__


def _group_sizes(family: NormFamily, d: Decision, spec: ConversionSpec) -> tuple[int, ...]:
    if family.group_option is None or not d.channels:
        return ()
    from ..functional import group_layout

    size = {**spec.options, **d.options}.get(family.group_option)
    if size is None:
        size = family.options[family.group_option]
    return group_layout(d.channels, int(size)).sizes


def _sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds a DTensor parameter or buffer (FSDP2, tensor parallelism)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return any(isinstance(t, DTensor) for t in tensors)


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


def _trace(
    model: nn.Module, candidates: list[Candidate], example: Tensor | None
) -> tuple[dict[int, TracedInput], TraceOutcome]:
    """Trace the model on ``example`` (or a guessed input) to find each candidate's producer."""
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        return {}, TraceOutcome("failed", "the model is on the meta device")
    if example is None:
        example = default_example_input(model)
    if example is None:
        return {}, TraceOutcome("failed", "no example input could be guessed for this model")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = trace_inputs(model, example, [c.module for c in candidates])
    except Exception as err:  # the forward rejected the guessed input: fall back, and say so
        return {}, TraceOutcome("failed", f"{type(err).__name__}: {err}".splitlines()[0][:200])
    return traced, TraceOutcome("traced", shape=tuple(example.shape))


def _producer(model: nn.Module, c: Candidate, traced: dict[int, TracedInput]) -> Producer | None:
    """The producer of ``c``'s input: from the trace when it saw the layer called once on (a
    channel concatenation of) convolution outputs; else the convolution registered before it."""
    channels = num_channels(c.module)
    t = traced.get(id(c.module))
    if t is not None and t.calls == 1 and t.blocks is not None and sum(t.blocks) == channels:
        assert t.segments is not None
        names = " + ".join(f"{type(s.module).__name__} {s.name}" for s in t.segments)
        return Producer(names, "trace", tuple(t.blocks))
    conv = preceding_conv(model, c)
    if conv is None or conv.out_channels != channels or conv.out_channels % conv.groups:
        return None
    width = conv.out_channels // conv.groups
    parent = c.name.rpartition(".")[0]
    conv_name = next((n for n, m in model.named_modules() if m is conv), parent)
    return Producer(f"{type(conv).__name__} {conv_name}", "module order", (width,) * conv.groups)


def _no_producer(c: Candidate, traced: dict[int, TracedInput], outcome: TraceOutcome) -> str:
    """Why ``c`` has no producer, as the report's producer column says it: export can fold a
    layer only into the convolution or linear layer whose output is its input."""
    if outcome.status != "traced":
        return "unknown: the trace failed (see the title)"
    t = traced.get(id(c.module))
    if t is None:
        return "none: not called on the traced input"
    if t.segments is None:
        return "none: not a conv/linear output (export: 1x1 map)"
    return f"none: {t.problem or 'channels differ from the producer'} (export: 1x1 map)"


def _group_cap(requested: int, channels: int, producer: Producer, option: str) -> tuple[int | None, str | None]:  # fmt: skip
    """``(capped size or None, skip reason or None)`` for a layer after a grouped producer."""
    blocks = producer.blocks
    if min(blocks) == 1:
        return None, (
            "follows a depthwise convolution: whitening would mix channels it keeps separate "
            "and could not be folded back by export (respect_conv_groups=False converts it "
            "anyway)"
        )
    size = min(requested, channels)
    width = math.gcd(*blocks)
    if width % size == 0:
        return None, None
    capped = max(d for d in range(1, min(size, width) + 1) if width % d == 0)
    return capped, (
        f"{option} {requested} -> {capped} to stay inside the channel groups "
        f"({'/'.join(map(str, sorted(set(blocks))))} channels) of the producer"
    )


def _skip_reason(
    c: Candidate, spec: ConversionSpec, stage_map: dict[int, int], what: str
) -> str | None:
    module, family = c.module, spec.family
    if c.kind == "converted":
        return f"already converted ({type(module).__name__})"
    if c.kind == "other":
        if family.targets == "batchnorm":
            return f"{type(module).__name__} is not batch normalization (statistics per sample)"
        return f"{type(module).__name__} is not a plain 2-D convolution"
    if c.kind == "frozen" and not spec.frozen:
        return "frozen BatchNorm (pass frozen=True to convert it)"
    if spec.types and not any(isinstance(module, t) for t in spec.types):
        return (
            f"{type(module).__name__} is not one of types={[pattern_to_str(t) for t in spec.types]}"
        )
    for pattern in spec.exclude:
        if matches(c, pattern):
            return f"excluded by {pattern_to_str(pattern)!r}"
    if spec.include and not any(matches(c, p) for p in spec.include):
        return "not matched by include"
    channels = num_channels(module) or 0
    if channels < spec.min_channels:
        return f"{channels} channels < min_channels={spec.min_channels}"
    if spec.stages is not None and stage_map.get(id(module)) not in spec.stages:
        return f"in stage {stage_map.get(id(module))}, not in stages={list(spec.stages)}"
    if family.targets == "conv2d" and getattr(module, "groups", 1) != 1:
        kind = "depthwise" if module.groups == getattr(module, "in_channels", 0) else "grouped"
        return (
            f"{kind} convolution (groups={module.groups}): {family.layer.__name__} needs groups=1"
        )
    if (
        family.targets == "batchnorm"
        and getattr(module, "running_mean", None) is None
        and not getattr(family.layer, "exact_without_running_stats", False)
    ):
        return (
            f"track_running_stats=False: its eval output uses batch statistics, which "
            f"{family.layer.__name__} cannot reproduce"
        )
    if (
        family.targets == "batchnorm"
        and family.act_layer is None
        and isinstance(getattr(module, "act", None), nn.Module)
    ):
        return (
            f"{type(module).__name__} fuses an activation and family {family.name!r} has no "
            "act_layer to keep it"
        )
    return None


def plan_conversion(
    model: nn.Module, spec: ConversionSpec, example_input: Tensor | None = None
) -> ConversionPlan:
    """What converting ``model`` with ``spec`` would do, without changing anything.

    ``example_input`` (a small batch) is what the forward is traced on to find the producer of
    each layer's input; when omitted, one is guessed (timm ``pretrained_cfg`` or the first
    convolution's channels). The plan records whether the trace worked.

    Raises:
        ValueError: a pattern matching no candidate module; the model itself is a candidate.
        TypeError: a DDP-wrapped or compiled model.
    """
    _refuse_wrapped(model)
    family = spec.family
    what = "normalization module" if family.targets == "batchnorm" else "convolution"
    candidates = find_targets(model, family.targets)
    if normalization_kind(model) is not None or isinstance(model, nn.Conv2d):
        raise ValueError(
            f"convert() replaces submodules of a model; for a single {type(model).__name__} use "
            f"{family.layer.__name__}."
            + ("from_batchnorm(module)" if family.targets == "batchnorm" else "from_conv(module)")
        )
    for option in ("include", "exclude", "types"):
        check_patterns_match(list(getattr(spec, option)), candidates, option, model, what)
    stage_map = stage_of(model, candidates) if spec.stages is not None else {}
    for c in candidates:
        if _sharded(c.module) and _skip_reason(c, spec, stage_map, what) is None:
            raise TypeError(
                f"convert(): '{c.name}' ({type(c.module).__name__}) already holds sharded "
                "(DTensor) parameters: FSDP2's fully_shard (or tensor parallelism) has registered "
                "the parameters it shards and reduces, and a new layer's would be neither (the "
                "processes' copies drift apart). Convert before sharding: WhiteningCallback "
                "converts layers built in __init__ before configure_model; layers built in "
                "configure_model need lightning_whiten.convert_in_configure_model(self) (or "
                "convert) there, before fully_shard."
            )

    mixes = family.group_option is not None and spec.respect_conv_groups
    traced: dict[int, TracedInput] = {}
    outcome = TraceOutcome("not needed")
    requested = 0
    if mixes:
        assert family.group_option is not None
        traced, outcome = _trace(model, candidates, example_input)
        size = spec.options.get(family.group_option)
        requested = int(family.options[family.group_option] if size is None else size)

    decisions: list[Decision] = []
    modules: dict[str, nn.Module] = {}
    selected = 0
    for c in candidates:
        reason = _skip_reason(c, spec, stage_map, what)
        channels = num_channels(c.module)
        options: dict[str, Any] = {}
        notes: list[str] = []
        producer = None
        no_producer = ""
        if reason is None and mixes:
            assert family.group_option is not None
            producer = _producer(model, c, traced)
            if producer is None:
                no_producer = _no_producer(c, traced, outcome)
            if producer is not None and len(producer.blocks) > 1:
                capped, note = _group_cap(requested, channels or requested, producer, family.group_option)  # fmt: skip
                if capped is None and note is not None:
                    reason = note
                elif capped is not None:
                    options[family.group_option] = capped
                    notes.append(note or "")
            if reason is None and not options and channels and requested > channels:
                notes.append(f"{family.group_option} {requested} clamped to {channels} channels")
        if reason is None and spec.placement == "first" and selected:
            reason = "placement='first': only the first selected layer is converted"
        if reason is None:
            selected += 1
            if c.kind == "frozen":
                notes.append("was frozen: affine kept frozen (requires_grad=False)")
            if len(c.slots) > 1:
                notes.append("shared, also at " + ", ".join(c.names[1:]))
            modules[c.name] = c.module
        decisions.append(
            Decision(
                c.name,
                type(c.module).__name__,
                channels,
                reason is None,
                reason or "selected",
                options,
                tuple(notes),
                producer,
                tuple(c.names[1:]),
                no_producer=no_producer,
            )
        )
    decisions += _insertions(model, spec, modules)
    if spec.drop_following_norm:
        decisions += _following_norms(model, modules, example_input)
    return ConversionPlan(spec, decisions, outcome, modules)


def _following_norms(
    model: nn.Module, converted: dict[str, nn.Module], example: Tensor | None
) -> list[Decision]:
    """Decisions removing each normalization layer whose input is exactly the output of one
    converted convolution (``drop_following_norm``). Only a traced producer counts: module
    order could name a layer that does not follow the convolution, and removing that one would
    silently change the model."""
    convs = {id(m): n for n, m in converted.items()}
    norms = find_targets(model, "batchnorm")
    if not norms or not convs:
        return []
    traced, outcome = _trace(model, norms, example)
    if outcome.status != "traced":
        raise ValueError(
            "drop_following_norm: tracing the model's forward failed "
            f"({outcome.detail}), so the layers that follow each convolution are unknown; "
            "pass example_input (a small input batch) to convert"
        )
    decisions = []
    for c in norms:
        t = traced.get(id(c.module))
        if t is None or t.calls != 1 or not t.segments or len(t.segments) != 1:
            continue
        conv = t.segments[0]
        if id(conv.module) not in convs:
            continue
        converted[c.name] = c.module
        decisions.append(
            Decision(
                c.name,
                type(c.module).__name__,
                num_channels(c.module),
                False,
                "follows a converted convolution (drop_following_norm)",
                notes=(f"removed: follows {convs[id(conv.module)]} (drop_following_norm)",),
                producer=Producer(f"{type(conv.module).__name__} {conv.name}", "trace"),
                also=tuple(c.names[1:]),
                drop=True,
            )
        )
    return decisions


def _without_norm(module: nn.Module) -> nn.Module:
    """What is left of a normalization layer without its normalization: ``nn.Identity``, or
    a fused layer's drop and activation (timm ``BatchNormAct2d``), in their order."""
    rest = [
        m for m in (getattr(module, "drop", None), getattr(module, "act", None)) if m is not None
    ]
    rest = [m for m in rest if not isinstance(m, nn.Identity)]
    if not rest:
        return nn.Identity()
    return rest[0] if len(rest) == 1 else nn.Sequential(*rest)


def _insertions(
    model: nn.Module, spec: ConversionSpec, modules: dict[str, nn.Module]
) -> list[Decision]:
    """Decisions for ``spec.insert``: every module a pattern names gets a new layer at its
    input; a pattern that names nothing insertable is an error."""
    decisions = []
    named = dict(model.named_modules())
    for pattern in spec.insert:
        hits = [n for n in named if n and fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, list(named), n=3, cutoff=0.5)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ValueError(f"insert pattern {pattern!r} matches no module{hint}")
        for name in hits:
            module = named[name]
            problem = insertion_problem(module)
            if problem is not None:
                raise ValueError(
                    f"insert pattern {pattern!r}: cannot insert a layer at the input of "
                    f"'{name}': {problem}"
                )
            modules[name] = module
            decisions.append(
                Decision(
                    name,
                    type(module).__name__,
                    input_channels(module),
                    False,
                    f"a new layer at its input (insert={pattern!r})",
                    notes=(f"inserted at the input of {type(module).__name__} {name}",),
                    insert=True,
                )
            )
    return decisions
