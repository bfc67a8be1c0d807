"""Group-wise batch whitening: the fused training op and its building blocks.

Notation: an input of shape ``(N, C, *spatial)`` is split into ``G = ceil(C / d)`` contiguous
channel groups of ``d = group_size`` channels (the last group may be smaller,
``r = C - (G - 1) d``). Each group is a matrix ``X_g`` of shape ``(d, m)`` with
``m = N * prod(spatial)`` samples. Per-group matrices (covariances, whitening matrices) are one
tensor of shape ``(G, d, d)``; the padding of a smaller last group is the identity ("canonical
padding") and ``valid`` (:func:`valid_mask`) marks the real channels.

Everything here runs in the dtype of its inputs: callers (the layers) upcast half-precision
activations to float32 first, so covariances and iterations never run in fp16/bf16.

Training-mode whitening is one fused autograd node, :func:`whiten`:
``y = weight * (W (x - mean)) + bias`` with ``W = fn(cov)`` for a
:class:`~lightning_whiten.functional.MatrixMap` ``fn``. Its backward saves only ``x`` and small
``(G, d, d)`` matrices (the same activation memory as BatchNorm, whatever the number of
iterations) and reads ``x`` and ``dy`` twice. The activation-sized passes are shared with
:func:`batch_covariance` and :func:`grouped_affine` (composable building blocks for custom
layers) and live in the backend, which runs them chunk by chunk in eager mode and out of place
under ``torch.compile``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ._backend import (
    GroupLayout,
    InputGrad,
    _as_view,
    batch_statistics,
    canonicalize,
    fold_affine,
    full_precision,
    group_layout,
    matvec,
    ops,
    pad_vector,
    sum_statistics_grads,
    unpad_vector,
    view_kind,
)
from .maps import MatrixMap, SWBNCriterion

__all__ = [
    "BatchMoments",
    "WhitenResult",
    "batch_covariance",
    "grouped_affine",
    "newton_residual",
    "swbn_update",
    "whiten",
    "whitening_error",
]


def _statistics_input_grad(
    mean: Tensor,
    n: Tensor,
    d_mean: Tensor | None,
    d_cov: Tensor | None,
    layout: GroupLayout,
    diagonal: bool = False,
) -> InputGrad:
    """What the gradients of ``mean`` and ``cov`` add to ``dx``: ``d_mean / n + S (x - mean)``
    with ``S = (dC + dC^T) / n`` (as a per-channel ``scale`` when ``dC`` is diagonal)."""
    c = d_mean / n if d_mean is not None else torch.zeros_like(mean)
    if d_cov is None:
        return InputGrad(c)
    s = (d_cov + d_cov.transpose(-1, -2)) / n
    c = c - matvec(s, mean, layout)
    if diagonal:
        return InputGrad(c, scale=unpad_vector(s.diagonal(dim1=-2, dim2=-1), layout))
    return InputGrad(c, s=s)


# --------------------------------------------------------------------------------------------
# Batch covariance (autograd Function)
# --------------------------------------------------------------------------------------------
class BatchMoments(NamedTuple):
    """Result of :func:`batch_covariance`.

    Attributes:
        input: the input itself (an alias), to be passed on to :func:`grouped_affine`: the
            gradient flowing back through it gets the covariance's contribution added in
            place, so the backward never allocates a second activation-sized gradient.
        mean: batch mean ``(C,)`` (over every process of ``process_group`` when synced).
        cov: biased batch covariance per group ``(G, d, d)``, canonical padding.
        count: number of samples per channel as a 0-dim tensor (global when synced).
    """

    input: Tensor
    mean: Tensor
    cov: Tensor
    count: Tensor


class _BatchCovariance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout, process_group):  # type: ignore[override]
        n, mean, cov = batch_statistics(x, layout, process_group)
        ctx.save_for_backward(x, mean, n)
        ctx.layout = layout
        ctx.process_group = process_group
        ctx.mark_non_differentiable(n)
        return x.view_as(x), mean, cov, n

    @staticmethod
    def backward(ctx, d_input, d_mean, d_cov, _d_count):  # type: ignore[override]
        x, mean, n = ctx.saved_tensors
        layout = ctx.layout
        with full_precision(x):
            if ctx.process_group is not None:
                dm = d_mean if d_mean is not None else torch.zeros_like(mean)
                dc = d_cov if d_cov is not None else x.new_zeros(layout.num_groups, layout.group_size, layout.group_size)  # fmt: skip
                d_mean, d_cov = sum_statistics_grads(dm, dc, layout, ctx.process_group)
            terms = _statistics_input_grad(mean, n, d_mean, d_cov, layout)
            # The incoming gradient is ours to add into when it is an internal alias of the
            # right layout (grouped_affine's dx): no second activation-sized gradient.
            into = None
            if d_input is not None and d_input.dtype == x.dtype:
                view, kind = _as_view(d_input)
                if kind == view_kind(x) and view.data_ptr() == d_input.data_ptr():
                    into = d_input
            dx = ops().input_grad(x, layout, terms, accumulate=into)
            if d_input is not None and into is None:
                dx = dx + d_input
        return dx, None, None


def batch_covariance(
    x: Tensor,
    group_size: int,
    process_group: dist.ProcessGroup | None = None,
) -> BatchMoments:
    """Batch mean and per-group covariance of ``x`` (differentiable w.r.t. ``x``).

    Exact (two-pass within cache-sized chunks, combined in float64) and one pass over ``x``.

    Args:
        x: ``(N, C, *spatial)`` activations (float32 or float64).
        group_size: channels per group ``d``.
        process_group: when given, ``(sum x, sum x x^T, count)`` are all-reduced over that group
            in one float64 collective, so every rank gets the statistics of the concatenated
            batch, and the backward pass all-reduces the gradients of ``mean`` and ``cov``.

    Returns:
        :class:`BatchMoments` with ``mean = E[x]`` of shape ``(C,)`` and
        ``cov_g = E[(x_g - mu_g)(x_g - mu_g)^T]`` of shape ``(G, d, d)`` (biased, no ``eps``).
    """
    layout = group_layout(x.shape[1], group_size)
    with full_precision(x):
        return BatchMoments(*_BatchCovariance.apply(x, layout, process_group))


# --------------------------------------------------------------------------------------------
# Grouped affine map (autograd Function)
# --------------------------------------------------------------------------------------------
class _GroupedAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, matrices, offset, weight, bias, layout):  # type: ignore[override]
        a, b = fold_affine(matrices, offset, weight, bias, layout)
        y = ops().affine(a, x, b, layout)
        ctx.save_for_backward(x, matrices, offset, weight, a)
        ctx.layout = layout
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, matrices, offset, weight, a = ctx.saved_tensors
        layout = ctx.layout
        need_x, need_a, need_off, need_w, need_b = ctx.needs_input_grad[:5]
        dmat = doff = dw = db = None
        with full_precision(x):
            at = a.transpose(-1, -2)
            # One pass over dy and x: sum dy, sum dy (x - offset)^T, and dx = A^T dy.
            sums = ops().gradient_sums(
                dy, x, offset, layout, cross=need_a or need_w, transpose=at if need_x else None
            )
            if need_w:
                dw = unpad_vector((matrices * sums.cross).sum(-1), layout)
            if need_a:
                dmat = sums.cross
                if weight is not None:
                    dmat = dmat * pad_vector(weight, layout).unsqueeze(-1)
            if need_off:
                doff = -matvec(at, sums.dy_sum, layout)
            if need_b and ctx.has_bias:
                db = sums.dy_sum
        return sums.transposed, dmat, doff, dw, db, None


def grouped_affine(
    x: Tensor,
    matrices: Tensor,
    offset: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Block-diagonal affine map ``y = weight * (A (x - offset)) + bias``, per channel group.

    Args:
        x: ``(N, C, *spatial)``; the output keeps its memory format (channels_last in, out).
        matrices: ``A`` as ``(G, d, d)`` per-group matrices (canonical padding).
        offset: ``(C,)`` subtracted before the map (a mean).
        weight, bias: optional per-channel affine ``(C,)`` applied after the map.

    Returns:
        ``(N, C, *spatial)``. Differentiable w.r.t. every tensor argument; the backward pass
        saves only ``x`` and the small matrices and makes one pass over ``dy`` and ``x``.
    """
    layout = group_layout(x.shape[1], matrices.shape[-1])
    if layout.group_size != matrices.shape[-1] or layout.num_groups != matrices.shape[0]:
        raise ValueError(
            f"grouped_affine: matrices of shape {tuple(matrices.shape)} do not fit "
            f"{x.shape[1]} channels"
        )
    with full_precision(x):
        return _GroupedAffine.apply(x, matrices, offset, weight, bias, layout)


