"""``export``: turn every converted layer into plain torch modules for deployment.

In eval, a whitening layer (or any layer whose family folds) is the affine map ``y = A x + b``
with a block-diagonal ``A`` (``weight * running_whitening`` per group for whitening; diagonal
for per-channel layers) and ``b = bias - A running_mean``. ``export`` folds
that map into the convolution or linear layer that produces the layer's input, where that is
exact, and puts back a normalization module of the original type holding identity statistics,
so the exported model has the original architecture and its ``state_dict`` loads strictly into
a freshly created model. Elsewhere a per-channel layer (LpNorm, StreamingNorm) becomes the
original normalization module holding its eval map (the architecture is kept), and a whitening
layer a 1x1 convolution (or linear) with the block-diagonal weight, followed by the original
activation (the architecture changes there). The rules: ``docs/guide/export.md``.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..functional import group_layout
from ..layers.norm_act import NormActMixin
from ..registry import family_of
from .insert import NormalizedInput, fold_input_map
from .source import NormSource
from .trace import Segment, default_example_input, trace_inputs

__all__ = ["ExportPlan", "eval_affine", "export", "fold_into_producer", "plan_export"]

_LINEAR_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward}


@dataclass
class _Site:
    name: str
    layer: nn.Module
    slots: list[tuple[nn.Module, str]]
    input_dim: int | None = None
    segments: list[Segment] | None = None  # the convolution(s)/linear producing its input
    reason: str | None = None  # why it is not folded

    @property
    def folds(self) -> bool:
        return self.segments is not None and self.reason is None

    @property
    def producer(self) -> str | None:
        return None if self.segments is None else " + ".join(s.name for s in self.segments)


@dataclass
class ExportPlan:
    """Which layers are folded into their producer and which are not (and why).

    ``unfolded`` layers become 1x1 convolution/linear maps (whitening layers: the architecture
    changes there); ``restored`` ones, per-channel layers that cannot fold, become their
    original normalization module holding the eval map (the architecture is kept).
    """

    folded: dict[str, str] = field(default_factory=dict)  # layer name -> producer name
    unfolded: dict[str, str] = field(default_factory=dict)  # layer name -> reason
    restored: dict[str, str] = field(default_factory=dict)  # layer name -> why not folded

    def __str__(self) -> str:
        lines = [
            f"{len(self.folded)} folded, {len(self.restored)} restored as their original "
            f"normalization, {len(self.unfolded)} exported as 1x1 maps"
        ]
        lines += [f"  {n}: folded into {p}" for n, p in self.folded.items()]
        lines += [
            f"  {n}: original normalization, eval map ({r})" for n, r in self.restored.items()
        ]
        lines += [f"  {n}: not folded ({r})" for n, r in self.unfolded.items()]
        return "\n".join(lines)


def _sites(model: nn.Module) -> list[_Site]:
    parents: dict[str, nn.Module] = {"": model}
    sites: dict[int, _Site] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        parents[name] = module
        family = family_of(module) if name else None
        if family is None:
            continue
        parent, _, attr = name.rpartition(".")
        if isinstance(parents[parent], NormalizedInput):
            continue  # folded into the layer it feeds (see _fold_inserted)
        if not family.folds:
            raise ValueError(f"export: cannot export {describe(module)}: {family.export}")
        if id(module) in sites:
            sites[id(module)].slots.append((parents[parent], attr))
        else:
            sites[id(module)] = _Site(name, module, [(parents[parent], attr)])
    return list(sites.values())


def describe(layer: nn.Module) -> str:
    """A layer for messages: its own description, or its class and name in the model."""
    if callable(getattr(layer, "describe", None)):
        return layer.describe()
    origin = getattr(layer, "origin", None)
    where = f" at '{origin.name}'" if origin is not None else ""
    return f"{type(layer).__name__}{where}"


def eval_affine(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """The eval-time map of a layer whose family folds, as a dense block-diagonal ``A``
    ``(C, C)`` and ``b`` ``(C,)`` in float64: ``y = A x + b``.

    From ``layer.inference_map() = (matrices (G, d, d), offset (C,))`` and the per-channel
    ``weight``/``bias``: ``A = diag(weight) blockdiag(matrices)``, ``b = bias - A offset``.
    """
    if not getattr(layer, "track_running_stats", True):
        raise ValueError(
            f"export: {describe(layer)} has no running statistics (track_running_stats=False); "
            "its eval output depends on the batch and has no fixed affine map"
        )
    with torch.no_grad():
        matrices, offset = layer.inference_map()  # type: ignore[operator]
        matrices = matrices.double()
        channels, size = offset.numel(), matrices.shape[-1]
        blocks = [matrices[g, :s, :s] for g, s in enumerate(group_layout(channels, size).sizes)]
        a = torch.block_diag(*blocks)
        weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
        if weight is not None:
            a = weight.detach().double().unsqueeze(1) * a
        b = -a @ offset.double()
        if bias is not None:
            b = b + bias.detach().double()
    return a, b


def fold_into_producer(
    weight: Tensor, bias: Tensor | None, matrix: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """Fold ``y = A z + b`` into the convolution/linear layer ``z = W x + c`` that produces its
    input (as torch's ``fuse_conv_bn_weights`` does for BatchNorm).

    Args:
        weight: ``W``, ``(C_out, ...)`` (any convolution or linear weight).
        bias: ``c`` ``(C_out,)`` or ``None``.
        matrix: ``A`` ``(C_out, C_out)``.
        shift: ``b`` ``(C_out,)``.

    Returns:
        ``(A W, A c + b)`` in float64, ``A W`` in ``weight``'s shape.
    """
    w = weight.detach().double()
    folded = (matrix.double() @ w.reshape(w.shape[0], -1)).reshape(w.shape)
    new_bias = shift.double().clone()
    if bias is not None:
        new_bias += matrix.double() @ bias.detach().double()
    return folded, new_bias


def _fold_reason(site: _Site) -> str | None:
    layer = site.layer
    num_features = getattr(layer, "num_features", None)
    group_sizes = tuple(getattr(layer, "group_sizes", None) or (1,) * int(num_features or 0))
    assert site.segments is not None
    for seg in site.segments:
        producer = seg.module
        if (
            type(producer).forward not in _LINEAR_FORWARDS
            and type(producer).__name__ != "Conv2dSame"
        ):
            return f"{type(producer).__name__} is not a plain convolution/linear layer"
    if sum(seg.size for seg in site.segments) != num_features:
        return "channel count differs from its producer's"
    # Every whitening group must lie inside one block of channels that a single producer
    # computes together (one convolution group), or the map cannot be folded into it.
    bounds, start = [], 0
    for seg in site.segments:
        for width in seg.blocks:
            bounds.append((start, start + width, seg))
            start += width
    start = 0
    for size in group_sizes:
        inside = [b for b in bounds if b[0] <= start and start + size <= b[1]]
        if not inside:
            owner = next(b for b in bounds if b[0] <= start < b[1])[2]
            groups = int(getattr(owner.module, "groups", 1))
            if groups > 1:
                return (
                    f"whitening groups of {max(group_sizes)} channels span the groups of a grouped "
                    f"convolution ({owner.size // groups} channels each): the conv keeps them "
                    "separate"
                )
            return (
                f"whitening groups of {max(group_sizes)} channels span the outputs of the "
                "concatenated convolutions"
            )
        start += size
    source = _source(layer)
    holds_bias = source is None or source.affine or source.track_running_stats
    if not holds_bias and any(seg.module.bias is None for seg in site.segments):
        return "neither the restored normalization nor the producer has a bias to hold b"
    return None


def _source(layer: nn.Module) -> NormSource | None:
    origin = getattr(layer, "origin", None)
    return None if origin is None else origin.source


def _restored_norm(
    layer: nn.Module, bias: Tensor, device, dtype
) -> tuple[nn.Module, Tensor | None]:
    """The original normalization module with identity statistics (and the folded bias).

    Returns the module and the part of the bias it could not hold (``None`` if all held).
    """
    source = _source(layer)
    act = layer.act if isinstance(layer, NormActMixin) else None
    drop = layer.drop if isinstance(layer, NormActMixin) else None
    if source is None:
        parts = [m for m in (drop, act) if m is not None and not isinstance(m, nn.Identity)]
        module: nn.Module = nn.Sequential(*parts) if parts else nn.Identity()
        return module, bias
    module = source.build(device, dtype)
    with torch.no_grad():
        eps = float(getattr(module, "eps", 1e-5))
        # (x - 0) / sqrt((1 - eps) + eps) * 1 + bias == x + bias
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.zero_()
            module.running_var.fill_(1.0 - eps)
        leftover = None
        if getattr(module, "weight", None) is not None:
            module.weight.fill_(1.0)
            module.bias.copy_(bias.to(module.bias.dtype))
        elif getattr(module, "running_mean", None) is not None:
            # affine=False: (x - (-bias)) / 1 == x + bias
            module.running_mean.copy_(-bias.to(module.running_mean.dtype))
        else:
            leftover = bias
        tracked = getattr(module, "num_batches_tracked", None)
        own = getattr(layer, "num_batches_tracked", None)
        if tracked is not None and own is not None:
            tracked.copy_(own)
    if act is not None:
        module.act = act
        module.drop = drop
    module.train(layer.training)
    return module, leftover


def _as_original_norm(layer: nn.Module, a: Tensor, b: Tensor, device, dtype) -> nn.Module | None:
    """The replaced normalization module computing the per-channel eval map ``a x + b`` (``a``
    diagonal), or ``None`` where it cannot hold it.

    In eval a BatchNorm is ``(x - mean) / sqrt(var + eps) * weight + bias``: with ``mean = 0``,
    ``var = 1 - eps`` it is ``weight * x + bias``; without affine parameters, ``var = a^-2 -
    eps`` and ``mean = -b / a`` need ``a > 0`` and ``a^-2 > eps``.
    """
    source = _source(layer)
    diagonal = a.diagonal()
    if source is None or not source.track_running_stats or not torch.equal(a, torch.diag(diagonal)):
        return None
    module = source.build(device, dtype)
    if getattr(module, "running_var", None) is None:
        return None
    with torch.no_grad():
        eps = float(getattr(module, "eps", 1e-5))
        if getattr(module, "weight", None) is not None:
            module.running_mean.zero_()
            module.running_var.fill_(1.0 - eps)
            module.weight.copy_(diagonal.to(module.weight.dtype))
            module.bias.copy_(b.to(module.bias.dtype))
        else:
            var = diagonal.reciprocal().square() - eps
            if not bool((diagonal > 0).all() and (var > 0).all()):
                return None
            module.running_var.copy_(var.to(module.running_var.dtype))
            module.running_mean.copy_((-b / diagonal).to(module.running_mean.dtype))
        tracked = getattr(module, "num_batches_tracked", None)
        own = getattr(layer, "num_batches_tracked", None)
        if tracked is not None and own is not None:
            tracked.copy_(own)
    if isinstance(layer, NormActMixin):
        module.act = layer.act
        module.drop = layer.drop
    module.train(layer.training)
    return module


def _per_channel(layer: nn.Module) -> bool:
    family = family_of(layer)
    return family is not None and family.group_option is None


def _one_by_one(layer: nn.Module, a: Tensor, b: Tensor, input_dim: int | None) -> nn.Module:
    """A plain block-diagonal channel map for ``input_dim``-D inputs."""
    c = b.numel()
    ref = next(iter(layer.parameters()), None)
    if ref is None:
        ref = next(t for t in layer.buffers() if t.is_floating_point())
    factory = {"device": ref.device, "dtype": ref.dtype}
    if input_dim is None:
        # Without a traced input, the replaced module's type tells the rank (BatchNorm2d: 4-D).
        source = _source(layer)
        suffix = source.cls[-2:].lower() if source is not None else ""
        input_dim = {"2d": 4, "3d": 5}.get(suffix)
        if input_dim is None:
            raise ValueError(
                f"export: cannot tell the input rank of {describe(layer)}; pass example_input"
            )
    d = layer.inference_map()[0].shape[-1]  # type: ignore[operator]
    uniform = c % d == 0
    groups = c // d if uniform else 1
    if input_dim == 2:
        mapped: nn.Module = nn.Linear(c, c, **factory)
        weight = a
    else:
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[input_dim]
        mapped = conv(c, c, 1, groups=groups, **factory)
        if uniform:
            weight = torch.cat([a[g * d : (g + 1) * d, g * d : (g + 1) * d] for g in range(groups)])
        else:
            weight = a
        weight = weight.reshape(c, -1, *([1] * (input_dim - 2)))
    with torch.no_grad():
        mapped.weight.copy_(weight.to(mapped.weight.dtype))
        mapped.bias.copy_(b.to(mapped.bias.dtype))
    if isinstance(layer, NormActMixin):
        return nn.Sequential(mapped, layer.drop, layer.act)
    return mapped


def _inserted(model: nn.Module) -> list[tuple[str, NormalizedInput]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NormalizedInput)]


def _fold_inserted(model: nn.Module) -> None:
    """Fold every inserted layer's eval map into the layer it feeds, and put that layer back."""
    for name, wrapper in _inserted(model):
        matrix, shift = eval_affine(wrapper.norm)
        fold_input_map(wrapper.layer, matrix, shift)
        wrapper.layer.train(wrapper.training)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, wrapper.layer)


