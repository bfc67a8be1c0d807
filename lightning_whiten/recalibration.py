"""Precise statistics: re-estimate every normalization layer's running statistics at the
current weights (plain PyTorch, no Lightning import).

Running statistics are a momentum average over the training trajectory: each batch's
statistics were measured at the weights of its step. After fast training, after weight
averaging (SWA, EMA) or after editing weights, they no longer fit the weights, and a whitening
matrix is far less forgiving of that than BatchNorm's per-channel variance (ResNetV2-20 on
digits after 100 fast steps: IterNorm evaluates at 26% with its running statistics, 95% once
they are re-estimated). :func:`recalibrate` re-estimates them with an equal-weight average over
a few batches at fixed weights, as ``torch.optim.swa_utils.update_bn`` (``momentum=None``)
and precise BN (pycls, fvcore) do for BatchNorm, for every family of this package.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .distributed import resolve_process_group
from .functional._backend import batch_statistics, canonicalize, group_layout
from .layers.base import RunningWhiteningNorm, WhiteningNorm
from .layers.convnorm import ConvNorm2d
from .layers.dbn import DBN
from .layers.lpnorm import PerChannelNorm
from .layers.streaming import StreamingNorm
from .layers.swbn import SWBN

__all__ = ["RecalibrationReport", "WhiteningEstimate", "recalibrate", "recalibrated_layers"]

#: How the eval matrix of IterNorm (any :class:`RunningWhiteningNorm` but DBN) is estimated.
WhiteningEstimate = Literal["covariance", "matrix"]


@dataclass
class RecalibrationReport:
    """What :func:`recalibrate` did.

    Attributes:
        batches: batches forwarded (on this process).
        layers: qualified names of the layers whose statistics were re-estimated.
        skipped: ``{name: batches}`` kept out of a layer's estimate for non-finite statistics
            (summed over processes).
        unchanged: layers left as they were, with the reason: no batch reached them (an unused
            branch: not warned), every batch was non-finite, or a family this function does
            not know (both warned).
    """

    batches: int = 0
    layers: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    unchanged: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Per-family estimators
# ------------------------------------------------------------------------------------------------
def _float(x: Tensor) -> Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(n, mean (C,), centered input)`` over every dim but 1, in float32+."""
    xf = _float(x)
    dims = [0, *range(2, xf.dim())]
    n = xf.numel() // xf.shape[1]
    mean = xf.mean(dim=dims)
    shape = [1, -1] + [1] * (xf.dim() - 2)
    return (
        torch.full((), float(n), dtype=torch.float64, device=x.device),
        mean,
        xf - mean.view(shape),
    )


