"""Lp normalization (Liao, Kawaguchi & Poggio 2016): BatchNorm by the p-th absolute central moment."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import functional
from ..functional._backend import compiling
from ..functional.lp import check_p
from ..registry import NormFamily, register_family
from ._shared import Float32Buffers, check_eps, check_input, check_momentum, read_batchnorm
from .base import layer_options, statistics_dtype, warns_at_batch
from .norm_act import NormActMixin

__all__ = ["LpNorm"]


class PerChannelNorm(Float32Buffers):
    """Shared machinery of the per-channel Lp normalizers (:class:`LpNorm`, :class:`StreamingNorm`).

    Options, validation (at construction and on every later assignment of a schedulable
    option), float32 running buffers, input checks, the eval map, ``from_batchnorm`` and
    ``extra_repr``. Eval is the per-channel affine map
    ``y = weight * (x - running_mean) * (running_moment + eps)^(-1/p) + bias``.
    """

    #: Attributes that schedules may change between steps.
    schedulable: ClassVar[tuple[str, ...]] = ("eps", "momentum")
    #: Whether training normalizes with the batch's own statistics (so needs more than one
    #: sample per channel); False for StreamingNorm, which trains at batch size 1.
    uses_batch_statistics: ClassVar[bool] = True

    def __init__(
        self,
        num_features: int,
        *,
        p: float,
        eps: float,
        momentum: float | None,
        affine: bool,
        track_running_stats: bool,
        check_finite: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"{name}: num_features must be a positive integer, got {num_features!r}"
            )
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"{name}: dtype must be a floating-point dtype, got {dtype}")
        for option, value in (
            ("affine", affine),
            ("track_running_stats", track_running_stats),
            ("check_finite", check_finite),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: {option} must be True or False, got {value!r}")
        self.num_features = num_features
        object.__setattr__(self, "p", check_p(p, name))
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.check_finite = check_finite
        #: Where model surgery put this layer (see :class:`~lightning_whiten.surgery.Origin`).
        self.origin: Any = None

        factory = {"device": device, "dtype": dtype}
        buffer_factory = {"device": device, "dtype": statistics_dtype(dtype)}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **buffer_factory))
            self.register_buffer("running_moment", torch.ones(num_features, **buffer_factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_moment", None)
            self.register_buffer("num_batches_tracked", None)
        #: Training batches whose statistics were non-finite (kept out of every running
        #: statistic), counted on the layer's device without a host sync; not saved.
        self.register_buffer(
            "nonfinite_batches", torch.zeros((), dtype=torch.long, device=device), persistent=False
        )

    # ----------------------------------------------------------------------------------------
    # Messages, validation, module plumbing
    # ----------------------------------------------------------------------------------------
    def describe(self) -> str:
        """Short name for messages: the qualified name if known, else the class and size."""
        base = f"{type(self).__name__}({self.num_features}, p={self.p:g})"
        return f"{base} at '{self.origin.name}'" if self.origin is not None else base

    def __setattr__(self, name: str, value: Any) -> None:
        owner = type(self).__name__
        if name == "p" and "p" in self.__dict__:
            raise AttributeError(
                f"{owner}: p is fixed at construction (running_moment is a p-th moment); "
                "build a new layer for another p"
            )
        if name == "momentum":
            check_momentum(owner, value)
        elif name == "eps":
            value = check_eps(owner, value)
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        parts = [
            f"{self.num_features}",
            f"p={self.p:g}",
            f"eps={self.eps}",
            f"momentum={self.momentum}",
            *self._extra_repr_options(),
            f"affine={self.affine}",
            f"track_running_stats={self.track_running_stats}",
        ]
        return ", ".join(parts)

    def _extra_repr_options(self) -> list[str]:
        return []

    def _check_input(self, x: Tensor, batch_stats: bool) -> None:
        check_input(self.describe(), x, self.num_features)
        if x.numel() == 0:
            raise ValueError(f"{self.describe()}: got an empty input of shape {tuple(x.shape)}")
        if batch_stats and self.uses_batch_statistics and x.numel() // self.num_features < 2:
            raise ValueError(
                f"{self.describe()}: batch statistics need more than one sample per channel, "
                f"got input of shape {tuple(x.shape)} (1 sample); use a larger batch, call "
                ".eval(), or StreamingNorm, which trains at batch size 1"
            )

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    # ----------------------------------------------------------------------------------------
    # Eval
    # ----------------------------------------------------------------------------------------
    def inference_map(self) -> tuple[Tensor, Tensor]:
        """``(matrices (C, 1, 1), offset (C,))`` of the eval map, for export.

        Eval output = ``weight * (matrices[c, 0, 0] * (x_c - offset_c)) + bias`` with
        ``matrices = (running_moment + eps)^(-1/p)`` and ``offset = running_mean`` (the
        whitening layers' ``_inference_map`` layout, groups of one channel).
        """
        if not self.track_running_stats:
            raise RuntimeError(
                f"{self.describe()}: no running statistics (track_running_stats=False): eval "
                "uses batch statistics and is not a fixed map"
            )
        scale = functional.lp_inference_scale(self.running_moment, self.p, self.eps)
        return scale.view(-1, 1, 1), self.running_mean

    def _eval_map(self, xf: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        matrices, offset = self.inference_map()
        scale = matrices.view(-1).to(xf.dtype)
        a = scale if weight is None else scale * weight
        shift = -a * offset.to(xf.dtype)
        if bias is not None:
            shift = shift + bias
        return functional.channel_affine(xf, a, shift)

    def _warn_nonfinite(self, finite: Tensor) -> None:
        if (
            self.check_finite
            and warns_at_batch(finite.device)
            and not compiling()
            and not bool(finite)
        ):
            warnings.warn(
                f"{self.describe()}: non-finite values in the training batch (mean or moment is "
                "NaN/inf); running statistics were left unchanged for this batch",
                RuntimeWarning,
                stacklevel=4,
            )

    # ----------------------------------------------------------------------------------------
    # Conversion from BatchNorm
    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_batchnorm(cls, bn: nn.Module, **options: Any):
        """A layer whose eval output equals ``bn``'s eval output.

        The BN's running mean becomes ``running_mean``; its variance becomes the p-th moment
        of a Gaussian with that variance (BN's ``eps`` included), ``running_moment + eps =
        E|Z|^p (running_var + bn.eps)^(p/2)``: for ``p = 1`` the MAD ``sqrt(2/pi) sqrt(var +
        eps)``. The Lp normalizer of Gaussian data is ``(E|Z|^p)^(1/p)`` times its standard
        deviation (``sqrt(2/pi)`` for ``p = 1``), so ``weight`` is multiplied by that factor:
        the eval output is BN's exactly, and the first training batches of Gaussian-like
        activations give BN's output scale too (training continues smoothly from a pretrained
        BN). Also taken over: ``bias`` and ``requires_grad``, ``momentum``, ``num_batches_tracked``,
        device, dtype and train/eval mode. Works for ``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``,
        timm's ``BatchNormAct2d`` (its act/drop are the caller's) and torchvision/timm
        ``FrozenBatchNorm2d`` (frozen affine -> parameters with ``requires_grad=False``).

        Args:
            bn: the normalization module to replace.
            **options: constructor options of this class (``p``, ``eps``, ...); they override
                what is taken from ``bn``.
        """
        name = f"{cls.__name__}.from_batchnorm"
        state = read_batchnorm(bn, name)
        num_features, tracks, weight = state.num_features, state.tracks, state.weight
        kwargs = state.layer_options()
        if hasattr(bn, "momentum"):  # frozen BatchNorms have none: the layer's default applies
            kwargs["momentum"] = bn.momentum
        kwargs.update(options)
        p = check_p(kwargs.get("p", cls._default_p()), name)
        factor = functional.gaussian_abs_moment(p) ** (1.0 / p)
        if not tracks and not cls.uses_batch_statistics:
            raise ValueError(
                f"{name}: {type(bn).__name__}({num_features}) has no running statistics "
                f"(track_running_stats=False); {cls.__name__} evaluates with its long-term "
                "statistics, which would start untrained: train it, or convert to LpNorm"
            )
        if not tracks and kwargs["track_running_stats"]:
            raise ValueError(
                f"{name}: {type(bn).__name__}({num_features}) has no running statistics "
                "(track_running_stats=False); pass track_running_stats=False to convert it"
            )
        if not tracks and p != 2 and "track_running_stats" not in options:
            raise ValueError(
                f"{name}: {type(bn).__name__}({num_features}) uses batch statistics in eval "
                f"(track_running_stats=False), which {cls.__name__} reproduces only for p=2; "
                "pass track_running_stats=False to convert it anyway"
            )
        if p != 2 and weight is None and not kwargs["affine"]:
            raise ValueError(
                f"{name}: {type(bn).__name__}({num_features}) has no affine weight to carry the "
                f"Gaussian factor (E|Z|^p)^(1/p) = {factor:.4f} of p={p:g}; pass affine=True "
                "(the factor becomes a learnable weight) or p=2"
            )
        layer = cls(num_features, **kwargs)
        with torch.no_grad():
            if layer.weight is not None:
                w = weight if weight is not None else torch.ones_like(layer.weight)
                b = state.bias if state.bias is not None else torch.zeros_like(layer.bias)
                layer.weight.copy_(w.to(torch.float64) * factor)
                layer.bias.copy_(b)
                state.copy_trainability(layer)
            if tracks and layer.track_running_stats:
                assert state.running_mean is not None and state.running_var is not None
                std = (state.running_var.to(torch.float64) + state.eps).sqrt()
                layer.running_mean.copy_(state.running_mean)
                layer.running_moment.copy_((factor * std) ** p - layer.eps)
                state.copy_counter(layer)
        layer.train(bn.training)
        return layer

    @classmethod
    def _default_p(cls) -> float:
        # From the whole constructor chain: a fused counterpart (``LpNormAct``) inherits its
        # ``__init__`` from NormActMixin, whose own signature is only ``*args, **kwargs``.
        return layer_options(cls)["p"]


class LpNorm(PerChannelNorm):
    """Batch Lp normalization: BatchNorm by the p-th absolute central moment (Liao et al. 2016).

    In training, per channel over the batch and spatial positions (``n = N * H * W`` samples)::

        m = mean(x),   d = mean |x - m|^p,   y = weight * (x - m) / (d + eps)^(1/p) + bias

    ``p = 1`` (the default, the paper's recommendation) divides by the mean absolute deviation;
    ``p = 2`` is exactly BatchNorm (it runs ATen's BatchNorm kernels, running statistics
    included); any real ``p >= 1`` works. In eval, the running statistics give a fixed
    per-channel affine map (:meth:`inference_map`).

    Choices the paper leaves open:

    * ``eps`` is added to the p-th moment before the ``1/p``-th root, so for ``p = 1`` it is in
      the units of ``x`` (BatchNorm's is in squared units).
    * The running moment averages ``(n / (n - 1))^(p/2) d``: unbiased for Gaussian data for every
      ``p`` (``x_i - m`` has variance ``(n-1)/n sigma^2``), and BatchNorm's Bessel correction
      at ``p = 2``.
    * Backward: the exact gradient of the formula above, including the mean's dependence
      through ``d`` (for ``p = 1`` it does not vanish); the derivative of ``|r|`` at ``r = 0``
      is ``sign(0) = 0``. One autograd node with a hand-written backward that saves only the
      input (as BatchNorm does).

    Args:
        num_features: channels ``C`` (dim 1 of the input).
        p: order of the moment, a real number ``>= 1``; fixed after construction.
        eps: added to the moment; must be positive.
        momentum: running-average factor (``None``: cumulative average, as in BatchNorm).
        affine: learn per-channel ``weight`` and ``bias``.
        track_running_stats: keep ``running_mean``/``running_moment`` for eval; otherwise eval
            uses batch statistics.
        check_finite: warn (naming the layer) when a training batch is non-finite on CPU (its
            statistics are kept out of the running ones either way).
        device, dtype: of the parameters (running buffers stay at least float32).

    Inputs ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``; the output keeps
    the input's shape, dtype and memory format. Statistics are computed in float32 (float64
    for float64 inputs) whatever the autocast dtype. No cross-process synchronization (as
    ``nn.BatchNorm2d``; not converted by ``SyncBatchNorm.convert_sync_batchnorm``).
    """

    def __init__(
        self,
        num_features: int,
        *,
        p: float = 1.0,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features,
            p=p,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            check_finite=check_finite,
            device=device,
            dtype=dtype,
        )

    def forward(self, x: Tensor) -> Tensor:
        batch_stats = self.training or not self.track_running_stats
        self._check_input(x, batch_stats)
        cdtype = self._compute_dtype(x)
        with functional.full_precision(x):
            xf = x.to(cdtype)
            weight = self.weight.to(cdtype) if self.weight is not None else None
            bias = self.bias.to(cdtype) if self.bias is not None else None
            if batch_stats:
                result = functional.lp_normalize(xf, self.p, self.eps, weight, bias)
                if self.training and self.track_running_stats:
                    self._update_running(result)
                y = result.output
            else:
                y = self._eval_map(xf, weight, bias)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, result: functional.LpResult) -> None:
        n = result.count
        moment = result.batch_moment * ((n / (n - 1)) ** (self.p / 2))
        stats = torch.stack([result.mean, moment])
        finite = torch.isfinite(stats).all()
        self.num_batches_tracked.add_(finite)
        running = torch.stack([self.running_mean, self.running_moment])
        # A non-finite batch interpolates towards the buffers themselves: no change, no sync.
        target = torch.where(finite, stats.to(running.dtype), running)
        if self.momentum is None:
            factor = 1.0 / self.num_batches_tracked.clamp_min(1).to(running.dtype)
            self.running_mean.lerp_(target[0], factor)
            self.running_moment.lerp_(target[1], factor)
        else:
            self.running_mean.lerp_(target[0], float(self.momentum))
            self.running_moment.lerp_(target[1], float(self.momentum))
        self.nonfinite_batches.add_(~finite)
        self._warn_nonfinite(finite)


class LpNormAct(NormActMixin, LpNorm):
    """:class:`LpNorm` followed by ``drop`` and ``act`` (replaces timm's ``BatchNormAct2d``)."""


# Per-channel: no channel groups to keep inside a producer's, folds into any producer.
register_family(
    NormFamily("lpnorm", LpNorm, act_layer=LpNormAct, group_option=None, description=__doc__)
)
