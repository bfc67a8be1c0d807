"""Find, by running a model once, which convolutions produce the input of each normalization layer.

Both ``convert`` (to keep whitening groups inside the channel groups a grouped or depthwise
convolution keeps separate) and ``export`` (to fold a whitening map into the producing
convolution) need the real data flow, not module registration order: a normalization layer may
read a convolution registered in a neighbouring block (DPN's pre-activation blocks), the
concatenation of several convolutions (timm's ``MixedConv2d``), or a tensor that plain tensor
code also reads or modifies in place (``F.relu(y, inplace=True)``, ``bn(y) + y``).

The trace treats leaf modules and the target layers as opaque, records convolution/linear
outputs and channel concatenations of them, and counts every consumer of a tensor: a module
called on it, or a tensor-valued torch function called on it from a parent's ``forward``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["Segment", "TracedInput", "default_example_input", "trace_inputs"]

_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CAT = {torch.cat, torch.concat, torch.concatenate}


@dataclass
class Segment:
    """A run of ``size`` channels, starting at ``start``, produced by one convolution/linear."""

    name: str
    module: nn.Module
    start: int
    size: int

    @property
    def blocks(self) -> list[int]:
        """Channel widths the producer keeps separate (its groups)."""
        groups = int(getattr(self.module, "groups", 1))
        return [self.size // groups] * groups if self.size % groups == 0 else [self.size]


@dataclass
class TracedInput:
    """What feeds a target layer: the producing segments and whether a fold would be exact."""

    dim: int
    segments: list[Segment] | None = None  # None: not (a channel concat of) conv/linear outputs
    problem: str | None = None  # why the producers cannot absorb a map of this input
    calls: int = 1

    @property
    def blocks(self) -> list[int] | None:
        if self.segments is None:
            return None
        return [w for s in self.segments for w in s.blocks]


@dataclass
class _State:
    depth: int = 0
    producers: dict[int, tuple[str, nn.Module]] = field(default_factory=dict)
    versions: dict[int, int] = field(default_factory=dict)
    cats: dict[int, list[int]] = field(default_factory=dict)
    consumers: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)
    target_inputs: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    keep: list = field(default_factory=list)  # keeps traced tensors alive so ids stay unique


class _CountFunctionalUses(TorchFunctionMode):
    """Counts tensor uses by torch functions called outside opaque modules (a parent's
    ``forward``), and records channel concatenations."""

    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        state = self.state
        if state.depth > 0:
            return func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        versions = [t._version for t in tensors]
        result = func(*args, **kwargs)
        outputs = [r for r in tree_flatten(result)[0] if isinstance(r, Tensor)]
        if outputs:
            for t, version in zip(tensors, versions, strict=True):
                # ``y.contiguous()`` and friends may return ``y`` itself, unchanged: not a use.
                if not (len(outputs) == 1 and outputs[0] is t and t._version == version):
                    state.keep.append(t)
                    state.consumers[id(t)] += 1
        if func in _CAT and isinstance(result, Tensor) and result.dim() >= 2:
            parts = args[0] if args else kwargs.get("tensors", ())
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if dim in (1, 1 - result.dim()) and all(isinstance(p, Tensor) for p in parts):
                state.keep.append(result)
                state.cats[id(result)] = [id(p) for p in parts]
        return result


def trace_inputs(
    model: nn.Module, example: Tensor, targets: list[nn.Module]
) -> dict[int, TracedInput]:
    """Run ``model(example)`` once (no grad, eval mode restored afterwards) and describe the
    input of each module in ``targets``, keyed by ``id(target)``. Targets not called are absent.
    """
    state = _State()
    target_ids = {id(t) for t in targets}
    inside_targets = {id(m) for t in targets for m in t.modules() if m is not t}
    handles = []

    def pre_hook(module, args):
        state.calls[id(module)] += 1
        for a in args:
            if isinstance(a, Tensor):
                state.keep.append(a)
                state.consumers[id(a)] += 1
                if id(module) in target_ids:
                    state.target_inputs[id(module)] = (id(a), a.dim(), a._version)
        state.depth += 1

    def post_hook(name):
        def hook(module, args, output):
            state.depth -= 1
            if isinstance(module, _PRODUCERS) and isinstance(output, Tensor):
                state.keep.append(output)
                state.producers[id(output)] = (name, module)
                state.versions[id(output)] = output._version

        return hook

    for name, module in model.named_modules():
        opaque = id(module) in target_ids or (
            next(module.children(), None) is None and id(module) not in inside_targets
        )
        if opaque:
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook(name)))

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), _CountFunctionalUses(state):
            model(example)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode

    return {
        id(t): _describe(state, *state.target_inputs[id(t)], calls=state.calls[id(t)])
        for t in targets
        if id(t) in state.target_inputs
    }


def _describe(state: _State, tensor_id: int, dim: int, version: int, calls: int) -> TracedInput:
    traced = TracedInput(dim=dim, calls=calls)
    if tensor_id in state.producers:
        parts = [tensor_id]
    elif tensor_id in state.cats and all(p in state.producers for p in state.cats[tensor_id]):
        parts = state.cats[tensor_id]
        if state.consumers[tensor_id] > 1:
            traced.problem = "the concatenated convolution outputs are also used elsewhere"
    else:
        traced.problem = "its input is not the output of a convolution or linear layer"
        return traced
    segments, start = [], 0
    for part in parts:
        name, module = state.producers[part]
        size = int(module.out_features if isinstance(module, nn.Linear) else module.out_channels)
        segments.append(Segment(name, module, start, size))
        start += size
        if traced.problem is not None:
            continue
        if state.consumers[part] > 1:
            traced.problem = f"the output of {name} is also used elsewhere"
        elif state.calls[id(module)] > 1:
            traced.problem = f"{name} is called more than once"
        elif len(parts) == 1 and version != state.versions[part]:
            traced.problem = f"the output of {name} is modified in place before the layer"
    traced.segments = segments
    if calls > 1 and traced.problem is None:
        traced.problem = "the layer is called more than once"
    return traced


def default_example_input(model: nn.Module) -> Tensor | None:
    """A small random batch for image models: from timm's ``pretrained_cfg`` or the first
    convolution's input channels; ``None`` when the input cannot be guessed.

    Drawn from a private generator: guessing an input never advances the global RNG, so
    seeded runs do not depend on whether ``convert``/``export`` traced the model.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else None
    shape: tuple[int, ...] | None = None
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and len(cfg.get("input_size", ())) == 3:
        shape = (2, cfg["input_size"][0], 64, 64)
    else:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                shape = (2, module.in_channels, 64, 64)
            elif isinstance(module, nn.Conv1d):
                shape = (2, module.in_channels, 64)
            elif isinstance(module, nn.Conv3d):
                shape = (2, module.in_channels, 8, 32, 32)
            elif isinstance(module, nn.Linear):
                shape = (2, module.in_features)
            if shape is not None:
                break
    if shape is None:
        return None
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)