class _Estimator:
    """Equal-weight sums of per-batch statistics of one layer's input, kept on its device in
    float64; a non-finite batch adds nothing and is counted apart (no host synchronization)."""

    def __init__(self, layer: nn.Module, name: str) -> None:
        self.layer, self.name = layer, name
        #: Process group of a layer that synchronizes its batch statistics (``sync="batch"``):
        #: its per-batch statistics are those of the global batch, as in training.
        self.group: Any = None
        self.sums: list[Tensor] | None = None
        self.count: Tensor | None = None
        self.bad: Tensor | None = None

    def statistics(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def observe(self, x: Tensor) -> None:
        stats = [s.double() for s in self.statistics(x)]
        finite = torch.stack([torch.isfinite(s).all() for s in stats]).all()
        if self.sums is None:
            self.sums = [torch.zeros_like(s) for s in stats]
            self.count = torch.zeros((), dtype=torch.float64, device=x.device)
            self.bad = torch.zeros((), dtype=torch.float64, device=x.device)
        for total, s in zip(self.sums, stats, strict=True):
            total.add_(torch.where(finite, s, torch.zeros_like(s)))
        self.count.add_(finite.double())
        self.bad.add_((~finite).double())

    def write(self, means: list[Tensor]) -> None:
        raise NotImplementedError


class _BatchNormEstimator(_Estimator):
    """``running_mean = avg mu_b``, ``running_var = avg s_b^2`` (unbiased per batch)."""

    def statistics(self, x):
        n, mean, centered = _channel_stats(x)
        dims = [0, *range(2, centered.dim())]
        var = centered.square().sum(dim=dims) / (n - 1)
        return [mean, var]

    def write(self, means):
        bn = self.layer
        bn.running_mean.copy_(means[0])
        bn.running_var.copy_(means[1])


class _SWBNEstimator(_BatchNormEstimator):
    """As BatchNorm; the whitening matrix ``W`` (learned online, used in training too) is kept."""

    def statistics(self, x):
        if self.group is None:
            return super().statistics(x)
        layer = self.layer
        layout = group_layout(layer.num_features, layer.group_size)
        n, mean, cov = batch_statistics(_float(x), layout, self.group)
        var = cov.diagonal(dim1=-2, dim2=-1).reshape(-1)[: layer.num_features]
        return [mean, var * (n / (n - 1))]


class _LpEstimator(_Estimator):
    """``running_mean = avg mu_b``, ``running_moment = avg (n/(n-1))^(p/2) mean|x - mu_b|^p``."""

    def statistics(self, x):
        n, mean, centered = _channel_stats(x)
        dims = [0, *range(2, centered.dim())]
        p = self.layer.p
        moment = centered.abs().pow(p).mean(dim=dims) * (n / (n - 1)) ** (p / 2)
        return [mean, moment]

    def write(self, means):
        self.layer.running_mean.copy_(means[0])
        self.layer.running_moment.copy_(means[1])


class _WhiteningEstimator(_Estimator):
    """``running_mean = avg mu_b``; ``Sigma = avg n/(n-1) cov_b`` per group; the eval matrix is
    the layer's own map of ``Sigma`` (``"covariance"``) or the average of the batches' matrices
    ``W(cov_b)`` (``"matrix"``, IterNorm only). DBN keeps ``Sigma`` as ``running_cov``."""

    def __init__(self, layer, name, estimate: WhiteningEstimate) -> None:
        super().__init__(layer, name)
        self.estimate = estimate if not isinstance(layer, DBN) else "covariance"

    def statistics(self, x):
        layer = self.layer
        layout = group_layout(layer.num_features, layer.group_size)
        n, mean, cov = batch_statistics(_float(x), layout, self.group)
        unbiased = canonicalize(cov * (n / (n - 1)), layer.group_mask)
        if self.estimate == "matrix":
            fn = layer._matrix_map()
            matrix, _ = fn.forward(cov, *fn.tensors())
            return [mean, matrix]
        return [mean, unbiased]

    def write(self, means):
        layer = self.layer
        mean, second = means
        layer.running_mean.copy_(mean)
        if isinstance(layer, DBN):
            layer.running_cov.copy_(canonicalize(second, layer.group_mask))
            layer._refresh_eval_map()
            return
        if self.estimate == "matrix":
            layer.running_whitening.copy_(canonicalize(second, layer.group_mask))
            return
        fn = layer._matrix_map()
        tensors = [t.to(second.device) if t is not None else None for t in fn.tensors()]
        matrix, _ = fn.forward(canonicalize(second, layer.group_mask), *tensors)
        layer.running_whitening.copy_(matrix)


def _estimator(
    module: nn.Module, name: str, estimate: WhiteningEstimate
) -> _Estimator | str | None:
    """The estimator of ``module``, a reason it is left alone (str), or None (not a norm)."""
    if isinstance(module, SWBN):
        return _SWBNEstimator(module, name) if module.track_running_stats else None
    if isinstance(module, RunningWhiteningNorm):
        return _WhiteningEstimator(module, name, estimate) if module.track_running_stats else None
    if isinstance(module, PerChannelNorm):
        return _LpEstimator(module, name) if module.track_running_stats else None
    if isinstance(module, _BatchNorm):
        return _BatchNormEstimator(module, name) if module.track_running_stats else None
    if isinstance(module, WhiteningNorm) and getattr(module, "track_running_stats", False):
        return f"{type(module).__name__} keeps running state that recalibrate does not know"
    return None


# ------------------------------------------------------------------------------------------------
# State kept and restored
# ------------------------------------------------------------------------------------------------
def _snapshot(layer: nn.Module) -> dict[str, Any]:
    state: dict[str, Any] = {
        name: buf.detach().clone() for name, buf in layer.named_buffers(recurse=False)
    }
    window = getattr(layer, "_window", None)
    if isinstance(layer, StreamingNorm) and window is not None:
        state["_window"] = (window.pending, window.calls, window.backward_seen)
    return state


@torch.no_grad()
def _restore(layer: nn.Module, state: dict[str, Any]) -> None:
    buffers = dict(layer.named_buffers(recurse=False))
    for name, value in state.items():
        if name == "_window":
            window = layer._window
            window.pending, window.calls, window.backward_seen = value
        else:
            buffers[name].copy_(value)


def _freeze(layers: list[nn.Module]) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Keep the weights fixed during the pass, and the layers quiet: SWBN's online update of W
    (rate 0) and StreamingNorm's long-term statistics (momentum 0) would change what later
    batches see; the layers' own non-finite warnings are replaced by one summary. Returns the
    values to put back."""
    frozen = []
    for layer in layers:
        values: dict[str, Any] = {}
        if isinstance(layer, SWBN):
            values["whitening_rate"] = 0.0
        if isinstance(layer, StreamingNorm):
            values["momentum"] = 0.0
        if hasattr(layer, "check_finite"):
            values["check_finite"] = False
        old = {name: getattr(layer, name) for name in values}
        for name, value in values.items():
            setattr(layer, name, value)
        frozen.append((layer, old))
    return frozen


def recalibrated_layers(model: nn.Module) -> list[str]:
    """Qualified names of the layers :func:`recalibrate` re-estimates in ``model``."""
    names = [
        name
        for name, m in model.named_modules()
        if isinstance(_estimator(m, name, "covariance"), _Estimator)
    ]
    names += [
        name
        for name, m in model.named_modules()
        if isinstance(m, ConvNorm2d) and m.running_autocorr is not None
    ]
    return names


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------
def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
        return type(batch)(*(_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` for a tensor, ``model(batch[0])`` for a tuple or list (``(x, y)``), as
    ``torch.optim.swa_utils.update_bn``; pass ``forward=`` for other batches."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return model(batch[0])
    raise TypeError(
        f"recalibrate: cannot tell the input of a batch of type {type(batch).__name__}; pass "
        "forward=lambda model, batch: model(...)"
    )


def _agree_on_next(has_batch: bool, group: Any, device: torch.device) -> bool:
    """Whether every process has another batch (so the synced layers' collectives match)."""
    if group is None:
        return has_batch
    flag = torch.full((), 1.0 if has_batch else 0.0, dtype=torch.float64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item() > 0)


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# The public function
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = "auto",
    whitening_estimate: WhiteningEstimate = "covariance",
    process_group: Any = None,
    sync: bool = True,
) -> RecalibrationReport:
    r"""Re-estimate every normalization layer's running statistics at the current weights.

    Forwards ``num_batches`` batches (all of ``batches`` if ``None``) with every normalization
    layer in training mode (it normalizes with the batch's statistics, as in training and as
    ``torch.optim.swa_utils.update_bn`` does) and every other module in eval mode (dropout off:
    the statistics are those of the eval-time network), without gradients, and measures each
    layer's input. Each layer's running statistics then become the **equal-weight average over
    the batches** (BatchNorm's cumulative average, ``momentum=None``) of its per-batch statistics
    ``mu_b`` (mean), ``n_b`` (samples per channel: ``N * H * W``):

    * ``torch.nn`` BatchNorm (``_BatchNorm``, timm's ``BatchNormAct2d``, the ``bn`` inside a
      :class:`ConvNorm2d`): ``running_mean = avg_b mu_b``, ``running_var = avg_b s_b^2`` with
      the unbiased batch variance ``s_b^2`` (exactly ``update_bn``).
    * :class:`IterNorm` (and any ``RunningWhiteningNorm``): ``running_mean = avg_b mu_b``;
      ``Sigma = avg_b n_b/(n_b-1) Cov_b`` per group; ``running_whitening = W_T(Sigma)``, the
      layer's own map (``T`` Newton iterations with its ``eps``) of the averaged covariance,
      computed once. ``whitening_estimate="matrix"`` averages the batches' matrices
      ``W_T(Cov_b)`` instead (what the layer's own ``momentum=None`` average does); measured
      worse or equal (see ``docs/guide/statistics.md``): ``W`` is a nonlinear (operator-convex)
      function of the covariance, so the average of per-batch matrices over-amplifies the
      low-variance directions each batch estimates noisily, and it is not additive across
      processes.
    * :class:`DBN`: ``running_cov = Sigma`` as above; ``running_whitening = (Sigma + eps
      I)^-1/2`` (its usual eval map of the running covariance).
    * :class:`SWBN`: ``running_mean``/``running_var`` as BatchNorm; the whitening matrix ``W``
      is learned online and used in training too, so it is kept.
    * :class:`LpNorm`, :class:`StreamingNorm`: ``running_mean = avg_b mu_b``,
      ``running_moment = avg_b (n_b/(n_b-1))^(p/2) mean |x - mu_b|^p`` (LpNorm's own per-batch
      estimate; needs more than one sample per channel per batch, so give StreamingNorm
      batches larger than its training batches of one).
    * :class:`ConvNorm2d` with a running estimate: ``running_autocorr`` = the autocorrelation
      of the current kernel (exact: it depends on the weights only).

    Everything else is restored: every module's training flag, every other buffer of the
    layers (``num_batches_tracked``, SWBN's ``W``, StreamingNorm's windows, non-finite counters),
    momentum (never changed). A batch whose statistics are non-finite in a layer is kept out of
    that layer's average (counted in the report); a layer without a usable batch keeps its
    statistics (warned). Layers with ``track_running_stats=False`` are left alone.

    Distributed: when ``torch.distributed`` is initialized with more than one process (and
    ``sync``), the per-layer sums are all-reduced once at the end, so every process gets the
    equal-weight average over all processes' batches. A whitening layer with ``sync="batch"``
    measures each batch's statistics over the global batch (one more collective per layer and
    batch), as it normalizes in training, so several processes give what one process with the
    concatenated batches gives; the processes agree before each batch
    that all of them have one (whitening layers synchronize their batch statistics inside the
    forward), so uneven iterables stop at the shortest. Every process must call this.

    Args:
        model: the model (a ``LightningModule`` works: its ``forward`` is called).
        batches: an iterable of batches (a ``DataLoader``, a list of tensors).
        num_batches: how many batches to use (``None``: all); more than ``batches`` holds is
            fine.
        forward: ``forward(model, batch)``; default ``model(batch)`` for a tensor and
            ``model(batch[0])`` for a tuple/list.
        device: where batches are moved (``"auto"``: the model's device; ``None``: not moved).
        whitening_estimate: ``"covariance"`` (default) or ``"matrix"``, see IterNorm above.
        process_group: the group to reduce over (default: the world).
        sync: reduce across processes when distributed.

    Returns:
        A :class:`RecalibrationReport`.
    """
    if whitening_estimate not in ("covariance", "matrix"):
        raise ValueError(
            "recalibrate: whitening_estimate must be 'covariance' or 'matrix', got "
            f"{whitening_estimate!r}"
        )
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0
    ):
        raise ValueError(f"recalibrate: num_batches must be an integer >= 0, got {num_batches!r}")
    forward = forward or default_forward
    target = _device_of(model) if device == "auto" else device
    report = RecalibrationReport()

    estimators: list[_Estimator] = []
    convnorms: list[tuple[str, ConvNorm2d]] = []
    for name, module in model.named_modules():
        found = _estimator(module, name, whitening_estimate)
        if isinstance(found, _Estimator):
            estimators.append(found)
        elif isinstance(found, str):
            report.unchanged[name] = found
        if isinstance(module, ConvNorm2d) and module.running_autocorr is not None:
            convnorms.append((name, module))
    group = resolve_process_group("batch" if sync else "none", process_group)
    if sync:
        for est in estimators:
            if isinstance(est.layer, WhiteningNorm):
                est.group = resolve_process_group(est.layer.sync, est.layer.process_group)
    modes = {m: m.training for m in model.modules()}
    layers = [e.layer for e in estimators] + [c for _, c in convnorms]
    saved = {id(layer): _snapshot(layer) for layer in layers}
    hooks = []
    frozen = _freeze(layers)
    try:
        model.eval()
        for layer in layers:
            layer.training = True  # not .train(): a fused layer's drop/act stay in eval mode
        for est in estimators:
            hooks.append(
                est.layer.register_forward_pre_hook(lambda m, args, est=est: est.observe(args[0]))
            )
        iterator = iter(batches)
        while num_batches is None or report.batches < num_batches:
            batch = next(iterator, _END)
            if not _agree_on_next(batch is not _END, group, _device_of(model)):
                break
            forward(model, _to(batch, target) if target is not None else batch)
            report.batches += 1
    finally:
        for h in hooks:
            h.remove()
        for layer in layers:
            _restore(layer, saved[id(layer)])
        for layer, attributes in frozen:
            for name, value in attributes.items():
                setattr(layer, name, value)
        for module, mode in modes.items():
            module.training = mode

    if group is not None and estimators:
        # One collective for every layer's sums and counts. Every process contributes the same
        # layout: a layer that saw no batch here adds zeros of the shape it would have had.
        packed = _pack(estimators)
        dist.all_reduce(packed, group=group)
        _unpack(estimators, packed)
    unreached = "no batch reached it"  # an unused branch (an auxiliary head): not a problem
    for est in estimators:
        if est.sums is None:
            report.unchanged[est.name] = unreached
            continue
        count, bad = float(est.count), int(est.bad)
        if bad:
            report.skipped[est.name] = bad
        if count == 0:
            report.unchanged[est.name] = "every batch had non-finite statistics"
            continue
        est.write([s / count for s in est.sums])
        report.layers.append(est.name)
    for name, conv in convnorms:
        conv.running_autocorr.copy_(_autocorrelation(conv).to(conv.running_autocorr.dtype))
        report.layers.append(name)
    if report.skipped or any(why != unreached for why in report.unchanged.values()):
        problems = [
            f"'{n}' left as it was ({why})"
            for n, why in report.unchanged.items()
            if why != unreached
        ]
        problems += [
            f"'{n}': {k} batch(es) with non-finite statistics kept out"
            for n, k in report.skipped.items()
            if n not in report.unchanged
        ]
        warnings.warn("recalibrate: " + "; ".join(problems), RuntimeWarning, stacklevel=3)
    return report


