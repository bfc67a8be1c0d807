"""Shared machinery of the whitening layers: options, buffers, input checks, running statistics."""

from __future__ import annotations

import inspect
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..distributed import SYNC_MODES, SyncMode, resolve_process_group
from ..functional import (
    GroupLayout,
    MatrixMap,
    WhitenResult,
    full_precision,
    group_layout,
    grouped_affine,
    valid_mask,
    whiten,
)
from ..functional._backend import compiling
from ._shared import (
    FLOAT_BUFFER_DTYPES,
    Float32Buffers,
    check_eps,
    check_input,
    check_momentum,
    read_batchnorm,
)

if TYPE_CHECKING:
    from ..surgery.source import Origin

__all__ = ["RunningWhiteningNorm", "WhiteningNorm", "layer_options"]

_FLOAT_BUFFER_DTYPES = FLOAT_BUFFER_DTYPES
# Constructor arguments that describe the module being replaced rather than a choice of method.
_STRUCTURAL = ("num_features", "device", "dtype", "act", "drop")


def layer_options(cls: type[nn.Module]) -> dict[str, Any]:
    """``{option: default}`` of a layer class's keyword options, from its constructor signatures.

    Walks the class hierarchy because layers declare only their own options and pass the rest
    on as keywords (``**kwargs``); the most derived declaration of an option wins. Structural
    arguments (``num_features``, ``device``, ``dtype``, ``act``, ``drop``) are left out;
    options without a default map to ``inspect.Parameter.empty``.
    """
    options: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is nn.Module or klass is object:
            continue
        parameters = list(inspect.signature(init).parameters.values())[1:]
        for p in parameters:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in _STRUCTURAL:
                continue
            options.setdefault(p.name, p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break  # this constructor takes nothing further up the hierarchy
    return options


def warns_at_batch(device: torch.device) -> bool:
    """Whether a layer on ``device`` reads its non-finite flag on the host at every batch.

    Free on CPU; on an accelerator it would stall every step, so there the device-side count
    ``nonfinite_batches`` is read once per epoch (by ``WhiteningCallback``) instead.
    """
    return device.type == "cpu"


class WhiteningNorm(Float32Buffers):
    """Base class of group-wise batch whitening layers (:class:`IterNorm`, :class:`DBN`, :class:`SWBN`).

    In training, an input ``(N, C, *spatial)`` is whitened per group of ``group_size`` channels
    with its batch mean and covariance, then scaled and shifted per channel by ``weight`` and
    ``bias``. In eval, a fixed affine map from the running buffers is applied
    (:meth:`inference_map`). Subclasses define how the whitening matrix follows from the batch
    covariance (:meth:`_matrix_map`) and what they keep as running state.

    It deliberately does not subclass ``torch.nn.modules.batchnorm._BatchNorm``: Lightning's
    ``sync_batchnorm=True`` and ``SyncBatchNorm.convert_sync_batchnorm`` convert every such
    subclass into a plain ``SyncBatchNorm``, which would silently undo the whitening.

    Numerics: covariances and matrix functions run in float32 (float64 for float64 inputs)
    whatever the autocast or module dtype; the output has the input's dtype and memory format.
    Running buffers are kept in at least float32 even when the module is cast to half precision.

    Non-finite batches: if a training batch gives a non-finite mean, covariance or whitening
    matrix (a diverged Newton iteration), every running buffer (and SWBN's whitening matrix) is
    left unchanged -- without a host synchronization -- and the ``nonfinite_batches`` buffer
    counts the skipped batch. With ``check_finite=True`` (the default) a ``RuntimeWarning``
    names the layer: at once on CPU (outside ``torch.compile``), and at the end of the training
    epoch from :class:`WhiteningCallback` on accelerators, where reading the flag every step
    would synchronize the host with the device. The output is non-finite too, so the loss shows
    it (and AMP's gradient scaler skips the step as usual).

    Args (keyword-only here; every layer declares its own defaults for ``group_size`` and the
    options it adds, and passes these on):
        num_features: channels ``C``.
        group_size: channels per group; the last group is smaller when it does not divide
            ``num_features``; clamped to ``num_features``; ``None`` means the layer's default.
        eps, momentum: see each layer; ``momentum=None`` is a cumulative average, as in BN.
        affine: learn per-channel ``weight`` and ``bias``.
        track_running_stats: keep running buffers for eval; without them eval uses batch
            statistics.
        sync: ``"batch"`` reduces statistics across processes under ``torch.distributed``
            (no-op in a single process); ``"none"`` keeps them per process.
        check_finite: warn when a training batch is non-finite (its statistics are dropped and
            counted in ``nonfinite_batches`` either way).
    """

    #: Version of the state-dict layout; older checkpoints are migrated in
    #: :meth:`_load_from_state_dict` (see :meth:`_migrate_state`).
    _version: ClassVar[int] = 1
    #: Attributes that may change between steps (schedules): structural ones such as
    #: ``group_size`` may not, they shape the buffers.
    schedulable: ClassVar[tuple[str, ...]] = ("eps", "momentum")
    #: Whether eval output can equal a BatchNorm's that uses batch statistics in eval.
    exact_without_running_stats: ClassVar[bool] = False
    #: Warn (once) when a training batch has fewer samples than channels per group: the
    #: covariance is then rank-deficient and an exact inverse square root (DBN) amplifies the
    #: directions without data by up to 1/sqrt(eps).
    _warns_rank_deficient: ClassVar[bool] = False

    def __init__(
        self,
        num_features: int,
        *,
        group_size: int | None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        sync: SyncMode = "batch",
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if group_size is None:
            group_size = layer_options(type(self))["group_size"]
        try:
            layout = group_layout(num_features, group_size)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        if sync not in SYNC_MODES:
            raise ValueError(f"{name}: sync must be one of {SYNC_MODES}, got {sync!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"{name}: dtype must be a floating-point dtype, got {dtype}")
        self.num_features = num_features
        #: Channels per group actually used (``group_size`` clamped to ``num_features``).
        self.group_size = layout.group_size
        #: The ``group_size`` that was asked for (differs when it was clamped).
        self.requested_group_size = group_size
        # The momentum reaches compiled graphs as a tensor (filled in place when a schedule
        # moves it), not as a Python float that torch.compile would specialize on and
        # recompile for at every new value. Not saved: ``momentum`` is the option.
        self.register_buffer(
            "_momentum_factor",
            torch.zeros((), dtype=statistics_dtype(dtype) or torch.get_default_dtype(),
                        device=device),
            persistent=False,
        )  # fmt: skip
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.sync = sync
        self.check_finite = check_finite
        #: Process group used when ``sync="batch"`` (``None``: the default world group).
        self.process_group: Any = None
        #: Where model surgery put this layer: its qualified name and the module it replaced
        #: (set by :func:`lightning_whiten.convert`, read by messages and ``export``).
        self.origin: Origin | None = None

        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        buffers = {"device": device, "dtype": statistics_dtype(dtype)}
        if track_running_stats:
            self.register_buffer("running_mean", torch.empty(num_features, **buffers))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("num_batches_tracked", None)
        self.register_buffer("group_mask", valid_mask(layout, device), persistent=False)
        #: Training batches skipped for non-finite statistics, counted on the layer's device
        #: (so that counting never synchronizes with the host); not saved in the state_dict.
        self.register_buffer(
            "nonfinite_batches", torch.zeros((), dtype=torch.long, device=device), persistent=False
        )
        #: Training batches whose whitening matrix diverged (finite but far outside what the
        #: method can produce: Newton's iteration in float32 at large ``iterations``, SWBN's
        #: online update at too large a rate), likewise kept out of the running statistics.
        self.register_buffer(
            "diverged_batches", torch.zeros((), dtype=torch.long, device=device), persistent=False
        )
        self._register_state(buffers)
        self._rank_deficiency_warned = False  # see _warns_rank_deficient
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------
    # Hooks for subclasses
    # ----------------------------------------------------------------------------------------
    def _register_state(self, factory: dict[str, Any]) -> None:
        """Register the method's own buffers (uninitialized: :meth:`reset_running_stats` fills
        them). ``factory`` holds the statistics' device and dtype."""

    def _reset_state(self) -> None:
        """Reset the method's own buffers (called by :meth:`reset_running_stats`)."""

    def _matrix_map(self) -> MatrixMap:
        """The covariance -> whitening matrix map of this method (differentiable, small)."""
        raise NotImplementedError

    def _batch_map(self, samples: int) -> MatrixMap:
        """The map for one training batch of ``samples`` samples per channel (summed over the
        processes it is synced across); DBN narrows it when the batch is too small."""
        return self._matrix_map()

    #: Whether :meth:`_batch_map` depends on the batch size (DBN's small-batch cap). Such a
    #: layer reads the synced sample count before whitening (one scalar all-reduce per step
    #: under DDP), so that every rank whitens with the same map even when batches are uneven.
    _batch_map_reads_samples: bool = False

    def _samples_per_channel(self, x: Tensor, group: Any) -> int:
        """Samples per channel of this training batch, summed over the synced processes."""
        local = x.numel() // self.num_features
        if group is None or not self._batch_map_reads_samples:
            return local
        count = torch.tensor([float(local)], dtype=torch.float64, device=x.device)
        torch.distributed.all_reduce(count, group=group)
        return int(count.item())

    def inference_map(self) -> tuple[Tensor, Tensor]:
        """The eval-time map as ``(matrices (G, d, d), offset (C,))``: eval output is
        ``weight * (A_g (x_g - offset_g)) + bias`` per group (``A`` block-diagonal)."""
        raise NotImplementedError

    def _update_state(
        self, stats: WhitenResult, matrix: Tensor, factor: Tensor, finite: Tensor
    ) -> Tensor | None:
        """Update method-specific state after a training batch (guarded by ``finite``: the
        batch's statistics are usable). May return a flag: the method rejected its own update
        of this batch as diverged (counted in ``diverged_batches``)."""
        return None

    def _diverged(self, stats: WhitenResult, matrix: Tensor) -> Tensor | None:
        """A device-side flag: the batch's whitening matrix is finite but diverged, so the
        batch must stay out of every running statistic (``None``: the method cannot diverge)."""
        return None

    def _set_running_stats(self, mean: Tensor, var: Tensor, eps: float) -> None:
        """Initialize the running state so that eval equals BatchNorm with these statistics."""
        raise NotImplementedError

    @classmethod
    def _options_from_batchnorm(cls, bn: nn.Module) -> dict[str, Any]:
        """Constructor options taken over from a BatchNorm (before user overrides)."""
        # Frozen BatchNorms have no momentum: the layer's own default applies then.
        return {"momentum": bn.momentum} if hasattr(bn, "momentum") else {}

    def _migrate_state(self, state_dict: dict[str, Any], prefix: str, version: int) -> None:
        """Rewrite ``state_dict`` entries saved by layout ``version`` (< ``_version``) in place."""

    # ----------------------------------------------------------------------------------------
    # Initialization (as torch's _NormBase)
    # ----------------------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        """Running statistics back to their initial values (eval is then the identity map up
        to ``eps``); also clears the non-finite batch count."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.num_batches_tracked.zero_()
        self.nonfinite_batches.zero_()
        self.diverged_batches.zero_()
        self._reset_state()

    def reset_parameters(self) -> None:
        """Running statistics reset, ``weight = 1``, ``bias = 0``."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # type: ignore[override]
        version = local_metadata.get("version", 1)
        if version < self._version:
            self._migrate_state(state_dict, prefix, version)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ----------------------------------------------------------------------------------------
    # Layout helpers
    # ----------------------------------------------------------------------------------------
    @property
    def layout(self) -> GroupLayout:
        return group_layout(self.num_features, self.group_size)

    @property
    def num_groups(self) -> int:
        return self.layout.num_groups

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """The size of each channel group, e.g. ``(64, 64, 32)``."""
        return self.layout.sizes

    def _identity_matrices(self, **factory: Any) -> Tensor:
        g, d = self.num_groups, self.group_size
        return torch.eye(d, **factory).expand(g, d, d).clone()

    def _grouped(self, values: Tensor, fill: float = 1.0) -> Tensor:
        """``(C,)`` -> ``(G, d)``, padding channels filled with ``fill``."""
        pad = self.num_groups * self.group_size - self.num_features
        if pad:
            values = torch.cat([values, values.new_full((pad,), fill)])
        return values.view(self.num_groups, self.group_size)

    def _diag_matrices(self, values: Tensor) -> Tensor:
        """``(C,)`` -> block-diagonal ``(G, d, d)`` with ``values`` on the diagonal."""
        return torch.diag_embed(self._grouped(values))

    def describe(self) -> str:
        """Short name for messages: the qualified name if known, else the class and options."""
        base = f"{type(self).__name__}({self.num_features}, group_size={self.group_size})"
        return f"{base} at '{self.origin.name}'" if self.origin is not None else base

    # ----------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor, batch_stats: bool, synced: bool = False) -> None:
        check_input(self.describe(), x, self.num_features)
        # Synced across processes, what counts is the global batch (checked after the
        # reduction, see _normalize), as SyncBatchNorm does.
        if batch_stats and not synced:
            samples = x.numel() // self.num_features
            if samples < 2:
                raise ValueError(
                    f"{self.describe()}: batch statistics need more than one sample per channel "
                    f"group, got input of shape {tuple(x.shape)} ({samples} sample); use a larger "
                    "batch or call .eval()"
                )

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def forward(self, x: Tensor) -> Tensor:
        batch_stats = self.training or not self.track_running_stats
        return self._normalize(x, batch_stats=batch_stats, update=self.training, affine=True)

    def whiten_batch(self, x: Tensor) -> Tensor:
        """The training-mode transform without affine, touching no state (for diagnostics).

        Uses the statistics of ``x`` alone (no cross-process sync) and updates no running
        buffer or whitening matrix; SND and whiteness measurements are built on it.
        """
        return self._normalize(x, batch_stats=True, update=False, affine=False)

    def _normalize(self, x: Tensor, batch_stats: bool, update: bool, affine: bool) -> Tensor:
        group = None
        if batch_stats and update:
            group = resolve_process_group(self.sync, self.process_group)
        self._check_input(x, batch_stats, synced=group is not None)
        cdtype = self._compute_dtype(x)
        with full_precision(x):
            xf = x.to(cdtype)
            weight = self.weight.to(cdtype) if affine and self.weight is not None else None
            bias = self.bias.to(cdtype) if affine and self.bias is not None else None
            if batch_stats:
                if update and self._warns_rank_deficient and not compiling():
                    self._warn_if_rank_deficient(x, group)
                fn = self._batch_map(self._samples_per_channel(x, group))
                result = whiten(xf, fn, self.group_size, weight, bias, group)
                # Only a rank with a one-sample batch reads the global count (no sync else).
                local_one = group is not None and x.numel() < 2 * self.num_features
                if local_one and float(result.count) < 2:
                    raise ValueError(
                        f"{self.describe()}: batch statistics need more than one sample "
                        "per channel group across all processes, got one in total"
                    )
                if update:
                    self._update(result, result.matrix, x)
                y = result.output
            else:
                matrix, offset = self.inference_map()
                y = grouped_affine(xf, matrix.to(cdtype), offset.to(cdtype), weight, bias)
        return y.to(x.dtype)

    def _warn_if_rank_deficient(self, x: Tensor, group: Any) -> None:
        if self._rank_deficiency_warned:
            return
        processes = torch.distributed.get_world_size(group) if group is not None else 1
        samples = x.numel() // self.num_features * processes
        if samples <= self.group_size:  # centered: rank at most samples - 1
            self._rank_deficiency_warned = True
            warnings.warn(
                f"{self.describe()}: {samples} samples per batch for groups of "
                f"{self.group_size} channels: the batch covariance is rank-deficient, and "
                f"whitening amplifies the directions without data by up to 1/sqrt(eps) "
                f"({(1 / self.eps) ** 0.5:.0f}x), which destabilizes training. Use a larger batch, "
                "a smaller group_size, or IterNorm (its truncated iteration bounds the gain).",
                UserWarning,
                stacklevel=4,
            )

    @torch.no_grad()
    def _update(self, moments: WhitenResult, matrix: Tensor, x: Tensor) -> None:
        # The matrix too: Newton's iteration can diverge (large T in float32) on a finite
        # covariance, and one NaN matrix would poison the running average for good.
        finite = all_finite(moments.cov, moments.mean, matrix)
        diverged = self._diverged(moments, matrix)
        usable = finite if diverged is None else finite & ~diverged
        if self.track_running_stats:
            self.num_batches_tracked.add_(usable.to(self.num_batches_tracked.dtype))
        if self._cumulative:
            # Cumulative moving average, as torch's BatchNorm with momentum=None.
            steps = (
                self.num_batches_tracked
                if self.track_running_stats
                else torch.ones((), device=moments.mean.device)
            )
            factor = 1.0 / steps.clamp_min(1).to(moments.mean.dtype)
        else:
            factor = self._momentum_factor.to(moments.mean.dtype)
        if self.track_running_stats:
            lerp_(self.running_mean, moments.mean, factor, usable)
        rejected = self._update_state(moments, matrix.detach(), factor, usable)
        if rejected is not None:
            diverged = rejected if diverged is None else diverged | rejected
        self.nonfinite_batches.add_((~finite).to(self.nonfinite_batches.dtype))
        if diverged is not None:
            self.diverged_batches.add_((finite & diverged).to(self.diverged_batches.dtype))
        if not (self.check_finite and warns_at_batch(finite.device) and not compiling()):
            return
        if not bool(finite):
            largest = float(x.detach().abs().amax()) if x.numel() else 0.0
            cause = (
                "the input has NaN/inf values"
                if largest != largest or largest == float("inf")
                else f"the input is finite but as large as {largest:.3g}, which overflows the "
                "float32 covariance (normalize or rescale the input)"
                if largest > 1e15
                else "the mean, covariance or whitening matrix is NaN/inf"
            )
            warnings.warn(
                f"{self.describe()}: non-finite statistics in the training batch ({cause}); "
                "running statistics were left unchanged for this batch",
                RuntimeWarning,
                stacklevel=4,
            )
        elif diverged is not None and bool(diverged):
            warnings.warn(
                f"{self.describe()}: {self._divergence_hint()}; running statistics were left "
                "unchanged for this batch",
                RuntimeWarning,
                stacklevel=4,
            )

    def _divergence_hint(self) -> str:
        return "the whitening matrix of this batch diverged"

    # ----------------------------------------------------------------------------------------
    # Conversion from BatchNorm
    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_batchnorm(cls, bn: nn.Module, **kwargs: Any):
        """A layer whose eval output equals ``bn``'s eval output.

        Carries over the running mean/variance (folded into the running whitening map), the
        affine ``weight``/``bias`` (values and ``requires_grad``), the momentum, the device, the
        dtype and the train/eval mode. Works for ``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``,
        timm's ``BatchNormAct2d`` and torchvision/timm ``FrozenBatchNorm2d`` (whose frozen
        affine becomes parameters with ``requires_grad=False``).

        Args:
            bn: the normalization module to replace.
            **kwargs: constructor options of this class (``group_size``, ``iterations``, ...);
                they override what is taken from ``bn``.
        """
        state = read_batchnorm(bn, f"{cls.__name__}.from_batchnorm")
        num_features, tracks = state.num_features, state.tracks
        options = state.layer_options()
        options.update(cls._options_from_batchnorm(bn))
        options.update(kwargs)
        if not tracks and options["track_running_stats"] is not False:
            raise ValueError(
                f"{cls.__name__}.from_batchnorm: {type(bn).__name__} has no running statistics"
            )
        if (
            not tracks
            and not cls.exact_without_running_stats
            and "track_running_stats" not in kwargs
        ):
            raise ValueError(
                f"{cls.__name__}.from_batchnorm: {type(bn).__name__}({num_features}) uses batch "
                "statistics in eval (track_running_stats=False), which a whitening layer cannot "
                "reproduce; pass track_running_stats=False to convert it anyway"
            )
        layer = cls(num_features, **options)
        with torch.no_grad():
            if layer.weight is not None and state.weight is not None:
                layer.weight.copy_(state.weight)
                layer.bias.copy_(state.bias)
                state.copy_trainability(layer)
            if tracks and layer.track_running_stats:
                layer._set_running_stats(state.running_mean, state.running_var, state.eps)
                state.copy_counter(layer)
        layer.train(bn.training)
        return layer

    # ----------------------------------------------------------------------------------------
    # Module plumbing
    # ----------------------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        # Schedules change options between steps: validate every assignment, not just __init__.
        if name == "momentum":
            check_momentum(type(self).__name__, value)
        elif name == "eps":
            check_eps(type(self).__name__, value)
        super().__setattr__(name, value)
        if name == "momentum":
            # read by forward instead of momentum itself (no guard on its value)
            super().__setattr__("_cumulative", value is None)
            if value is not None:
                with torch.no_grad():
                    self._momentum_factor.fill_(float(value))

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        if self.momentum is not None:  # exact in the new dtype (a cast rounds it)
            with torch.no_grad():
                self._momentum_factor.fill_(float(self.momentum))
        return self

    def extra_repr(self) -> str:
        parts = [
            f"{self.num_features}",
            f"group_size={self.group_size}",
            *self._extra_repr_options(),
            f"eps={self.eps}",
            f"momentum={self.momentum}",
            f"affine={self.affine}",
            f"track_running_stats={self.track_running_stats}",
        ]
        if self.sync != "batch":
            parts.append(f"sync={self.sync!r}")
        return ", ".join(parts)

    def _extra_repr_options(self) -> list[str]:
        return []


def statistics_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype of running statistics for a module of ``dtype``: at least float32."""
    if dtype is None or dtype in _FLOAT_BUFFER_DTYPES:
        return dtype
    return torch.float32


def all_finite(*tensors: Tensor) -> Tensor:
    """Whether every entry of ``tensors`` is finite, as a 0-dim bool tensor (no host sync).

    One float64 sum per tensor instead of ``isfinite(t).all()`` (four elementwise kernels and a
    reduction each; a measurable share of a small layer's step): NaN and inf propagate through
    a sum, and a float64 sum of float32 (or sane float64) values cannot overflow.
    """
    # (MPS has no float64: a float32 sum there, which could only overflow for huge values)
    wide = torch.float64 if tensors[0].device.type != "mps" else torch.float32
    total = tensors[0].sum(dtype=wide)
    for t in tensors[1:]:
        total = total + t.sum(dtype=wide)
    return torch.isfinite(total)


def lerp_(buffer: Tensor, new: Tensor, factor: Tensor, finite: Tensor) -> None:
    """``buffer <- (1 - factor) buffer + factor new`` unless the batch was non-finite (no sync)."""
    updated = torch.lerp(buffer, new.to(buffer.dtype), factor.to(buffer.dtype))
    buffer.copy_(torch.where(finite, updated, buffer))


class RunningWhiteningNorm(WhiteningNorm):
    """A whitening layer whose eval map is a running whitening matrix: by default the momentum
    average of its batch whitening matrices (IterNorm, as the paper),
    ``running_whitening <- (1 - momentum) running_whitening + momentum W``; DBN derives it
    from a running covariance instead. Eval: ``y = weight * running_whitening (x -
    running_mean) + bias``."""

    def _register_state(self, factory: dict[str, Any]) -> None:
        if self.track_running_stats:
            self.register_buffer("running_whitening", self._identity_matrices(**factory))
        else:
            self.register_buffer("running_whitening", None)

    def _reset_state(self) -> None:
        if self.running_whitening is not None:
            self.running_whitening.copy_(self._identity_matrices())

    def inference_map(self) -> tuple[Tensor, Tensor]:
        return self.running_whitening, self.running_mean

    def _update_state(self, stats, matrix, factor, finite) -> None:
        if self.track_running_stats:
            lerp_(self.running_whitening, matrix, factor, finite)

    def _set_running_stats(self, mean: Tensor, var: Tensor, eps: float) -> None:
        # BatchNorm's eval map is diag((var + eps)^-1/2) (x - mean): its eps is folded in here.
        self.running_mean.copy_(mean)
        self.running_whitening.copy_(self._diag_matrices((var.to(torch.float64) + eps).rsqrt()))
