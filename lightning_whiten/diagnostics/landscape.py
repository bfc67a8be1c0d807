"""The optimization measurements of Santurkar, Tsipras, Ilyas & Madry, *How Does Batch
Normalization Help Optimization?* (NeurIPS 2018): how smooth the loss and its gradient are along
the gradient (:func:`landscape`), and internal covariate shift in their Definition 2.1
(:func:`covariate_shift`).

Both run extra forward and backward passes of the model in the mode it is in (training mode:
batch statistics) and restore everything they change (see ``ModelState``). Before each pass the
buffers are put back as they were, so that every evaluation sees the same layer state (SWBN's
``W``, for instance, would otherwise move with every pass) and differs only in the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._state import preserved, trainable_parameters
from .probes import _scalar_loss, _split_batch

__all__ = ["DEFAULT_STEP_SIZES", "covariate_shift", "landscape"]

#: Step sizes ``eta`` of :func:`landscape`: 0.05 to 0.4, the range of the paper's figures as
#: summarized in the project's research notes (the paper moves ``eta * g`` from ``w``).
DEFAULT_STEP_SIZES: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)


def _loss_and_grads(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    x: Any,
    y: Any,
    params: Sequence[Tensor],
    where: str,
) -> tuple[float, list[Tensor]]:
    loss = _scalar_loss(loss_fn(model(x), y), where)
    if not loss.requires_grad:
        raise ValueError(f"{where}: the loss does not depend on any trainable parameter")
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    grads = [
        torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)
    ]
    return float(loss.detach()), grads


def _norm(tensors: Sequence[Tensor]) -> float:
    """L2 norm of the concatenation, accumulated in float64."""
    return float(sum(t.double().pow(2).sum() for t in tensors) ** 0.5) if tensors else 0.0


def _diff_norm(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return _norm([u.double() - v.double() for u, v in zip(a, b, strict=True)])


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((u.double() * v.double()).sum() for u, v in zip(a, b, strict=True)))


def landscape(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: tuple[Any, Any],
    step_sizes: Sequence[float] = DEFAULT_STEP_SIZES,
    params: Sequence[Tensor] | None = None,
) -> dict[str, Any]:
    """Smoothness of the loss along its gradient on one batch (Santurkar et al., Section 3.2).

    With ``L(w)`` the loss of ``batch`` at the weights ``w`` and ``g = grad L(w)``, for each ``eta``
    in ``step_sizes``, at ``w_eta = w - eta g`` (the same batch)::

        loss variation            L(w_eta)                          -> "loss_range" (min, max)
        gradient predictiveness   ||g - grad L(w_eta)||_2           -> "gradient_predictiveness"
        effective beta-smoothness max_eta ||g - grad L(w_eta)||_2 / ||eta g||_2
                                                                    -> "beta_smoothness"

    For a quadratic loss with Hessian ``H`` these are exact: ``L - eta ||g||^2 + eta^2 g^T H g /
    2``, ``eta ||H g||`` and ``||H g|| / ||g||``. Smaller ranges and a smaller beta mean a
    smoother, more predictable landscape (the paper's explanation of BatchNorm's benefit).

    Args:
        model: the network, in the mode to measure (training mode for the paper's setting).
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar.
        batch: ``(inputs, targets)``.
        step_sizes: the ``eta`` grid (default 0.05 ... 0.4).
        params: the parameters that move (default: every parameter that requires a gradient).

    Returns:
        ``{"loss_range": (min, max), "gradient_predictiveness": (min, max), "beta_smoothness":
        float, "loss": L(w), "grad_norm": ||g||, "step_sizes": [...], "losses": [L(w_eta)],
        "gradient_changes": [||g - grad L(w_eta)||]}``. The model, its buffers, ``.grad`` and the
        random number generators are left exactly as they were.
    """
    x, y = _split_batch(batch, "landscape")
    etas = [float(e) for e in step_sizes]
    if not etas or any(not e > 0 for e in etas):
        raise ValueError(f"landscape: step_sizes must be positive numbers, got {list(step_sizes)}")
    params = list(trainable_parameters(model) if params is None else params)
    if not params:
        raise ValueError("landscape: the model has no trainable parameter")
    with preserved(model) as state:
        start = [p.detach().clone() for p in params]
        loss, grad = _loss_and_grads(model, loss_fn, x, y, params, "landscape")
        grad_norm = _norm(grad)
        losses, changes, betas = [], [], []
        for eta in etas:
            with torch.no_grad():
                for p, w, g in zip(params, start, grad, strict=True):
                    p.copy_(w - eta * g)
            state.restore(parameters=False)  # same buffers and RNG for every evaluation
            loss_eta, grad_eta = _loss_and_grads(model, loss_fn, x, y, params, "landscape")
            change = _diff_norm(grad, grad_eta)
            losses.append(loss_eta)
            changes.append(change)
            betas.append(change / (eta * grad_norm) if grad_norm > 0 else float("nan"))
    return {
        "loss_range": (min(losses), max(losses)),
        "gradient_predictiveness": (min(changes), max(changes)),
        "beta_smoothness": max(betas),
        "loss": loss,
        "grad_norm": grad_norm,
        "step_sizes": etas,
        "losses": losses,
        "gradient_changes": changes,
    }


def _execution_order(model: nn.Module, run: Callable[[], Any]) -> list[nn.Module]:
    """Modules in the order of their first call during ``run()``."""
    order: dict[int, nn.Module] = {}

    def hook(module: nn.Module, args: Any) -> None:
        order.setdefault(id(module), module)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return list(order.values())


def _own_trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def covariate_shift(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: tuple[Any, Any],
    optimizer: torch.optim.Optimizer,
    layers: Sequence[str] | None = None,
    max_layers: int | None = None,
) -> dict[str, dict[str, float]]:
    """Internal covariate shift, Santurkar et al.'s Definition 2.1, at the current step.

    For layer ``i`` with weights ``W_i``, ``G_i`` is the gradient of the loss of ``batch`` with
    respect to ``W_i`` at the current weights ``(W_1, ..., W_k)``, and ``G'_i`` the same gradient
    after the layers *before* ``i`` have taken the update the optimizer would make from ``G``
    (its momentum, weight decay and learning rate included)::

        G'_i = grad_{W_i} L(W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t; batch)
        "l2" = ||G_i - G'_i||_2,   "cosine" = <G_i, G'_i> / (||G_i|| ||G'_i||)

    A large ``l2`` (cosine far below 1) means the layer's gradient changes a lot because of
    the updates of the layers before it. "Before" is the order of the forward pass: the
    modules that own trainable parameters and were first called before layer ``i``.

    Costs one optimizer step (undone) and one forward and backward pass per measured layer. The
    optimizer's state (momentum buffers, step counts, hyperparameters), the weights, ``.grad``,
    every buffer and the random number generators are restored, so the next real step is
    unaffected. Optimizers that need a closure (LBFGS) are not supported.

    Args:
        model: the network, in the mode to measure (training mode for the paper's setting).
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar.
        batch: ``(inputs, targets)``.
        optimizer: the optimizer that trains ``model``.
        layers: names (as in ``model.named_modules()``) of the layers to measure; default every
            convolution and linear layer with trainable weights.
        max_layers: measure at most this many of them, spread evenly over the forward order
            (the first and the last included): the cost grows with the number of layers.

    Returns:
        ``{layer name: {"l2": ..., "cosine": ..., "grad_norm": ||G_i||}}`` in forward order.
    """
    x, y = _split_batch(batch, "covariate_shift")
    if max_layers is not None and (
        isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 1
    ):
        raise ValueError(f"covariate_shift: max_layers must be an integer >= 1, got {max_layers!r}")
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    if layers is None:
        wanted = {
            id(m)
            for m in modules.values()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and _own_trainable(m)
        }
    else:
        unknown = [n for n in layers if n not in modules]
        if unknown:
            raise ValueError(f"covariate_shift: no module named {unknown} in the model")
        wanted = {id(modules[n]) for n in layers}
        without = [n for n in layers if not _own_trainable(modules[n])]
        if without:
            raise ValueError(f"covariate_shift: layers {without} own no trainable parameter")
    params = trainable_parameters(model)
    if not params:
        raise ValueError("covariate_shift: the model has no trainable parameter")
    index = {id(p): i for i, p in enumerate(params)}
    results: dict[str, dict[str, float]] = {}
    with preserved(model, optimizer) as state:
        grads: list[Tensor] = []

        def first_pass() -> None:
            grads.extend(_loss_and_grads(model, loss_fn, x, y, params, "covariate_shift")[1])

        order = [m for m in _execution_order(model, first_pass) if _own_trainable(m)]
        measured = [m for m in order if id(m) in wanted]
        if max_layers is not None and len(measured) > max_layers:
            if max_layers == 1:
                picks = [0]
            else:
                last = len(measured) - 1
                picks = sorted({round(i * last / (max_layers - 1)) for i in range(max_layers)})
            wanted = {id(measured[i]) for i in picks}
        # The optimizer's update from G: set .grad (into the existing tensors), step, read.
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            optimizer.step()
            updated = [p.detach().clone() for p in params]
        state.restore()
        start = [p.detach().clone() for p in params]
        moved: set[int] = set()  # parameters of the layers before the current one
        for module in order:
            own = [index[id(p)] for p in _own_trainable(module)]
            if id(module) in wanted:
                g_i = [grads[i] for i in own]
                if moved - set(own):
                    with torch.no_grad():
                        for i in moved - set(own):
                            params[i].copy_(updated[i])
                    state.restore(parameters=False)
                    layer_params = [params[i] for i in own]
                    _, g_shift = _loss_and_grads(
                        model, loss_fn, x, y, layer_params, "covariate_shift"
                    )
                    with torch.no_grad():
                        for i in moved:
                            params[i].copy_(start[i])
                else:
                    g_shift = g_i  # nothing before this layer moves (the first layer)
                norm, norm_shift = _norm(g_i), _norm(g_shift)
                denom = norm * norm_shift
                results[names[id(module)]] = {
                    "l2": _diff_norm(g_i, g_shift),
                    "cosine": _dot(g_i, g_shift) / denom if denom > 0 else float("nan"),
                    "grad_norm": norm,
                }
            moved.update(own)
    return results