_END = object()


def _autocorrelation(conv: ConvNorm2d) -> Tensor:
    from .functional import convnorm as CF

    return CF.kernel_autocorrelation(conv.weight.detach())


def _shapes(est: _Estimator) -> list[tuple[int, ...]]:
    layer = est.layer
    c = layer.num_features
    if isinstance(est, _WhiteningEstimator):
        layout = group_layout(c, layer.group_size)
        return [(c,), (layout.num_groups, layout.group_size, layout.group_size)]
    return [(c,), (c,)]


def _pack(estimators: list[_Estimator]) -> Tensor:
    device = None
    for est in estimators:
        if est.sums is not None:
            device = est.sums[0].device
            break
    if device is None:
        device = _device_of(estimators[0].layer)
    parts = []
    for est in estimators:
        shapes = _shapes(est)
        if est.sums is None:
            size = sum(math.prod(s) for s in shapes) + 2
            parts.append(torch.zeros(size, dtype=torch.float64, device=device))
        else:
            parts.extend(s.reshape(-1).to(device) for s in est.sums)
            parts.append(est.count.view(1).to(device))
            parts.append(est.bad.view(1).to(device))
    return torch.cat(parts)


def _unpack(estimators: list[_Estimator], packed: Tensor) -> None:
    offset = 0
    for est in estimators:
        layer_device = _device_of(est.layer)
        sums = []
        for shape in _shapes(est):
            size = math.prod(shape)
            sums.append(packed[offset : offset + size].view(shape).to(layer_device))
            offset += size
        count, bad = packed[offset].to(layer_device), packed[offset + 1].to(layer_device)
        offset += 2
        if float(count) + float(bad) > 0:
            est.sums, est.count, est.bad = sums, count, bad
        else:
            est.sums = None