# --------------------------------------------------------------------------------------------
# The fused whitening layer (one autograd node)
# --------------------------------------------------------------------------------------------
class WhitenResult(NamedTuple):
    """Output of :func:`whiten`: the output and the batch statistics it used (no gradient)."""

    output: Tensor
    mean: Tensor
    cov: Tensor
    matrix: Tensor
    count: Tensor


class _Whiten(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, fn, layout, process_group, *tensors):  # type: ignore[override]
        n, mean, cov = batch_statistics(x, layout, process_group)
        w, saved = fn.forward(cov, *tensors)
        a, b = fold_affine(w, mean, weight, bias, layout)
        y = ops().affine(a, x, b, layout)
        ctx.save_for_backward(x, mean, n, w, a, weight, *saved, *tensors)
        ctx.fn, ctx.layout, ctx.process_group = fn, layout, process_group
        ctx.num_tensors = len(tensors)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, cov, w, n)
        return y, mean, cov, w, n

    @staticmethod
    def backward(ctx, dy, *_):  # type: ignore[override]
        x, mean, n, w, a, weight, *saved = ctx.saved_tensors
        k = ctx.num_tensors
        saved, tensors = saved[: len(saved) - k], saved[len(saved) - k :]
        layout, fn = ctx.layout, ctx.fn
        dx = dweight = dbias = None
        with full_precision(x):
            # Phase 1 (one pass over dy and x): sum dy and sum dy (x - mean)^T.
            sums = ops().gradient_sums(dy, x, mean, layout, cross=True, transpose=None)
            cross = sums.cross
            assert cross is not None
            if weight is not None:
                dweight = unpad_vector((w * cross).sum(-1), layout)
                d_w = cross * pad_vector(weight, layout).unsqueeze(-1)
            else:
                d_w = cross
            if ctx.has_bias:
                dbias = sums.dy_sum
            if ctx.needs_input_grad[0]:
                d_cov = fn.backward(tuple(saved), d_w, *tensors)
                at = a.transpose(-1, -2)
                d_mean = -matvec(at, sums.dy_sum, layout)
                if ctx.process_group is not None:
                    d_mean, d_cov = sum_statistics_grads(d_mean, d_cov, layout, ctx.process_group)
                # Phase 2: dx = A^T dy + S (x - mean) + d_mean / n, S = (dC + dC^T) / n, both
                # GEMMs into the same cache-resident chunk of dx. A map whose covariance
                # gradient is diagonal (SWBN) needs a per-channel scale there, not a GEMM.
                terms = _statistics_input_grad(
                    mean, n, d_mean, d_cov, layout, diagonal=fn.diagonal_grad
                )
                dx = ops().input_grad(x, layout, terms._replace(transpose=at, dy=dy))
        return dx, dweight, dbias, None, None, None, *([None] * ctx.num_tensors)


