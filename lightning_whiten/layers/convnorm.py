"""``ConvNorm2d``: a drop-in for ``nn.Conv2d`` with convolutional normalization (Liu et al., 2021)."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import convnorm as CF
from ..functional._backend import full_precision
from ..registry import NormFamily, register_family
from ._shared import FLOAT_BUFFER_DTYPES, Float32Buffers, check_eps, check_momentum

__all__ = ["ConvNorm2d"]

RunningV = Literal["none", "momentum", "cosine"]
AffineInit = Literal["identity", "default"]
_RUNNING_MODES = ("none", "momentum", "cosine")
_AFFINE_INITS = ("identity", "default")
_FLOAT_BUFFER_DTYPES = FLOAT_BUFFER_DTYPES


def _conv_geometry(
    name: str,
    in_channels: int,
    out_channels: int,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: int,
    padding_mode: str,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int] | str, tuple[int, int]]:
    """The convolution's geometry as ``(kernel, stride, padding, dilation)`` pairs, or a
    ``ValueError`` naming the layer and the option that ConvNorm cannot take."""
    for option, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {option} must be a positive int, got {value!r}")
    kernel = _positive_pair(name, "kernel_size", kernel_size)
    stride_ = _positive_pair(name, "stride", stride)
    dilation_ = _positive_pair(name, "dilation", dilation)
    if groups != 1:
        raise ValueError(
            f"{name}: groups must be 1, got {groups!r} (grouped and depthwise convolutions "
            "are not supported: the preconditioner sums over all input channels)"
        )
    if padding_mode != "zeros":
        raise ValueError(
            f"{name}: padding_mode must be 'zeros', got {padding_mode!r} (the full "
            "convolution of ConvNorm is zero-padded)"
        )
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(
                f"{name}: padding must be an int, a pair, 'valid' or 'same', got {padding!r}"
            )
        if padding == "same" and stride_ != (1, 1):
            raise ValueError(f"{name}: padding='same' needs stride 1, got stride {stride}")
        padding_: tuple[int, int] | str = padding
    else:
        padding_ = _pair_of(name, "padding", padding, minimum=0)
    (pt, pb), (pl, pr) = CF.resolve_padding(padding_, kernel, dilation_)
    full = (dilation_[0] * (kernel[0] - 1), dilation_[1] * (kernel[1] - 1))
    if kernel != (1, 1) and (max(pt, pb) > full[0] or max(pl, pr) > full[1]):
        raise ValueError(
            f"{name}: padding {padding!r} exceeds dilation * (kernel_size - 1) = {full}: "
            "ConvNorm crops its output from the full convolution, which has no more rows"
        )
    return kernel, stride_, padding_, dilation_


def _check_options(
    name: str, running_v: Any, affine_init: Any, ramp_steps: Any, ramp_end: Any,
    dtype: torch.dtype | None,
) -> None:  # fmt: skip
    """A ``ValueError``/``TypeError`` naming the layer and the option for a bad value."""
    if running_v not in _RUNNING_MODES:
        raise ValueError(f"{name}: running_v must be one of {_RUNNING_MODES}, got {running_v!r}")
    if affine_init not in _AFFINE_INITS:
        raise ValueError(f"{name}: affine_init must be one of {_AFFINE_INITS}, got {affine_init!r}")
    if isinstance(ramp_steps, bool) or not isinstance(ramp_steps, int) or ramp_steps < 1:
        raise ValueError(f"{name}: ramp_steps must be a positive int, got {ramp_steps!r}")
    if not isinstance(ramp_end, (int, float)) or not 0 < ramp_end <= 1:
        raise ValueError(f"{name}: ramp_end must be in (0, 1], got {ramp_end!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"{name}: dtype must be a floating-point dtype, got {dtype}")


class ConvNorm2d(Float32Buffers):
    """Convolutional normalization: a preconditioned ``nn.Conv2d`` (Liu et al., NeurIPS 2021).

    ``y = bn(affine(P_V(conv_full(x))))``:

    1. ``conv_full``: the convolution with ``weight`` at stride 1 and padding ``K - 1`` (the
       full convolution; ``K = dilation (k - 1) + 1``), size ``N = H + K - 1``;
    2. ``P_V``: per output channel ``i``, ``irfft2(V_i * rfft2(.))`` with
       ``V_i = (sum_j |FFT2(a_ij)|^2 + eps)^(-1/2)`` on the ``N x N`` grid, computed from the
       detached weight, which makes each output channel's operator a tight frame; then the
       crop to what a convolution with ``padding`` produces and the subsampling by ``stride``
       (a conv bias is added after ``P_V``; the authors' code adds it before, which scales
       it by ``V_i(0)``, see :mod:`lightning_whiten.functional.convnorm`);
    3. ``affine``: a learned depthwise ``k x k`` convolution with bias (``padding="same"``);
    4. ``bn``: an optional ``nn.BatchNorm2d`` (``batchnorm=True``; the paper's experiments use
       one, with the ``affine`` flag as its own).

    The math is :mod:`lightning_whiten.functional.convnorm` (checked there against the
    authors' ``PreConv`` and a direct circular-convolution reference). The output has the
    shape ``nn.Conv2d`` would give. 1x1 kernels: ``V_i`` is the scalar
    ``(sum_j a_ij^2 + eps)^(-1/2)`` and the convolution runs directly at its stride.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, device, dtype:
            as ``nn.Conv2d``. ``padding`` may be an int, a pair, ``"valid"`` or
            ``"same"`` (stride 1); per side it may not exceed ``dilation * (kernel_size - 1)``
            (the full convolution) unless the kernel is 1x1.
        groups: must be 1 (grouped and depthwise convolutions are not supported yet).
        padding_mode: must be ``"zeros"`` (ConvNorm's full convolution is zero-padded).
        affine: learn the depthwise ``k x k`` "affine" convolution (``affine_weight``
            ``(C_out, 1, k_h, k_w)``, ``affine_bias`` ``(C_out,)``).
        affine_init: ``"identity"`` (a centered delta kernel and zero bias, so the layer starts
            as the preconditioned convolution) or ``"default"`` (``nn.Conv2d``'s random
            initialization, what the authors' code gets).
        batchnorm: add ``nn.BatchNorm2d(out_channels, affine=affine)`` after it.
        eps: added to the power spectrum ``S``; a zero kernel gives a finite ``V``.
        running_v: what eval uses for ``V``:

            * ``"none"`` (default): ``V`` is recomputed from the current weight at the eval
              input's size: exact at any resolution, nothing to store;
            * ``"momentum"``: a running estimate, ``r <- (1 - momentum) r + momentum r_batch``;
            * ``"cosine"``: the authors' default: the factor follows
              ``max(ramp_end, (1 + cos(pi min(t, ramp_steps) / ramp_steps)) / 2)`` over the
              training forwards ``t`` (1 -> 0.01 over 40,000 steps).

            Training always uses ``V`` of the current weight (as the authors' code does).
        momentum: factor of ``running_v="momentum"`` (schedulable).
        ramp_steps, ramp_end: the cosine ramp of ``running_v="cosine"``.

    Running estimate (``running_v`` ``"momentum"``/``"cosine"``): the authors average ``V``
    itself on the training grid, a buffer whose shape depends on the input size (theirs starts
    as one element and changes shape, so a fresh model cannot load a state dict, and eval at
    another resolution fails). Here the buffer is ``running_autocorr``, the running average of
    the kernel autocorrelation ``r_i(t) = sum_j sum_m a_ij(m) a_ij(m + t)``, shape
    ``(C_out, 2 k_h - 1, 2 k_w - 1)``: fixed at construction, and it determines the averaged
    power spectrum at *every* size exactly (``S`` is linear in ``r``), so eval at any
    resolution recomputes ``V = (S_N(r_running) + eps)^(-1/2)`` on its own grid -- no
    resampling. The one difference from the authors: this averages ``S`` and then takes
    ``S^(-1/2)``, they average ``S^(-1/2)``. The two are equal while the weights are constant
    and differ by second order in the weights' change over the averaging window (about 100
    forwards at the end of the cosine ramp). ``running_autocorr`` starts as the
    autocorrelation of the initial weight (so eval before training is exact; call
    :meth:`reset_running_stats` after editing ``weight`` by hand); a non-finite weight never
    enters it. ``num_batches_tracked`` counts training forwards (saved, so a resumed run
    continues the ramp).

    Numerics: the FFTs and ``V`` run in float32 (float64 for float64 inputs) whatever the
    autocast state or module dtype; the full convolution runs like any convolution (in the
    autocast dtype under autocast). The output has the input's dtype and memory format.
    ``torch.compile(fullgraph=True)`` compiles it.

    Cost: the full convolution is computed at stride 1 and full size even for strided layers
    (the circular preconditioning needs every output of the full convolution), plus an
    rfft2/irfft2 of the full output; see ``benchmarks/convnorm.py``.
    """

    #: Numeric options a schedule may change between steps.
    schedulable: ClassVar[tuple[str, ...]] = ("eps", "momentum")
    #: Why ``lightning_whiten.export`` cannot fold this layer into a plain ``nn.Conv2d``.
    export_refusal: ClassVar[str] = (
        "ConvNorm2d cannot be exported as a plain nn.Conv2d: its preconditioning V is a "
        "circular convolution over the whole (H + k - 1) x (W + k - 1) output of the full "
        "convolution, so the layer equals a convolution whose kernel is as large as the "
        "feature map, wrapping around its borders, and that kernel changes with the input "
        "resolution; no k x k convolution computes it. Keep the ConvNorm2d layers in the "
        "exported model (their eval output is a fixed function of the weights), or train "
        "with plain convolutions."
    )

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        affine: bool = True,
        affine_init: AffineInit = "identity",
        batchnorm: bool = False,
        eps: float = 1e-5,
        running_v: RunningV = "none",
        momentum: float = 0.1,
        ramp_steps: int = 40_000,
        ramp_end: float = 0.01,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        #: Where model surgery put this layer (see :class:`~lightning_whiten.surgery.Origin`).
        self.origin: Any = None
        name = type(self).__name__
        kernel, stride_, padding_, dilation_ = _conv_geometry(
            name, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            padding_mode,
        )  # fmt: skip
        _check_options(name, running_v, affine_init, ramp_steps, ramp_end, dtype)

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel
        self.stride = stride_
        self.padding = padding_
        self.dilation = dilation_
        self.groups = 1
        self.padding_mode = "zeros"
        self.affine = bool(affine)
        self.affine_init = affine_init
        self.eps = eps
        self.running_v = running_v
        self.momentum = momentum
        self.ramp_steps = ramp_steps
        self.ramp_end = float(ramp_end)

        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *kernel, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        if self.affine:
            self.affine_weight = nn.Parameter(torch.empty(out_channels, 1, *kernel, **factory))
            self.affine_bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("affine_weight", None)
            self.register_parameter("affine_bias", None)
        self.bn = nn.BatchNorm2d(out_channels, affine=self.affine, **factory) if batchnorm else None
        if running_v != "none":
            buffer_dtype = dtype if dtype in _FLOAT_BUFFER_DTYPES else torch.float32
            lags = (2 * kernel[0] - 1, 2 * kernel[1] - 1)
            self.register_buffer(
                "running_autocorr",
                torch.zeros(out_channels, *lags, device=device, dtype=buffer_dtype),
            )
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_autocorr", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------
    # Initialization
    # ----------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """``weight``/``bias`` as ``nn.Conv2d``; the affine part per ``affine_init``; the BN and
        the running estimate reset."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        if self.affine:
            with torch.no_grad():
                if self.affine_init == "identity":
                    self.affine_weight.zero_()
                    ch, cw = (self.kernel_size[0] - 1) // 2, (self.kernel_size[1] - 1) // 2
                    self.affine_weight[:, :, ch, cw] = 1.0
                    self.affine_bias.zero_()
                else:  # nn.Conv2d's default for the depthwise conv (fan_in = k_h k_w)
                    nn.init.kaiming_uniform_(self.affine_weight, a=math.sqrt(5))
                    bound = 1 / math.sqrt(self.kernel_size[0] * self.kernel_size[1])
                    nn.init.uniform_(self.affine_bias, -bound, bound)
        if self.bn is not None:
            self.bn.reset_parameters()
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        """Set the running estimate to the current weight's autocorrelation (step count 0)."""
        if self.running_autocorr is None:
            return
        with torch.no_grad():
            r = CF.kernel_autocorrelation(self.weight.detach())
            self.running_autocorr.copy_(r.to(self.running_autocorr.dtype))
            self.num_batches_tracked.zero_()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options: Any) -> ConvNorm2d:
        """A ``ConvNorm2d`` with ``conv``'s structure and parameters.

        ``weight`` and ``bias`` are copies of the conv's (``requires_grad``, device, dtype and
        train/eval mode too); ``options`` set the ConvNorm options (``affine``,
        ``affine_init``, ``batchnorm``, ``eps``, ``running_v``, ``momentum``, ``ramp_steps``,
        ``ramp_end``). The output is *not* the conv's: the preconditioner changes the operator
        (each output channel becomes a tight frame, so its scale and frequency response
        change). With the default ``affine_init="identity"`` the affine convolution starts as
        the identity, so the converted layer starts as exactly the preconditioned version of
        this conv: ``P_V(conv_without_bias(x)) + bias``; a
        ``batchnorm=True`` BN starts fresh (identity statistics). The running estimate starts
        at the conv's weight.

        Raises ``ValueError`` for ``groups != 1`` and padding modes other than zeros, and
        ``TypeError`` for a Conv2d subclass with its own forward (e.g. timm's ``Conv2dSame``,
        whose padding depends on the input), whose behaviour this layer would not keep.
        """
        name = cls.__name__
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{name}.from_conv: expected an nn.Conv2d, got {type(conv).__name__}")
        kind = type(conv)
        if (
            kind.forward is not nn.Conv2d.forward
            or kind._conv_forward is not nn.Conv2d._conv_forward
        ):
            raise TypeError(
                f"{name}.from_conv: {kind.__module__}.{kind.__qualname__} overrides the "
                "convolution's forward (e.g. input-dependent padding); converting it would not "
                "keep its behaviour"
            )
        structural = {
            "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
            "groups", "bias", "padding_mode", "device", "dtype",
        }  # fmt: skip
        clash = sorted(structural & set(options))
        if clash:
            raise ValueError(
                f"{name}.from_conv: {', '.join(clash)} come from the convolution; options may "
                "only set the ConvNorm options"
            )
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **options,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            layer.weight.requires_grad_(conv.weight.requires_grad)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
                layer.bias.requires_grad_(conv.bias.requires_grad)
        layer.reset_running_stats()
        layer.train(conv.training)
        return layer

    # ----------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------
    def fft_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """The ``N_h x N_w`` grid of the preconditioner for an ``H x W`` input (``(1, 1)`` for
        1x1 kernels, whose ``V`` is a scalar)."""
        if self.kernel_size == (1, 1):
            return (1, 1)
        return CF.full_conv_size(input_size, self.kernel_size, self.dilation)

    def preconditioner(self, input_size: tuple[int, int]) -> Tensor:
        """``V`` (``(C_out, N_h, N_w // 2 + 1)``, float64) that eval uses for an ``H x W`` input:
        from the running estimate if there is one, else from the current weight."""
        r = self.running_autocorr
        if r is None:
            r = CF.kernel_autocorrelation(self.weight.detach())
        return self._v(r, input_size)

    def _v(self, autocorr: Tensor, input_size: tuple[int, int]) -> Tensor:
        spectrum = CF.power_spectrum(autocorr, self.fft_size(input_size), self.dilation)
        return (spectrum + self.eps).rsqrt()  # float64; cast to the FFTs' dtype where used

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        self._check_input(x)
        size = (x.shape[-2], x.shape[-1])
        if self.training or self.running_autocorr is None:
            r = CF.kernel_autocorrelation(self.weight.detach())
            if self.training and self.running_autocorr is not None:
                self._update_running(r)
        else:
            r = self.running_autocorr
        v = self._v(r, size)
        z = CF.convnorm_conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, preconditioner=v
        )
        if self.affine:
            with full_precision(z):
                weight = self.affine_weight.to(z.dtype)
                bias = self.affine_bias.to(z.dtype)
                if self.kernel_size == (1, 1):
                    z = z * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
                else:  # "same" padding, the extra row/column of an even kernel at the end
                    kh, kw = self.kernel_size
                    if kh % 2 and kw % 2:
                        padding: Any = (kh // 2, kw // 2)
                    else:
                        z, padding = F.pad(z, [(kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2]), 0
                    z = F.conv2d(z, weight, bias, padding=padding, groups=self.out_channels)
        z = z.to(x.dtype)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            z = z.contiguous(memory_format=torch.channels_last)
        if self.bn is not None:
            z = self.bn(z)
        return z.squeeze(0) if unbatched else z

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        if x.dim() != 4:
            raise ValueError(f"{name}: expected a 3D or 4D input (N, C, H, W), got {x.dim()}D")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{name}: expected {self.in_channels} input channels, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point input, got {x.dtype}")

    def _update_running(self, r: Tensor) -> None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            buffer = self.running_autocorr
            if self.running_v == "momentum":
                factor = torch.full(
                    (), float(self.momentum), device=buffer.device, dtype=buffer.dtype
                )
            else:  # the authors' cosine ramp over training forwards, floored at ramp_end
                t = self.num_batches_tracked.to(buffer.dtype).clamp(max=self.ramp_steps)
                factor = (0.5 * (torch.cos(t * (math.pi / self.ramp_steps)) + 1)).clamp(
                    min=self.ramp_end
                )
            new = r.to(buffer.dtype)
            updated = torch.lerp(buffer, new, factor)
            buffer.copy_(torch.where(torch.isfinite(new).all(), updated, buffer))

    # ----------------------------------------------------------------------------------------
    # Module plumbing
    # ----------------------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        # Schedules change options between steps: validate every assignment, not just __init__.
        if name == "eps":
            check_eps(type(self).__name__, value)
        elif name == "momentum":
            check_momentum(type(self).__name__, value, allow_none=False)
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        parts = [
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}",
            f"stride={self.stride}",
        ]
        if self.padding not in ((0, 0), "valid"):
            parts.append(
                f"padding={self.padding!r}"
                if isinstance(self.padding, str)
                else f"padding={self.padding}"
            )
        if self.dilation != (1, 1):
            parts.append(f"dilation={self.dilation}")
        if self.bias is None:
            parts.append("bias=False")
        parts.append(f"affine={self.affine}")
        if self.affine and self.affine_init != "identity":
            parts.append(f"affine_init={self.affine_init!r}")
        parts.append(f"eps={self.eps}")
        parts.append(f"running_v={self.running_v!r}")
        if self.running_v == "momentum":
            parts.append(f"momentum={self.momentum}")
        elif self.running_v == "cosine":
            parts.append(f"ramp_steps={self.ramp_steps}, ramp_end={self.ramp_end}")
        return ", ".join(parts)


def _positive_pair(layer: str, option: str, value: Any) -> tuple[int, int]:
    return _pair_of(layer, option, value, minimum=1)


def _pair_of(layer: str, option: str, value: Any, minimum: int) -> tuple[int, int]:
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2 or any(
        isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair
    ):
        raise ValueError(
            f"{layer}: {option} must be an int >= {minimum} or a pair of them, got {value!r}"
        )
    return (int(pair[0]), int(pair[1]))


# Replaces convolutions; export refuses with the reason above.
register_family(
    NormFamily(
        "convnorm",
        ConvNorm2d,
        targets="conv2d",
        group_option=None,
        export=ConvNorm2d.export_refusal,
        description=__doc__,
    )
)