def plan_export(model: nn.Module, example_input: Tensor | None = None) -> ExportPlan:
    """Which whitening layers of ``model`` ``export(fold=True)`` can fold, without changing it."""
    sites = _sites(model)
    _plan(model, sites, example_input, fold=True)
    plan = _plan_of(sites)
    for name, _ in _inserted(model):
        plan.folded[f"{name}.norm"] = f"{name}.layer (its input side)"
    return plan


def _trace(model: nn.Module, example: Tensor, sites: list[_Site], guessed: bool):
    if not guessed:
        return trace_inputs(model, example, [s.layer for s in sites])
    try:
        return trace_inputs(model, example, [s.layer for s in sites])
    except Exception as err:
        cause = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        raise ValueError(
            "export: the model does not run on the input guessed for it, a random batch of "
            f"shape {tuple(example.shape)} ({cause}); pass example_input= (a small batch the "
            "model accepts) to find the producer of each layer's input"
        ) from err


def _plan(
    model: nn.Module,
    sites: list[_Site],
    example_input: Tensor | None,
    fold: bool,
    guessed: bool = False,
) -> None:
    if not sites:
        return
    if not fold:
        for s in sites:
            s.reason = "fold=False"
        if example_input is not None:
            traced = _trace(model, example_input, sites, guessed)
            for s in sites:
                if id(s.layer) in traced:
                    s.input_dim = traced[id(s.layer)].dim
        return
    if example_input is None:
        raise ValueError(
            "export(fold=True) traces which layer feeds each whitening layer and could not "
            "guess an input for this model: pass example_input= (a small batch)"
        )
    traced = _trace(model, example_input, sites, guessed)
    for s in sites:
        t = traced.get(id(s.layer))
        if t is None:
            s.reason = "not called on the example input"
            continue
        s.input_dim = t.dim
        s.segments = t.segments
        s.reason = t.problem or (_fold_reason(s) if t.segments is not None else None)


