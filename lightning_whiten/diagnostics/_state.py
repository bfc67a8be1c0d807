"""Save and restore everything a measurement pass may change in a model (and its optimizer).

The probes of :mod:`.probes` and :mod:`.landscape` run extra forward and backward passes in
training mode, move the weights along the gradient and take optimizer steps. Training mode
updates running buffers (BatchNorm statistics, whitening matrices, SWBN's ``W``, counters) and
plain attributes (warning flags); dropout draws from the random number generator. A
:class:`ModelState` records all of it and puts it back bit for bit, *into the same tensor
objects*: optimizers, DDP, EMA copies and schedules that hold references to a parameter, a
buffer or a ``.grad`` keep working. A layer that gives a buffer a new tensor in its forward (SWBN
does) gets its original tensor back.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ModelState", "preserved", "trainable_parameters"]

# Attribute values that a module may change in its forward and that can be put back by
# assignment (flags, counters, options). Containers of tensors and submodules are handled
# through _parameters/_buffers/_modules; hooks dicts are never touched.
_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _is_scalar(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(_is_scalar(v) for v in value)
    return isinstance(value, _SCALARS)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that require a gradient, each once (shared ones too)."""
    return [p for p in model.parameters() if p.requires_grad]


class _ModuleState:
    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.parameters = {
            name: (p, None if p is None else p.detach().clone())
            for name, p in module._parameters.items()
        }
        self.buffers = {
            name: (b, None if b is None else b.detach().clone())
            for name, b in module._buffers.items()
        }
        self.attributes = {k: v for k, v in vars(module).items() if _is_scalar(v)}
        self.lists = {k: list(v) for k, v in vars(module).items() if type(v) is list}

    @torch.no_grad()
    def restore(self, parameters: bool) -> None:
        module = self.module
        if parameters:
            for name, (ref, value) in self.parameters.items():
                if ref is not None:
                    ref.copy_(value)
                module._parameters[name] = ref
        for name, (ref, value) in self.buffers.items():
            if ref is not None:
                ref.copy_(value)
            module._buffers[name] = ref
        for name in [n for n in module._buffers if n not in self.buffers]:
            del module._buffers[name]  # registered during the pass
        state = vars(module)
        for name in [k for k, v in state.items() if k not in self.attributes and _is_scalar(v)]:
            del state[name]  # set during the pass
        state.update(self.attributes)
        for name, items in self.lists.items():
            current = state.get(name)
            if type(current) is list:
                current[:] = items
            else:
                state[name] = list(items)


class _OptimizerState:
    """An optimizer's per-parameter state (momentum buffers, step counts), hyperparameters and
    flags; tensors are restored in place."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.state = {
            p: {k: self._save(v) for k, v in entry.items()} for p, entry in optimizer.state.items()
        }
        self.groups = [
            {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            for group in optimizer.param_groups
        ]
        self.attributes = {k: v for k, v in vars(optimizer).items() if _is_scalar(v)}

    @staticmethod
    def _save(value: Any) -> Any:
        if isinstance(value, Tensor):
            return (value, value.detach().clone())
        return copy.deepcopy(value)

    @torch.no_grad()
    def restore(self) -> None:
        optimizer = self.optimizer
        for p in [p for p in optimizer.state if p not in self.state]:
            del optimizer.state[p]
        for p, saved in self.state.items():
            entry = optimizer.state[p]
            for k in [k for k in entry if k not in saved]:
                del entry[k]
            for k, value in saved.items():
                if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Tensor):
                    ref, data = value
                    ref.copy_(data)
                    entry[k] = ref
                else:
                    entry[k] = copy.deepcopy(value)
        for group, saved in zip(optimizer.param_groups, self.groups, strict=True):
            for k in [k for k in group if k != "params" and k not in saved]:
                del group[k]
            group.update(copy.deepcopy(saved))
        state = vars(optimizer)
        for name in [k for k, v in state.items() if k not in self.attributes and _is_scalar(v)]:
            del state[name]
        state.update(self.attributes)


class ModelState:
    """A snapshot of ``model`` (and optionally ``optimizer``) to restore after extra passes.

    Saved: every parameter and buffer (persistent or not) of every module, which tensor object
    each name refers to, the plain attributes of the modules (flags, counters, ``training``),
    their lists, the ``.grad`` of every parameter, the CPU random number generator and those of
    the CUDA devices the model lives on; with an optimizer, its per-parameter state, its
    hyperparameters, its flags and the values of the parameters it holds. It holds a copy of
    all of these (about the size of the model and its optimizer state).

    Args:
        model: the module.
        optimizer: an optimizer whose state a measurement will change (``step()``).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.modules = [_ModuleState(m) for m in model.modules()]
        params = {id(p): p for p in model.parameters()}
        self.extra_parameters: list[tuple[Tensor, Tensor]] = []
        self.optimizer = None
        if optimizer is not None:
            self.optimizer = _OptimizerState(optimizer)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) not in params:  # held by the optimizer but not in the model
                        params[id(p)] = p
                        self.extra_parameters.append((p, p.detach().clone()))
        self.grads = [
            (p, p.grad, None if p.grad is None else p.grad.detach().clone())
            for p in params.values()
        ]
        self.cpu_rng = torch.get_rng_state()
        devices = {
            t.device for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"
        }
        self.cuda_rng = {d: torch.cuda.get_rng_state(d) for d in devices}

    @torch.no_grad()
    def restore(self, parameters: bool = True) -> None:
        """Put everything back; ``parameters=False`` keeps the current parameter values and
        ``.grad`` (the measurement sets them) and restores the rest."""
        for state in self.modules:
            state.restore(parameters)
        torch.set_rng_state(self.cpu_rng)
        for device, rng in self.cuda_rng.items():
            torch.cuda.set_rng_state(rng, device)
        if not parameters:
            return
        for p, value in self.extra_parameters:
            p.copy_(value)
        for p, ref, value in self.grads:
            if ref is not None:
                ref.copy_(value)
            p.grad = ref
        if self.optimizer is not None:
            self.optimizer.restore()


@contextmanager
def preserved(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> Iterator[ModelState]:
    """Run the body with gradients enabled and warnings silenced (the model's own warnings,
    e.g. for a non-finite batch far along the gradient, concern the measurement, not the
    training), then restore ``model`` (and ``optimizer``) as they were, even on error."""
    state = ModelState(model, optimizer)
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield state
    finally:
        state.restore()
