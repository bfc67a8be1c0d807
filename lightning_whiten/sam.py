"""Sharpness-aware minimization on the normalization layers' affine parameters (SAM-ON).

Mueller, Vlaar, Rolnick, Hein, *Normalization Layers Are All That Sharpness-Aware Minimization
Needs*, NeurIPS 2023 (code: ``mueller-mp/SAM-ON``, classes ``SAM_ON`` and ``ASAM_ON``). SAM's
ascent step perturbs only the affine ``weight`` and ``bias`` of the normalization layers (about
0.1% of a network's parameters), which generalizes better than perturbing all of them.

One training step on a batch ``B``, with ``S`` the perturbed parameters:

1. forward and backward on ``B`` at ``w``: gradient ``g``;
2. ascent: ``w_S <- w_S + eps`` (below);
3. forward and backward on the same ``B`` at the perturbed point: gradient ``g'``;
4. restore ``w_S`` exactly, then the base optimizer steps with ``g'``.

The ascent (``adaptive=False`` is SAM, ``adaptive=True`` is ASAM; ``T = 1`` for SAM)::

    p = 2:    eps = rho * T^2 g / (||T g||_2 + 1e-16)       (the norm over S only)
    p = inf:  eps = rho * T sign(g)

    ASAM elementwise:  T = |w| + eta
    ASAM layerwise:    T = ||w||_2 (1 + eta)                (one value per tensor)

``T`` applies to weights, and to biases only with ``normalize_bias`` (``T = 1`` otherwise).
Plain PyTorch: no Lightning import (:class:`lightning_whiten.NormSAMCallback` is the Lightning
adapter).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .registry import family_of

__all__ = ["NormSAM", "average_gradients", "is_normalization_layer", "normalization_buffers"]

ParamsChoice = Literal["norm", "all", "no_norm"]
PARAMS_CHOICES: tuple[str, ...] = ("norm", "all", "no_norm")

# torch's normalization modules: _NormBase covers BatchNorm*, SyncBatchNorm, LazyBatchNorm*,
# InstanceNorm*; timm's BatchNormAct2d, GroupNormAct, LayerNorm2d, ... subclass these.
_TORCH_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)
# Normalization modules of optional libraries that do not subclass torch's, looked up only
# when the library is already imported (a model that contains one has imported it).
_OPTIONAL_NORM_TYPES: dict[str, tuple[str, ...]] = {
    "torchvision.ops.misc": ("FrozenBatchNorm2d",),
    "timm.layers.norm": (
        "RmsNorm", "RmsNormFp32", "RmsNorm2d", "RmsNorm2dFp32",
        "SimpleNorm", "SimpleNormFp32", "SimpleNorm2d", "SimpleNorm2dFp32",
    ),
    "timm.layers.norm_act": ("FrozenBatchNormAct2d",),
    "timm.layers.evo_norm": (
        "EvoNorm2dB0", "EvoNorm2dB1", "EvoNorm2dB2", "EvoNorm2dS0", "EvoNorm2dS0a",
        "EvoNorm2dS1", "EvoNorm2dS1a", "EvoNorm2dS2", "EvoNorm2dS2a",
    ),
    "timm.layers.filter_response_norm": ("FilterResponseNormTlu2d", "FilterResponseNormAct2d"),
}  # fmt: skip


def _optional_norm_types() -> tuple[type, ...]:
    found = []
    for module_name, names in _OPTIONAL_NORM_TYPES.items():
        module = sys.modules.get(module_name)
        if module is not None:
            found += [
                getattr(module, n) for n in names if isinstance(getattr(module, n, None), type)
            ]
    return tuple(found)


def is_normalization_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer, decided by its type (never by its name).

    True for torch's BatchNorm/SyncBatchNorm/InstanceNorm (``_NormBase``), ``LayerNorm``,
    ``GroupNorm``, ``RMSNorm``, ``LocalResponseNorm`` and their subclasses (timm's
    ``BatchNormAct2d``, ``GroupNormAct``, ``LayerNorm2d``, ...), timm's ``RmsNorm``/``SimpleNorm``
    families, EvoNorm and FilterResponseNorm, torchvision's and timm's frozen BatchNorm (no
    trainable parameters), and every layer of this package's normalization families (the registry).

    The authors' code selects parameters whose *name* contains ``"norm"`` or ``"bn"``, which
    misses torchvision's ``downsample.1`` BatchNorms and catches any module nested under a
    ``norm*`` name; selecting by type avoids both.
    """
    if isinstance(module, (*_TORCH_NORM_TYPES, *_optional_norm_types())):
        return True
    family = family_of(module)  # every normalization family of this package
    return family is not None and family.targets == "batchnorm"