def _plan_of(sites: list[_Site]) -> ExportPlan:
    plan = ExportPlan()
    for s in sites:
        if s.folds:
            assert s.producer is not None
            plan.folded[s.name] = s.producer
        elif _per_channel(s.layer) and _source(s.layer) is not None:
            plan.restored[s.name] = s.reason or "no producer found"
        else:
            plan.unfolded[s.name] = s.reason or "no producer found"
    return plan


def export(
    model: nn.Module,
    fold: bool = True,
    example_input: Tensor | None = None,
    inplace: bool = False,
    check: bool = True,
) -> nn.Module:
    """Replace every whitening layer by its eval-time affine map made of plain torch modules.

    Args:
        model: a model containing whitening layers (e.g. after :func:`convert` and training).
        fold: fold ``A`` and ``b`` into the convolution/linear layer that directly produces the
            whitening layer's input (checked by tracing ``example_input``) and put back a
            normalization module of the original type with identity statistics (timm's
            ``BatchNormAct2d`` keeps its activation). Per-channel layers that cannot be folded
            become the original normalization module holding their eval map; whitening layers
            that cannot be folded (pre-activation BNs, after a concatenation as in DenseNet,
            identity branches as in RepVGG, ...) become a 1x1 convolution/linear followed by
            the original activation; a warning lists them.
        example_input: a small input batch. When omitted: a random batch of the shape
            ``convert`` traced on (``layer.origin.example_shape``), else guessed for image
            models; a model that rejects the guess raises a ``ValueError`` asking for one.
        inplace: modify ``model`` itself instead of a deep copy.
        check: verify on ``example_input`` that the exported model's eval output equals the
            whitened model's (raises ``RuntimeError`` otherwise).

    Returns:
        The exported model (in the train/eval mode of ``model``). Where every whitening layer
        was folded (per-channel layers: always) and all of them came from :func:`convert`, it
        has the original architecture.
    """
    target = model if inplace else copy.deepcopy(model)
    if not _inserted(target) and not _sites(target):
        return target
    original = copy.deepcopy(target) if inplace and check else model
    _fold_inserted(target)
    sites = _sites(target)
    guessed = example_input is None
    if guessed:
        example_input = _guess_input(target, sites)
    if not (check and example_input is not None):
        original = None
    _plan(target, sites, example_input, fold, guessed=guessed)

    as_maps: dict[str, str] = {}  # layers exported as 1x1 maps -> why they were not folded
    for s in sites:
        a, b = eval_affine(s.layer)
        ref = next(iter(s.layer.parameters()), None)
        if ref is None:
            ref = next(t for t in s.layer.buffers() if t.is_floating_point())
        if s.folds:
            assert s.segments is not None
            total_bias = b.clone()
            with torch.no_grad():
                # A is block-diagonal with no block spanning two producers (checked by the
                # plan), so each producer absorbs its own diagonal block of A.
                for seg in s.segments:
                    conv, part = seg.module, slice(seg.start, seg.start + seg.size)
                    folded, total_bias[part] = fold_into_producer(
                        conv.weight, conv.bias, a[part, part], b[part]
                    )
                    conv.weight.copy_(folded.to(conv.weight.dtype))
            replacement, leftover = _restored_norm(s.layer, total_bias, ref.device, ref.dtype)
            with torch.no_grad():
                for seg in s.segments:
                    conv, part = seg.module, slice(seg.start, seg.start + seg.size)
                    if leftover is None:
                        if conv.bias is not None:
                            conv.bias.zero_()
                    elif conv.bias is not None:
                        conv.bias.copy_(leftover[part].to(conv.bias.dtype))
                    else:  # a layer built directly (not by convert): give the conv a bias
                        conv.bias = nn.Parameter(leftover[part].to(conv.weight.dtype))
        else:
            replacement = None
            if _per_channel(s.layer):
                replacement = _as_original_norm(s.layer, a, b, ref.device, ref.dtype)
            if replacement is None:
                replacement = _one_by_one(s.layer, a, b, s.input_dim)
                replacement.train(s.layer.training)
                as_maps[s.name] = s.reason or "no producer found"
        for parent, attr in s.slots:
            setattr(parent, attr, replacement)

    if original is not None:
        _check_export(original, target, example_input, fold)
    if fold and as_maps:
        listing = "; ".join(f"{n} ({r})" for n, r in list(as_maps.items())[:8])
        more = f" and {len(as_maps) - 8} more" if len(as_maps) > 8 else ""
        warnings.warn(
            f"export: {len(as_maps)} whitening layer(s) could not be folded and became 1x1 maps, "
            "so the architecture differs from the original there (the exported state_dict does "
            f"not load into the original model): {listing}{more}",
            UserWarning,
            stacklevel=2,
        )
    return target


