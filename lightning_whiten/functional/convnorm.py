"""Convolutional normalization (ConvNorm; Liu et al., NeurIPS 2021): the tensor math.

A convolution with weight ``a`` of shape ``(C_out, C_in, k_h, k_w)`` maps input channels ``x_j``
to ``y_i = sum_j a_ij * x_j``. ConvNorm preconditions each output channel in the Fourier domain
so that its operator ``x -> y_i`` becomes a tight frame::

    S_i(w) = sum_j |FFT2(a_ij)(w)|^2            (power spectrum, summed over input channels)
    V_i(w) = (S_i(w) + eps)^(-1/2)
    z_i    = IFFT2(V_i * FFT2(y_i))             (a circular convolution with v_i = IFFT2(V_i))

so that ``sum_j |V_i FFT2(a_ij)|^2 = S_i / (S_i + eps)``, i.e. 1 at every frequency up to ``eps``.
``V`` is computed from the *detached* weight: no gradient flows through it.

What the authors' code (``shengliu66/ConvNorm``, ``models/prec_conv.py``) computes, and this
module reproduces exactly (tested against a direct reference):

1. the *full* convolution: stride 1, padding ``k - 1`` on every side, so ``y`` has the size
   ``N = H + k - 1`` (per spatial dimension). The FFT size is that output size ``N``; the
   kernel is zero-padded to ``N x N`` for ``S``.
2. ``z = irfft2(rfft2(y) * V)`` on that ``N x N`` grid (``V`` in the rfft2 layout
   ``(C_out, N_h, N_w // 2 + 1)``).
3. crop ``k - 1 - padding`` from each side (the rows/columns a plain convolution with
   ``padding`` would not produce) and subsample by the stride.

Where this differs from the authors' code, deliberately:

* ``eps`` (theirs has none: a kernel with a zero of ``S`` gives inf/NaN);
* a conv bias (``bias=True``) is added *after* the preconditioning. Their code adds it to
  ``y`` before, which (a constant has only a DC component) scales it by ``V_i(0, 0)``: the bias
  would then change with the kernel's norm, and a kernel whose spectrum vanishes at 0 (any
  kernel summing to zero) would amplify it up to ``eps^(-1/2)``. None of their experiments
  uses a conv bias (their ResNets pass ``bias=False``), so every published setting is
  unaffected;
* dilation: their full convolution pads ``k - 1`` and their ``S`` uses the undilated kernel,
  which is only right for ``dilation = 1``. Here the dilated kernel (size
  ``K = d (k - 1) + 1``) is used throughout: full padding ``K - 1``, FFT size ``H + K - 1``,
  ``S`` of the dilated kernel (whose power spectrum is ``S`` of the undilated kernel at ``d w``);
* ``1 x k`` kernels: their code takes the scalar 1x1 branch whenever *either* side is 1, which
  is wrong for ``1 x 3``; here only ``1 x 1`` kernels are scalar (``V_i = (sum_j a_ij^2 + eps)^(-1/2)``,
  the same formula, since a 1x1 kernel's spectrum is flat);
* stride ``(1, s)``: their code subsamples only when ``stride[0] > 1``.

``S`` is computed without any FFT of a padded kernel: it is the discrete-time Fourier
transform of the kernel's autocorrelation summed over input channels,
``r_i(t) = sum_j sum_m a_ij(m) a_ij(m + t)`` (Wiener-Khinchin), a ``(2k_h - 1) x (2k_w - 1)``
array per output channel, evaluated on the ``N_h x N_w`` grid by two small matrix products.
That is exact (no truncation: ``r`` has compact support), far cheaper than
``C_out * C_in`` FFTs of size ``N x N``, and independent of the resolution, which is why the
layer keeps its running estimate as ``r`` (see :class:`lightning_whiten.ConvNorm2d`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import full_precision

__all__ = [
    "convnorm_conv2d",
    "convnorm_preconditioner",
    "full_conv_size",
    "kernel_autocorrelation",
    "power_spectrum",
    "precondition",
    "resolve_padding",
]

IntPair = int | tuple[int, int]


def _pair(value: IntPair) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def _compute_dtype(t: Tensor) -> torch.dtype:
    # FFTs and spectra run in float32 (float64 for float64 inputs), never in fp16/bf16.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _spectrum_dtype(t: Tensor) -> torch.dtype:
    # The autocorrelation and the spectrum are tiny ((C_out, 2k - 1, 2k - 1) and (C_out, N, N)):
    # float64 costs nothing and keeps V exact to float32 whatever the matmul precision (TF32).
    return torch.float32 if t.device.type == "mps" else torch.float64


def full_conv_size(
    input_size: tuple[int, int], kernel_size: IntPair, dilation: IntPair = 1
) -> tuple[int, int]:
    """The FFT size of ConvNorm: the output size of the full convolution,
    ``N = H + d (k - 1)`` per spatial dimension (``H + k - 1`` without dilation)."""
    (kh, kw), (dh, dw) = _pair(kernel_size), _pair(dilation)
    return (int(input_size[0]) + dh * (kh - 1), int(input_size[1]) + dw * (kw - 1))


def resolve_padding(
    padding: IntPair | str, kernel_size: IntPair, dilation: IntPair = 1
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((top, bottom), (left, right))`` zero padding of a convolution.

    ``padding`` is an int, a pair, ``"valid"`` (none) or ``"same"`` (total ``d (k - 1)``, the
    extra pixel of an even kernel at the bottom/right, as ``torch.nn.Conv2d`` does).
    """
    (kh, kw), (dh, dw) = _pair(kernel_size), _pair(dilation)
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return ((th // 2, th - th // 2), (tw // 2, tw - tw // 2))
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    ph, pw = _pair(padding)
    return ((ph, ph), (pw, pw))


def kernel_autocorrelation(weight: Tensor) -> Tensor:
    """Autocorrelation of each output channel's kernel, summed over input channels.

    ``r_i(t) = sum_j sum_m a_ij(m) a_ij(m + t)`` for lags ``t`` in ``[-(k - 1), k - 1]``,
    returned with lag ``t`` at index ``t + k - 1``: shape ``(C_out, 2 k_h - 1, 2 k_w - 1)``. It is
    symmetric (``r_i(-t) = r_i(t)``) and ``r_i(0) = sum_j ||a_ij||^2``. Computed and returned in
    float64 (float32 on MPS) whatever the weight's dtype, autocast or matmul precision;
    differentiable.
    """
    if weight.dim() != 4:
        raise ValueError(f"weight must be (C_out, C_in, k_h, k_w), got shape {tuple(weight.shape)}")
    c_out, c_in, kh, kw = weight.shape
    with full_precision(weight):
        flat = weight.to(_spectrum_dtype(weight)).reshape(c_out, c_in, kh * kw)
        # Per output channel the Gram matrix of kernel positions over input channels,
        # G_i(m, m') = sum_j a_ij(m) a_ij(m'), then r_i(t) = sum_{m' - m = t} G_i(m, m'): one
        # batched matmul (a grouped convolution computing the same is several times slower).
        gram = flat.transpose(1, 2) @ flat
        r = gram.reshape(c_out, -1) @ _lag_matrix(kh, kw, gram)
    return r.reshape(c_out, 2 * kh - 1, 2 * kw - 1)


def _lag_matrix(kh: int, kw: int, like: Tensor) -> Tensor:
    """``(k_h k_w * k_h k_w, (2 k_h - 1)(2 k_w - 1))`` 0/1 matrix sending the position pair
    ``(m, m')`` to the lag ``m' - m`` (offset by ``k - 1``)."""
    rows = torch.arange(kh, device=like.device).repeat_interleave(kw)
    cols = torch.arange(kw, device=like.device).repeat(kh)
    lag_h = rows[None, :] - rows[:, None] + kh - 1
    lag_w = cols[None, :] - cols[:, None] + kw - 1
    index = (lag_h * (2 * kw - 1) + lag_w).reshape(-1)
    return F.one_hot(index, (2 * kh - 1) * (2 * kw - 1)).to(like.dtype)


def _dft_matrices(
    n: int, lags: int, dilation: int, rows: int, like: Tensor
) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of ``2 pi f (d t) / n`` for ``f < rows`` and ``t`` in
    ``[-(lags - 1) / 2, (lags - 1) / 2]``: ``(rows, lags)`` each."""
    half = (lags - 1) // 2
    f = torch.arange(rows, device=like.device)
    t = torch.arange(-half, half + 1, device=like.device) * dilation
    # Reduce the phase f * t modulo n in integers so the angle is exact before the cosine.
    phase = torch.remainder(f[:, None] * t[None, :], n).to(like.dtype) * (2 * torch.pi / n)
    return torch.cos(phase), torch.sin(phase)


def power_spectrum(
    autocorrelation: Tensor, fft_size: tuple[int, int], dilation: IntPair = 1
) -> Tensor:
    """``S_i(w) = sum_j |FFT2(a_ij zero-padded to fft_size)|^2`` from the autocorrelation.

    Args:
        autocorrelation: ``(C_out, 2 k_h - 1, 2 k_w - 1)`` from :func:`kernel_autocorrelation`
            (of the undilated kernel).
        fft_size: ``(N_h, N_w)``, at least the dilated kernel size.
        dilation: the convolution's dilation ``d``; the dilated kernel's spectrum is used.

    Returns:
        ``(C_out, N_h, N_w // 2 + 1)`` (the rfft2 layout), real and >= 0 (rounding clamped), in
        float64 (float32 on MPS).

    ``S(f_h, f_w) = sum_t r(t) exp(-2 pi i (f_h d_h t_h / N_h + f_w d_w t_w / N_w))``; since ``r`` is
    symmetric this is real: ``C_h r C_w^T - S_h r S_w^T`` with cosine/sine DFT matrices.
    """
    nh, nw = int(fft_size[0]), int(fft_size[1])
    dh, dw = _pair(dilation)
    lh, lw = autocorrelation.shape[-2:]
    if nh < dh * (lh - 1) // 2 + 1 or nw < dw * (lw - 1) // 2 + 1:
        raise ValueError(
            f"fft_size {fft_size} is smaller than the dilated kernel "
            f"({dh * (lh - 1) // 2 + 1}, {dw * (lw - 1) // 2 + 1})"
        )
    with full_precision(autocorrelation):
        r = autocorrelation.to(_spectrum_dtype(autocorrelation))
        cos_h, sin_h = _dft_matrices(nh, lh, dh, nh, r)
        cos_w, sin_w = _dft_matrices(nw, lw, dw, nw // 2 + 1, r)
        spectrum = cos_h @ r @ cos_w.T - sin_h @ r @ sin_w.T
    return spectrum.clamp_min(0)


def convnorm_preconditioner(
    weight: Tensor, output_size: tuple[int, int], dilation: IntPair = 1, eps: float = 1e-5
) -> Tensor:
    """ConvNorm's Fourier-domain preconditioner ``V``.

    ``V_i(w) = (sum_j |FFT2(a_ij zero-padded to output_size)|^2 + eps)^(-1/2)``, computed from
    ``weight.detach()`` (the paper's V carries no gradient).

    Args:
        weight: ``(C_out, C_in, k_h, k_w)``.
        output_size: the FFT size ``(N_h, N_w)``: the full convolution's output size,
            ``H + d (k - 1)`` for an ``H x W`` input (:func:`full_conv_size`).
        dilation: the convolution's dilation.
        eps: added to the power spectrum (a zero kernel gives ``eps^(-1/2)``, not inf).

    Returns:
        ``(C_out, N_h, N_w // 2 + 1)`` in float32 (float64 for a float64 weight): the rfft2
        layout, to multiply ``torch.fft.rfft2(y)`` with. For a 1x1 kernel every frequency
        holds the same value ``(sum_j a_ij^2 + eps)^(-1/2)``.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    r = kernel_autocorrelation(weight.detach())
    v = (power_spectrum(r, output_size, dilation) + eps).rsqrt()
    return v.to(_compute_dtype(weight))


def precondition(y: Tensor, preconditioner: Tensor) -> Tensor:
    """``irfft2(rfft2(y) * V)`` over the last two dimensions of ``y`` (``(N, C_out, N_h, N_w)``),
    in float32 (float64 for float64 ``y``); ``V`` is ``(C_out, N_h, N_w // 2 + 1)``."""
    with full_precision(y):
        dtype = _compute_dtype(y)
        size = y.shape[-2:]
        spectrum = torch.fft.rfft2(y.to(dtype)) * preconditioner.to(dtype)
        return torch.fft.irfft2(spectrum, s=size)


def convnorm_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    preconditioner: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """The preconditioned convolution of ConvNorm (without its affine part or BatchNorm).

    Args:
        x: ``(N, C_in, H, W)``.
        weight: ``(C_out, C_in, k_h, k_w)``.
        bias: ``(C_out,)`` or ``None``: added to the preconditioned output (see the module
            docstring for why not before, as the authors' code does).
        stride, padding, dilation: as ``torch.nn.functional.conv2d``; ``padding`` may not
            exceed ``d (k - 1)`` per side (the full convolution), except for 1x1 kernels.
        preconditioner: ``V`` to use (e.g. from a running estimate) at the FFT size
            ``full_conv_size((H, W), k, d)``; ``None``: computed from ``weight.detach()``.
        eps: for a computed ``V``.

    Returns:
        ``(N, C_out, H_out, W_out)`` with ``H_out`` as for ``conv2d``, in float32 (float64 for
        float64 inputs).

    Computation (the authors' order): full convolution (stride 1, padding ``K - 1`` with
    ``K = d (k - 1) + 1``), ``irfft2(rfft2(.) * V)``, crop ``K - 1 - padding`` per side,
    subsample by the stride. For a 1x1 kernel ``V`` is a scalar per channel, which commutes
    with cropping and subsampling: the convolution is then computed directly at its stride
    (exactly equal, and no FFT).
    """
    kh, kw = weight.shape[-2:]
    dh, dw = _pair(dilation)
    sh, sw = _pair(stride)
    (pt, pb), (pl, pr) = resolve_padding(padding, (kh, kw), (dh, dw))
    dtype = _compute_dtype(x)
    if kh == 1 and kw == 1:
        if preconditioner is None:
            preconditioner = convnorm_preconditioner(weight, (1, 1), eps=eps)
        scale = preconditioner.reshape(preconditioner.shape[0], -1)[:, 0]
        y = F.conv2d(F.pad(x, (pl, pr, pt, pb)), weight, None, (sh, sw))
        with full_precision(y):
            z = y.to(dtype) * scale.to(dtype)[:, None, None]
            return z if bias is None else z + bias.to(dtype)[:, None, None]
    full_h, full_w = dh * (kh - 1), dw * (kw - 1)
    if max(pt, pb) > full_h or max(pl, pr) > full_w:
        raise ValueError(
            f"padding ({pt}, {pb}, {pl}, {pr}) exceeds the full convolution's "
            f"({full_h}, {full_w}) for kernel {(kh, kw)} and dilation {(dh, dw)}"
        )
    size = full_conv_size(x.shape[-2:], (kh, kw), (dh, dw))
    if preconditioner is None:
        preconditioner = convnorm_preconditioner(weight, size, (dh, dw), eps)
    y = F.conv2d(x, weight, None, 1, (full_h, full_w), (dh, dw))
    z = precondition(y, preconditioner)
    z = z[
        ..., full_h - pt : size[0] - (full_h - pb) : sh, full_w - pl : size[1] - (full_w - pr) : sw
    ]
    if bias is not None:
        with full_precision(z):
            z = z + bias.to(dtype)[:, None, None]
    return z