def normalization_buffers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, buffer name)`` of every buffer of the normalization layers in ``model``:
    running statistics, whitening matrices, SWBN's ``W``, counters (nested ones included)."""
    found: list[tuple[nn.Module, str]] = []
    seen: set[int] = set()
    for norm in model.modules():
        if not is_normalization_layer(norm):
            continue
        for owner in norm.modules():
            for name, buf in owner.named_buffers(recurse=False):
                if buf is not None and id(buf) not in seen:
                    seen.add(id(buf))
                    found.append((owner, name))
    return found


def select_parameters(model: nn.Module, params: ParamsChoice) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` chosen by ``params``: the normalization layers' own
    parameters (``"norm"``), all (``"all"``), or all but those (``"no_norm"``)."""
    norm_ids = {
        id(p)
        for m in model.modules()
        if is_normalization_layer(m)
        for p in m.parameters(recurse=False)
    }
    chosen = []
    for name, p in model.named_parameters():
        is_norm = id(p) in norm_ids
        if params == "all" or (params == "norm") == is_norm:
            chosen.append((name, p))
    return chosen


def average_gradients(
    grads: Sequence[Tensor | None], parameters: Sequence[nn.Parameter], group: Any = None
) -> list[Tensor | None]:
    """Average per-parameter gradients over the processes of ``group`` with one all-reduce,
    as DDP averages gradients (a no-op outside ``torch.distributed`` or with one process).

    Every process must contribute the same tensors, so a missing gradient of a parameter that
    requires one counts as zero (a zero gradient perturbs by exactly zero).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) <= 1:
        return list(grads)
    filled = [
        torch.zeros_like(p) if g is None and p.requires_grad else g
        for g, p in zip(grads, parameters, strict=True)
    ]
    present = [g for g in filled if g is not None]
    if not present:
        return list(grads)
    dtype = torch.float32
    for g in present:
        dtype = torch.promote_types(dtype, g.dtype)
    flat = torch.cat([g.reshape(-1).to(dtype) for g in present])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    out: list[Tensor | None] = []
    offset = 0
    for g in filled:
        if g is None:
            out.append(None)
            continue
        out.append(flat[offset : offset + g.numel()].view_as(g).to(g.dtype))
        offset += g.numel()
    return out


def check_options(
    owner: str,
    rho: float,
    adaptive: bool,
    eta: float,
    p: int | float | str,
    layerwise: bool,
    normalize_bias: bool,
    params: str,
) -> Literal[2, "inf"]:
    """Validate the options shared by :class:`NormSAM` and its callback; returns ``p``
    normalized to ``2`` or ``"inf"``."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0:
        raise ValueError(f"{owner}: rho must be a positive number, got {rho!r}")
    if not math.isfinite(rho):
        raise ValueError(f"{owner}: rho must be finite, got {rho!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"{owner}: eta must be a number >= 0, got {eta!r}")
    if params not in PARAMS_CHOICES:
        raise ValueError(f"{owner}: params must be one of {PARAMS_CHOICES}, got {params!r}")
    if p in (2, "2") and not isinstance(p, bool):
        norm_p: Literal[2, "inf"] = 2
    elif p in ("inf", "infinity") or (isinstance(p, float) and p == math.inf):
        norm_p = "inf"
    else:
        raise ValueError(f"{owner}: p must be 2 or 'inf', got {p!r}")
    if not adaptive and (layerwise or normalize_bias):
        option = "layerwise" if layerwise else "normalize_bias"
        raise ValueError(
            f"{owner}: {option}=True only applies to ASAM's operator T; set adaptive=True"
        )
    return norm_p


class NormSAM:
    """SAM / ASAM whose ascent step perturbs only the chosen parameters (SAM-ON by default).

    The usual two-step convention::

        sam = lw.NormSAM(model, optimizer, rho=0.05)
        loss_fn(model(x), y).backward()
        sam.first_step(zero_grad=True)    # w_S <- w_S + eps
        loss_fn(model(x), y).backward()
        sam.second_step(zero_grad=True)   # w_S <- w_S (restored), then optimizer.step()

    or the closure form, which computes the first gradient only for the perturbed parameters
    (``torch.autograd.grad``: no weight-gradient GEMM of the convolutions, so a SAM-ON step of
    resnet18 costs about 1.7 plain steps instead of 2; ``benchmarks/sam.py``)::

        loss = sam.step(lambda: loss_fn(model(x), y))    # the closure returns the loss, no backward

    Build it after :func:`lightning_whiten.convert` (as the optimizer): the parameters are
    chosen at construction.

    Args:
        model: the network.
        optimizer: the base optimizer (stepped by :meth:`second_step` with ``g'``).
        rho: the radius of the perturbation (> 0). The authors' class default is 0.5; their
            best CIFAR setting (ASAM elementwise, ``normalize_bias``) uses 10.
        adaptive: ``False``: SAM (``T = 1``); ``True``: ASAM with the operator ``T``.
        eta: ASAM's offset in ``T`` (the authors' class default 0.01; their ``train.py``
            defaults to 0).
        p: ``2`` or ``"inf"`` (``"infinity"`` and ``"2"``, the authors' spellings, work too).
            ``p="inf"`` without ``adaptive`` gives ``eps = rho sign(g)`` (the authors'
            ``SAM_ON`` class has no ``p``: this is the ASAM formula with ``T = 1``).
        layerwise: ASAM with one ``T`` per tensor instead of per element.
        normalize_bias: apply ``T`` to biases too.
        params: ``"norm"`` (SAM-ON: the normalization layers' own parameters, found by type
            with :func:`is_normalization_layer`), ``"all"`` (SAM / ASAM) or ``"no_norm"``.
        freeze_norm_stats: save the normalization layers' buffers (running statistics,
            whitening matrices, SWBN's ``W``, counters) in :meth:`first_step` and restore them in
            :meth:`second_step`, so the second forward pass leaves no trace in them. The default
            reproduces the authors, whose buffers update in both passes. The model is never
            switched to eval (which would change the second pass's function).

    Matching the authors' code (``ASAM_ON.ascent_step`` / ``SAM_ON.ascent_step``) exactly,
    including its quirks:

    * the norm gets ``+ 1e-16`` *after* it is computed: ``||T g|| + 1e-16``;
    * layerwise ``T = ||w||_2 * (1 + eta)``: the official code multiplies the norm by a tensor
      of ones to which it added ``eta`` (the paper writes ``||w|| + eta``);
    * ``T`` applies to a parameter whose name contains ``"weight"``, and to the others only
      with ``normalize_bias`` (here the name is the parameter's own name in its module, so a
      bias of a module called ``weight_proj`` stays a bias; ViT's ``pos_embed`` and
      ``cls_token`` are "biases" for both);
    * parameters whose gradient is ``None`` after the first pass are not perturbed;
    * ``p="inf"`` is not normalized: ``eps = rho T sign(g)`` (``sign(0) = 0``).

    Deliberate differences: gradients are not modified in place (the authors multiply
    ``p.grad`` by ``T``; with ``zero_grad=True`` they are cleared either way); the arithmetic
    runs in at least float32 for half-precision parameters; a non-finite first gradient (an
    fp16 overflow) gives no perturbation instead of NaN parameters, without a host
    synchronization (AMP's scaler then skips the step as usual).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        p: int | float | str = 2,
        layerwise: bool = False,
        normalize_bias: bool = False,
        params: ParamsChoice = "norm",
        freeze_norm_stats: bool = False,
    ) -> None:
        self.p = check_options("NormSAM", rho, adaptive, eta, p, layerwise, normalize_bias, params)
        self.model = model
        self.optimizer = optimizer
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.eta = float(eta)
        self.layerwise = bool(layerwise)
        self.normalize_bias = bool(normalize_bias)
        self.params = params
        self.freeze_norm_stats = bool(freeze_norm_stats)
        chosen = select_parameters(model, params)
        if not chosen:
            hint = {
                "norm": " (it has no normalization layer with parameters; see "
                "lightning_whiten.sam.is_normalization_layer)",
                "no_norm": " (all its parameters belong to normalization layers)",
            }
            raise ValueError(
                f"NormSAM: params={params!r} selects no parameter of {type(model).__name__}"
                f"{hint.get(params, '')}"
            )
        #: ``(qualified name, parameter)`` that the ascent may perturb.
        self.named_parameters: list[tuple[str, nn.Parameter]] = chosen
        # The authors' test, on the parameter's own name (see the class docstring).
        self._is_weight = ["weight" in name.rsplit(".", 1)[-1] for name, _ in chosen]
        self._backup: list[tuple[nn.Parameter, Tensor]] = []
        self._saved_buffers: list[tuple[nn.Module, str, Tensor]] = []
        self._perturbed = False
        #: ``||g_S||_2`` of the last ascent (unscaled; a tensor, read without synchronizing).
        self.grad_norm: Tensor | None = None
        #: ``||eps||_2`` of the last ascent.
        self.perturbation_norm: Tensor | None = None
        #: The loss at the perturbed point of the last :meth:`step` (detached).
        self.perturbed_loss: Tensor | None = None

    def __repr__(self) -> str:
        count = sum(p.numel() for _, p in self.named_parameters)
        kind = "ASAM" if self.adaptive else "SAM"
        extra = (
            f", eta={self.eta}, layerwise={self.layerwise}, normalize_bias={self.normalize_bias}"
        )
        return (
            f"NormSAM({kind}, rho={self.rho}, p={self.p!r}, params={self.params!r}"
            f"{extra if self.adaptive else ''}, freeze_norm_stats={self.freeze_norm_stats}, "
            f"{len(self.named_parameters)} tensors / {count} values)"
        )

    # -- the ascent ------------------------------------------------------------------------------
    def gradients(self, loss: Tensor) -> list[Tensor | None]:
        """The gradient of ``loss`` for each chosen parameter (``None`` where it has none),
        computed with ``torch.autograd.grad``: ``.grad`` is untouched, and the backward skips
        every gradient the chosen parameters do not need (e.g. the convolutions' weights)."""
        if not isinstance(loss, Tensor) or loss.grad_fn is None:
            raise ValueError(
                "NormSAM: the loss has no graph (it must be computed with gradients enabled "
                "from the model's output, and not detached)"
            )
        index = [i for i, (_, p) in enumerate(self.named_parameters) if p.requires_grad]
        try:
            found = torch.autograd.grad(
                loss, [self.named_parameters[i][1] for i in index], allow_unused=True
            )
        except RuntimeError as err:
            if "second time" in str(err):
                raise RuntimeError(
                    "NormSAM.step: the closure must return the loss without calling backward() "
                    f"(NormSAM runs the backward passes): {err}"
                ) from err
            raise
        grads: list[Tensor | None] = [None] * len(self.named_parameters)
        for i, g in zip(index, found, strict=True):
            grads[i] = g
        return grads

    @torch.no_grad()
    def perturb(
        self,
        grads: Sequence[Tensor | None] | None = None,
        grad_scale: Tensor | float | None = None,
    ) -> None:
        """Move the chosen parameters to the perturbed point ``w + eps``, saving them first.

        Args:
            grads: one gradient per chosen parameter (:meth:`gradients`), or ``None`` to use
                their ``.grad``. A ``None`` gradient leaves its parameter alone.
            grad_scale: the factor the gradients are multiplied by (AMP's loss scale): they are
                divided by it first, so every norm is of the true gradient.
        """
        if self._perturbed:
            raise RuntimeError("NormSAM: first_step called twice without second_step")
        if grads is None:
            grads = [p.grad for _, p in self.named_parameters]
        elif len(grads) != len(self.named_parameters):
            raise ValueError(
                f"NormSAM: got {len(grads)} gradients for {len(self.named_parameters)} parameters"
            )
        items = [
            (p, g, is_weight)
            for (_, p), g, is_weight in zip(
                self.named_parameters, grads, self._is_weight, strict=True
            )
            if g is not None
        ]
        self._backup = [(p, p.detach().clone()) for p, _, _ in items]
        if self.freeze_norm_stats:
            self._saved_buffers = [
                (m, name, m._buffers[name].detach().clone())
                for m, name in normalization_buffers(self.model)
            ]
        self._perturbed = True
        if not items:
            self.grad_norm = self.perturbation_norm = None
            return
        device = items[0][0].device
        inv_scale = None
        if grad_scale is not None:
            inv_scale = torch.as_tensor(grad_scale, dtype=torch.float64, device=device).reciprocal()

        grad_values, operators = [], []
        for p, g, is_weight in items:
            dtype = torch.promote_types(g.dtype, torch.float32)
            g = g.to(dtype)
            if inv_scale is not None:
                g = g * inv_scale.to(dtype)
            grad_values.append(g)
            t = None
            if self.adaptive and (is_weight or self.normalize_bias):
                w = p.detach().to(dtype)
                if self.layerwise:
                    t = torch.linalg.vector_norm(w) * (1.0 + self.eta)
                else:
                    t = w.abs().add_(self.eta)
            operators.append(t)

        def total_norm(tensors: list[Tensor]) -> Tensor:
            norms = [torch.linalg.vector_norm(t).to(torch.float64) for t in tensors]
            return torch.linalg.vector_norm(torch.stack(norms))

        self.grad_norm = total_norm(grad_values)
        finite = torch.isfinite(self.grad_norm)
        if self.p == 2:
            scaled = [
                g if t is None else g * t for g, t in zip(grad_values, operators, strict=True)
            ]
            norm = total_norm(scaled) + 1e-16
            eps = []
            for tg, t in zip(scaled, operators, strict=True):
                direction = tg if t is None else tg * t  # T^2 g
                eps.append(direction * (self.rho / norm).to(direction.dtype))
        else:
            eps = [
                g.sign() * self.rho if t is None else g.sign() * t * self.rho
                for g, t in zip(grad_values, operators, strict=True)
            ]
        for e in eps:
            e.masked_fill_(~finite, 0.0)
        self.perturbation_norm = total_norm(eps)
        for (p, _, _), e in zip(items, eps, strict=True):
            p.add_(e.to(p.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        """Put the perturbed parameters (and, with ``freeze_norm_stats``, the normalization
        buffers) back exactly as they were before :meth:`perturb`."""
        if not self._perturbed:
            raise RuntimeError("NormSAM: second_step called without first_step")
        for p, saved in self._backup:
            p.copy_(saved)
        for module, name, saved in self._saved_buffers:
            current = module._buffers.get(name)
            if current is not None and current.shape == saved.shape:
                current.copy_(saved)
            else:
                module._buffers[name] = saved
        self._backup, self._saved_buffers = [], []
        self._perturbed = False

    # -- the usual API ---------------------------------------------------------------------------
    def first_step(self, zero_grad: bool = True, grad_scale: Tensor | float | None = None) -> None:
        """The ascent from the gradients in ``.grad`` (of the first backward pass).

        Args:
            zero_grad: clear the gradients afterwards (``optimizer.zero_grad()``), so the
                second backward pass starts from zero.
            grad_scale: with a ``torch.amp.GradScaler``, its current scale (the gradients in
                ``.grad`` are scaled); the perturbation is computed from the unscaled gradient.
        """
        self.perturb(None, grad_scale)
        if zero_grad:
            self.optimizer.zero_grad()

    def second_step(self, zero_grad: bool = True) -> None:
        """Restore the perturbed parameters, then step the base optimizer with the gradients of
        the second backward pass."""
        self.restore()
        self.optimizer.step()
        if zero_grad:
            self.optimizer.zero_grad()

    def step(self, closure: Callable[[], Tensor], zero_grad: bool = True) -> Tensor:
        """One SAM step with a closure that computes and returns the loss *without* calling
        ``backward()``: NormSAM differentiates it twice (the first time only with respect to
        the perturbed parameters). Returns the loss at the unperturbed point (detached);
        :attr:`perturbed_loss` holds the loss at the perturbed point. ``zero_grad`` clears the
        gradients after the step, as :meth:`second_step` does (``False`` keeps ``g'``).

        Under DDP, give NormSAM the ``DistributedDataParallel`` model: the first pass then runs
        under ``no_sync()`` and the perturbed parameters' gradients are averaged over the
        processes with one all-reduce (the full-batch method). With a ``GradScaler`` use the
        two-step form (``first_step(grad_scale=...)``).
        """
        ddp = self.model if isinstance(self.model, nn.parallel.DistributedDataParallel) else None
        with torch.enable_grad(), ddp.no_sync() if ddp is not None else nullcontext():
            loss = closure()
            grads = self.gradients(loss)
        if ddp is not None:
            grads = average_gradients(
                grads, [p for _, p in self.named_parameters], ddp.process_group
            )
        self.perturb(grads)
        try:
            self.optimizer.zero_grad()
            with torch.enable_grad():
                perturbed = closure()
            if not isinstance(perturbed, Tensor) or perturbed.grad_fn is None:
                raise ValueError("NormSAM.step: the closure's second loss has no graph")
            perturbed.backward()
        except BaseException:
            self.restore()
            raise
        self.perturbed_loss = perturbed.detach()
        self.second_step(zero_grad=zero_grad)
        return loss.detach()