def _guess_input(model: nn.Module, sites: list[_Site]) -> Tensor | None:
    """The input ``export`` traces when given none: a random batch of the shape ``convert``
    traced the model on (stored on the layers), else :func:`default_example_input`."""
    shapes = {getattr(getattr(s.layer, "origin", None), "example_shape", None) for s in sites} - {
        None
    }
    if len(shapes) != 1:
        return default_example_input(model)
    ref = next(model.parameters(), None)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shapes.pop(), generator=generator)
    if ref is not None:
        x = x.to(device=ref.device, dtype=ref.dtype if ref.dtype.is_floating_point else None)
    return x


def _check_export(original: nn.Module, exported: nn.Module, example: Tensor, fold: bool) -> None:
    """The exported model must compute what the whitened model computes in eval.

    Compared first in the model's own precision, relative to the output's scale (``1e-4``).
    Early in training, running statistics that do not match the data can make eval activations
    large enough to amplify float32 rounding far beyond any tolerance; then the export of a
    float64 copy decides: if its difference shrank as rounding does (by the ratio of the two
    unit roundoffs, 2^-29, up to a factor 1e3; or below ``1e-9`` of the output scale), the
    difference is conditioning (warned about), otherwise the export is wrong (raised).
    """
    reference = _eval_output(original, example)
    if not bool(torch.isfinite(reference).all()):
        warnings.warn(
            "export: the whitened model's own eval output on the example input is not finite "
            "(inf/nan: check its running statistics), so the export could not be checked",
            UserWarning,
            stacklevel=3,
        )
        return
    scale = float(reference.abs().max().clamp_min(1.0))
    err = float((_eval_output(exported, example) - reference).abs().max())
    if err <= 1e-4 * scale:
        return
    original64 = copy.deepcopy(original).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        exported64 = export(original64, fold=fold, example_input=example.double(), check=False)
    ref64 = _eval_output(original64, example.double())
    err64 = float((_eval_output(exported64, example.double()) - ref64).abs().max())
    scale64 = float(ref64.abs().max().clamp_min(1.0))
    # Rounding error scales with the precision: float64's unit roundoff is 2^-29 (1.9e-9) of
    # float32's, so an export that is exact up to rounding has err64 ~ 1.9e-9 err; a wrong one
    # keeps its error (err64 ~ err). Up to 1e3 times the rounding prediction counts as
    # rounding (still six orders of magnitude below a wrong export's).
    explained = 1e3 * 2.0**-29 * err
    if err64 > max(1e-9 * scale64, explained):
        raise RuntimeError(
            f"export: the exported model's output differs from the whitened model's by {err64:.3g} "
            f"(output scale {scale64:.3g}) even in float64, where float32's difference {err:.3g} "
            "would shrink to rounding; please report this model (fold=False exports without "
            "folding)"
        )
    warnings.warn(
        f"export: the exported model matches the whitened model exactly in float64, but differs "
        f"by {err:.3g} (output scale {scale:.3g}) in float32 on the example input: the network "
        "amplifies rounding (eval activations are large, e.g. running statistics that do not "
        "match the data yet)",
        UserWarning,
        stacklevel=3,
    )


def _eval_output(model: nn.Module, example: Tensor) -> Tensor:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not isinstance(out, Tensor):
        raise TypeError("export(check=True) needs a model that returns a tensor; pass check=False")
    return out.double()