def whiten(
    x: Tensor,
    fn: MatrixMap,
    group_size: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> WhitenResult:
    """Training-mode whitening of ``x`` with batch statistics, in one autograd node.

    ``y = weight * (W (x - mean)) + bias`` with ``W = fn(cov)`` per group of ``group_size``
    channels, ``mean`` and ``cov`` the batch statistics of ``x`` (over every rank of
    ``process_group`` when given). The backward pass is exact (including the dependence of
    ``mean`` and ``cov`` on ``x``), saves only ``x`` and small matrices, and reads ``dy`` and
    ``x`` twice, like BatchNorm's.

    Args:
        x: ``(N, C, *spatial)``, float32 or float64; the output keeps its memory format.
        fn: the covariance-to-whitening-matrix map (:class:`IterNormMap`, :class:`ZCAMap`,
            :class:`StandardizeMap` or your own :class:`MatrixMap`).

    Returns:
        :class:`WhitenResult` ``(output, mean, cov, matrix, count)``; only ``output`` carries a
        gradient, the rest is for running statistics.
    """
    layout = group_layout(x.shape[1], group_size)
    with full_precision(x):
        return WhitenResult(
            *_Whiten.apply(x, weight, bias, fn, layout, process_group, *fn.tensors())
        )


@torch.no_grad()
def swbn_update(
    whitening: Tensor,
    cov_standardized: Tensor,
    whitening_rate: float,
    criterion: SWBNCriterion = "kl",
    valid: Tensor | None = None,
) -> Tensor:
    """One stochastic update of SWBN's whitening matrix (Zhang et al., CVPR 2021).

    Per group, with ``S`` the covariance of the standardized batch::

        M = W S W^T - I
        Delta = M W                       (criterion="kl", relative gradient)
        Delta = M W S / ||M||_F           (criterion="fro")
        W <- W - alpha Delta;   W <- (W + W^T) / 2

    Returns the new ``(G, d, d)`` matrix (canonical padding); no gradient.
    """
    eye = torch.eye(whitening.shape[-1], dtype=whitening.dtype, device=whitening.device)
    m = whitening @ cov_standardized @ whitening.transpose(-1, -2) - eye
    if criterion == "kl":
        delta = m @ whitening
    elif criterion == "fro":
        norm = torch.linalg.matrix_norm(m).clamp_min(torch.finfo(m.dtype).tiny)
        delta = m @ whitening @ cov_standardized / norm.view(-1, 1, 1)
    else:
        raise ValueError(f"criterion must be 'kl' or 'fro', got {criterion!r}")
    new = whitening - whitening_rate * delta
    return canonicalize(0.5 * (new + new.transpose(-1, -2)), valid)


def whitening_error(cov_out: Tensor, valid: Tensor | None = None) -> Tensor:
    """Per-group ``||Cov(Y) - I||_F / d_g`` of an output covariance ``(G, d, d)`` -> ``(G,)``."""
    d = cov_out.shape[-1]
    eye = torch.eye(d, dtype=cov_out.dtype, device=cov_out.device)
    diff = canonicalize(cov_out, valid) - eye
    sizes = torch.full((cov_out.shape[0],), float(d), dtype=cov_out.dtype, device=cov_out.device)
    if valid is not None:
        sizes = valid.sum(-1).to(cov_out.dtype)
    return torch.linalg.matrix_norm(diff) / sizes


def newton_residual(cov: Tensor, matrix: Tensor, eps: float, valid: Tensor | None = None) -> Tensor:
    """``||W (cov + eps I) W^T - I||_F / d`` per group: how far ``W`` is from whitening ``cov``."""
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    return whitening_error(matrix @ (cov + eps * eye) @ matrix.transpose(-1, -2), valid)
