"""Tensor math for group-wise batch whitening (plain PyTorch, no module state).

Notation (see ``docs`` in the README): an input of shape ``(N, C, *spatial)`` is split into
``G = ceil(C / d)`` contiguous channel groups of ``d = group_size`` channels (the last group may
be smaller, ``r = C - (G - 1) d``). Each group is a matrix ``X_g`` of shape ``(d, m)`` with
``m = N * prod(spatial)`` samples.

Per-group matrices (covariances, whitening matrices) are stored as one tensor of shape
``(G, d, d)``. When the last group is smaller, its block is padded: the top-left ``r x r`` block
holds the real values and the rest is the identity ("canonical padding"). Functions that take
such a tensor accept ``valid``, a ``(G, d)`` boolean mask of real channels (``None`` when every
group is full), from :func:`valid_mask`.

Everything here runs in the dtype of its inputs: callers (the layers) upcast half-precision
activations to float32 first, so covariances and iterations never run in fp16/bf16.

Training-mode whitening is one fused autograd node, :func:`whiten`:
``y = weight * (W (x - mean)) + bias`` with ``W = fn(cov)`` for a :class:`MatrixMap` ``fn``.
Its backward saves only ``x`` and small ``(G, d, d)`` matrices (the same activation memory as
BatchNorm, whatever the number of iterations) and reads ``x`` and ``dy`` twice. The
activation-sized passes run chunk by chunk (about 4 MB at a time) so each chunk is reused from
cache by the GEMMs that follow.

The method-specific part is a differentiable map of the small covariance, with a hand-written
backward: :class:`IterNormMap` (Newton or coupled Newton-Schulz iterations, differentiated
through the truncated steps), :class:`ZCAMap` (eigendecomposition with a divided-difference
backward) and :class:`StandardizeMap` (SWBN's ``W diag(var + eps)^-1/2``), with functional
forms :func:`iternorm_matrix`, :func:`zca_matrix`, :func:`standardize_matrix`.

Composable building blocks for custom layers: :func:`batch_covariance`
(``x -> (x, mean, cov, count)``, x passes through to carry its gradient) and
:func:`grouped_affine` (``y = weight * (A (x - offset)) + bias`` with a block-diagonal ``A``);
plus the SWBN update :func:`swbn_update` and the diagnostics :func:`whitening_error` and
:func:`newton_residual`.
"""

from __future__ import annotations

import contextlib
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "BatchMoments",
    "GroupLayout",
    "IterNormMap",
    "MatrixMap",
    "StandardizeMap",
    "WhitenResult",
    "ZCAMap",
    "batch_covariance",
    "canonicalize",
    "group_layout",
    "grouped_affine",
    "iternorm_matrix",
    "newton_residual",
    "standardize_matrix",
    "swbn_update",
    "valid_mask",
    "whiten",
    "whitening_error",
    "zca_matrix",
]

IterNormMethod = Literal["newton", "coupled"]
SWBNCriterion = Literal["kl", "fro"]


# --------------------------------------------------------------------------------------------
# Group layout
# --------------------------------------------------------------------------------------------
class GroupLayout(NamedTuple):
    """How ``num_features`` channels split into groups of at most ``group_size`` channels."""

    num_features: int
    group_size: int
    num_groups: int
    last_group_size: int

    @property
    def sizes(self) -> tuple[int, ...]:
        """The size of each group, e.g. ``(16, 16, 8)`` for 40 channels in groups of 16."""
        return (self.group_size,) * (self.num_groups - 1) + (self.last_group_size,)

    @property
    def padded(self) -> bool:
        return self.last_group_size != self.group_size


def group_layout(num_features: int, group_size: int) -> GroupLayout:
    """Split ``num_features`` channels into contiguous groups of ``group_size`` channels.

    A ``group_size`` larger than ``num_features`` is clamped to ``num_features`` (one group).
    When ``group_size`` does not divide ``num_features``, the last group is smaller.
    """
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
        raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    d = min(group_size, num_features)
    g = -(-num_features // d)
    return GroupLayout(num_features, d, g, num_features - (g - 1) * d)


def valid_mask(layout: GroupLayout, device: torch.device | str | None = None) -> Tensor | None:
    """``(G, d)`` boolean mask of real (non-padding) channels, or ``None`` if no group is padded."""
    if not layout.padded:
        return None
    # Channel index < C, built on the device (no host-to-device copy).
    index = torch.arange(layout.num_groups * layout.group_size, device=device)
    return (index < layout.num_features).view(layout.num_groups, layout.group_size)


def canonicalize(matrices: Tensor, valid: Tensor | None, pad_value: float = 1.0) -> Tensor:
    """Set the padding block of ``(G, d, d)`` matrices to ``pad_value * I`` (no-op without padding)."""
    if valid is None:
        return matrices
    outer = valid.unsqueeze(-1) & valid.unsqueeze(-2)
    pad_diag = torch.diag_embed((~valid).to(matrices.dtype) * pad_value)
    return torch.where(outer, matrices, pad_diag)


def _pad_vector(v: Tensor, layout: GroupLayout) -> Tensor:
    """``(C,)`` -> ``(G, d)`` with zeros in the padding."""
    pad = layout.num_groups * layout.group_size - layout.num_features
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    return v.view(layout.num_groups, layout.group_size)


def _unpad_vector(v: Tensor, layout: GroupLayout) -> Tensor:
    """``(G, d)`` -> ``(C,)``."""
    return v.reshape(-1)[: layout.num_features]


# --------------------------------------------------------------------------------------------
# Layout-aware grouped kernels on activation-sized tensors
# --------------------------------------------------------------------------------------------
# An activation (N, C, *spatial) is handled in one of two views, without copying:
#   "cf" (channels first):  (N, C, L) contiguous, L = prod(spatial)
#   "cl" (channels last):   (M, C) contiguous, M = N * prod(spatial)
# 2-D inputs and channels_last(_3d) tensors use "cl"; contiguous tensors use "cf".
#
# Every pass over an activation is split into chunks of rows (samples, or positions for "cl")
# of about _CHUNK_BYTES, so that the temporaries of a chunk (the centered chunk, the output of
# a GEMM about to get its bias) stay in cache. Besides memory traffic this avoids allocating
# activation-sized temporaries at all: on CPU a fresh large allocation costs more in page
# faults than the arithmetic done on it.
_CHUNK_BYTES = 4 * 2**20


def _as_view(x: Tensor) -> tuple[Tensor, str]:
    c = x.shape[1]
    if x.dim() == 2:
        return x.contiguous(), "cl"
    if x.is_contiguous():
        return x.view(x.shape[0], c, -1), "cf"
    moved = x.movedim(1, -1)
    if moved.is_contiguous():
        return moved.reshape(-1, c), "cl"
    return x.contiguous().view(x.shape[0], c, -1), "cf"


def _in_view_of(t: Tensor, kind: str) -> Tensor:
    """View ``t`` (same shape as the reference activation) in the given layout, copying if needed."""
    c = t.shape[1]
    if kind == "cf":
        return t.contiguous().view(t.shape[0], c, -1)
    if t.dim() == 2:
        return t.contiguous()
    return t.movedim(1, -1).contiguous().view(-1, c)


def _empty_like_view(x: Tensor, kind: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A new tensor shaped like ``x`` in the layout ``kind``, and its view (never a view itself:
    autograd forbids in-place ops, such as timm's in-place activations, on views created inside
    a custom Function)."""
    if kind == "cf" or x.dim() == 2:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    else:
        out = torch.empty(x.shape[0], *x.shape[2:], x.shape[1], dtype=dtype, device=x.device)
        out = out.movedim(-1, 1)
        out = torch.empty_strided(out.shape, out.stride(), dtype=dtype, device=x.device)
    view, okind = _as_view(out)
    # The kernels write through this view: it must alias ``out`` (a copy would be a new
    # allocation; ``_base`` is not usable, inference mode does not track views).
    assert okind == kind and view.data_ptr() == out.data_ptr(), (
        "internal error: output view is a copy"
    )
    return out, view


def _chunks(v: Tensor) -> list[slice]:
    rows = v.shape[0]
    row_bytes = max(1, v.numel() // max(rows, 1) * v.element_size())
    per = max(1, _CHUNK_BYTES // row_bytes)
    return [slice(i, min(i + per, rows)) for i in range(0, rows, per)]


def _channel_sum(v: Tensor, kind: str) -> Tensor:
    return v.sum(dim=(0, 2)) if kind == "cf" else v.sum(dim=0)


def _channel_view(vec: Tensor, kind: str) -> Tensor:
    return vec.view(1, -1, 1) if kind == "cf" else vec.view(1, -1)


def _gram(a: Tensor, b: Tensor, kind: str, layout: GroupLayout) -> Tensor:
    """Per-group ``sum_samples a_g b_g^T`` as ``(G, d, d)`` (zeros in the padding)."""
    g, d, r = layout.num_groups, layout.group_size, layout.last_group_size
    full = g if r == d else g - 1
    cf = full * d
    blocks = []
    if full:
        if kind == "cf":
            n = a.shape[0]
            av = a[:, :cf].reshape(n, full, d, -1)
            bv = b[:, :cf].reshape(n, full, d, -1)
            blocks.append(torch.matmul(av, bv.transpose(-1, -2)).sum(0))
        else:
            m = a.shape[0]
            av = a[:, :cf].reshape(m, full, d)
            bv = b[:, :cf].reshape(m, full, d)
            blocks.append(torch.bmm(av.permute(1, 2, 0), bv.permute(1, 0, 2)))
    if r != d:
        if kind == "cf":
            last = torch.matmul(a[:, cf:], b[:, cf:].transpose(-1, -2)).sum(0)
        else:
            last = a[:, cf:].t() @ b[:, cf:]
        blocks.append(torch.nn.functional.pad(last, (0, d - r, 0, d - r)).unsqueeze(0))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, 0)


def _gmm(
    matrices: Tensor,
    v: Tensor,
    kind: str,
    layout: GroupLayout,
    out: Tensor,
    bias: Tensor | None = None,
    accumulate: bool = False,
) -> None:
    """Per group ``out_g (+)= A_g v_g (+ bias)`` on views (or chunks of views) of one layout."""
    g, d, r = layout.num_groups, layout.group_size, layout.last_group_size
    full = g if r == d else g - 1
    cf = full * d
    if kind == "cf":
        n, _, length = v.shape
        if full:
            a = matrices[:full].unsqueeze(0).expand(n, full, d, d).reshape(n * full, d, d)
            vb = (v if r == d else v[:, :cf]).reshape(n * full, d, length)
            if r == d:  # the full groups are one block of the output: write straight into it
                target = out.view(n * full, d, length)
                if accumulate:
                    target.baddbmm_(a, vb)
                else:
                    torch.bmm(a, vb, out=target)
            else:
                part = torch.bmm(a, vb).view(n, cf, length)
                if accumulate:
                    out[:, :cf] += part
                else:
                    out[:, :cf] = part
        if r != d:
            part = torch.matmul(matrices[-1, :r, :r], v[:, cf:])
            if accumulate:
                out[:, cf:] += part
            else:
                out[:, cf:] = part
    else:
        m = v.shape[0]
        if full:
            vf = v[:, :cf].reshape(m, full, d).transpose(0, 1)
            of = out[:, :cf].view(m, full, d).transpose(0, 1)
            at = matrices[:full].transpose(1, 2)
            if accumulate:
                of.baddbmm_(vf, at)
            else:
                torch.bmm(vf, at, out=of)
        if r != d:
            part = v[:, cf:] @ matrices[-1, :r, :r].t()
            if accumulate:
                out[:, cf:] += part
            else:
                out[:, cf:] = part
    if bias is not None:
        out.add_(_channel_view(bias, kind))


def _grouped_affine_into(
    matrices: Tensor, v: Tensor, kind: str, layout: GroupLayout, out: Tensor, bias: Tensor | None
) -> None:
    """``out = A v + bias`` chunk by chunk (the bias is added while the chunk is in cache)."""
    for rows in _chunks(v):
        _gmm(matrices, v[rows], kind, layout, out[rows], bias)


def _compiling() -> bool:
    # Under torch.compile the kernels run out of place and Inductor plans the memory; the
    # eager path's chunked, in-place writes (for cache and page-fault economy) do not trace.
    return torch.compiler.is_compiling()


def _affine_new(
    matrices: Tensor, v: Tensor, kind: str, layout: GroupLayout, bias: Tensor | None
) -> Tensor:
    """Out-of-place ``A v (+ bias)`` per group, in the layout of ``v`` (the traceable path)."""
    g, d, r = layout.num_groups, layout.group_size, layout.last_group_size
    full = g if r == d else g - 1
    cf = full * d
    parts = []
    if kind == "cf":
        n, _, length = v.shape
        if full:
            vf = v[:, :cf].reshape(n, full, d, length)
            parts.append(torch.matmul(matrices[:full], vf).reshape(n, cf, length))
        if r != d:
            parts.append(torch.matmul(matrices[-1, :r, :r], v[:, cf:]))
    else:
        m = v.shape[0]
        if full:
            vf = v[:, :cf].reshape(m, full, d)
            parts.append(torch.einsum("gij,mgj->mgi", matrices[:full], vf).reshape(m, cf))
        if r != d:
            parts.append(v[:, cf:] @ matrices[-1, :r, :r].t())
    out = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    return out if bias is None else out + _channel_view(bias, kind)


def _from_view(t: Tensor, kind: str, like: Tensor) -> Tensor:
    """A view-layout tensor back in the shape (and memory format) of ``like``."""
    if kind == "cf":
        return t.reshape(like.shape)
    if like.dim() == 2:
        return t
    return t.reshape(like.shape[0], *like.shape[2:], like.shape[1]).movedim(-1, 1)


def _matvec(matrices: Tensor, vec: Tensor, layout: GroupLayout) -> Tensor:
    """Per-group ``A_g v_g`` for a channel vector ``(C,)`` -> ``(C,)``."""
    return _unpad_vector(
        torch.matmul(matrices, _pad_vector(vec, layout).unsqueeze(-1)).squeeze(-1), layout
    )


def _outer(u: Tensor, v: Tensor, layout: GroupLayout) -> Tensor:
    """Per-group outer product of two channel vectors ``(C,)`` -> ``(G, d, d)``."""
    up, vp = _pad_vector(u, layout), _pad_vector(v, layout)
    return up.unsqueeze(-1) * vp.unsqueeze(-2)


def _no_autocast(t: Tensor) -> contextlib.AbstractContextManager:
    """Disable autocast on the device of ``t``: covariance math must stay in fp32/fp64."""
    if t.device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=t.device.type, enabled=False)
    return contextlib.nullcontext()


def _moments(v: Tensor, kind: str, layout: GroupLayout) -> tuple[Tensor, Tensor, Tensor]:
    """Exact centered moments in one pass over ``v``: ``(count, mean, M2)`` in float64.

    Each chunk is centered at its own mean while in cache (the two-pass algorithm within the
    chunk); the chunks are combined with Chan's parallel formula in float64::

        mean = sum_c n_c mu_c / n,   M2 = sum_c [G_c + n_c (mu_c - mean)(mu_c - mean)^T]
    """
    counts, means, grams = [], [], []
    for rows in _chunks(v):
        chunk = v[rows]
        n = chunk.numel() // layout.num_features
        mean = chunk.mean(dim=(0, 2)) if kind == "cf" else chunk.mean(dim=0)
        centered = chunk - _channel_view(mean, kind)
        counts.append(n)
        means.append(mean)
        grams.append(_gram(centered, centered, kind, layout))
    count = float(sum(counts))
    # Built with fill kernels, not torch.tensor(): a host-to-device copy would synchronize
    # the host with the GPU in every layer's forward (and break CUDA-graph capture).
    n = torch.full((), count, dtype=torch.float64, device=v.device)
    if len(counts) == 1:
        return n, means[0].double(), grams[0].double()
    # Every chunk but the last has the same number of rows.
    weights = torch.full((len(counts),), float(counts[0]), dtype=torch.float64, device=v.device)
    weights[-1].fill_(float(counts[-1]))
    mus = torch.stack(means).double()  # (k, C)
    mean = (weights.unsqueeze(1) * mus).sum(0) / count
    dev = torch.stack([_pad_vector(m, layout) for m in (mus - mean)])  # (k, G, d)
    m2 = torch.stack(grams).double().sum(0) + torch.einsum("k,kgi,kgj->gij", weights, dev, dev)
    return n, mean, m2


def _batch_statistics(
    x: Tensor, v: Tensor, kind: str, layout: GroupLayout, process_group: dist.ProcessGroup | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(count, mean (C,), cov (G, d, d))`` of a batch in ``x``'s dtype, over every rank of
    ``process_group`` when given: one collective per layer and step, of (sum x, sum x x^T,
    count) in float64, so uneven per-rank batches are weighted by their counts and nothing
    cancels badly."""
    n, mean, m2 = _moments(v, kind, layout)
    if process_group is not None:
        c = layout.num_features
        s2 = m2 + n * _outer(mean, mean, layout)
        packed = torch.cat([n * mean, s2.reshape(-1), n.view(1)])
        dist.all_reduce(packed, group=process_group)
        n = packed[-1].clone()
        mean = packed[:c] / n
        m2 = packed[c:-1].view_as(s2) - n * _outer(mean, mean, layout)
    cov = canonicalize((m2 / n).to(x.dtype), valid_mask(layout, x.device))
    return n.to(x.dtype), mean.to(x.dtype), cov


def _sum_statistics_grads(
    d_mean: Tensor, d_cov: Tensor, layout: GroupLayout, process_group: dist.ProcessGroup
) -> tuple[Tensor, Tensor]:
    """Every rank's loss depends on the global statistics: sum their gradients over the ranks
    (one collective)."""
    packed = torch.cat([d_mean.reshape(-1), d_cov.reshape(-1)])
    dist.all_reduce(packed, group=process_group)
    return packed[: layout.num_features], packed[layout.num_features :].view_as(d_cov)


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
        v, kind = _as_view(x)
        n, mean, cov = _batch_statistics(x, v, kind, layout, process_group)
        ctx.save_for_backward(x, mean, n)
        ctx.layout = layout
        ctx.process_group = process_group
        ctx.mark_non_differentiable(n)
        return x.view_as(x), mean, cov, n

    @staticmethod
    def backward(ctx, d_input, d_mean, d_cov, _d_count):  # type: ignore[override]
        x, mean, n = ctx.saved_tensors
        layout = ctx.layout
        with _no_autocast(x):
            if ctx.process_group is not None:
                dm = d_mean if d_mean is not None else torch.zeros_like(mean)
                dc = (
                    d_cov
                    if d_cov is not None
                    else x.new_zeros(layout.num_groups, layout.group_size, layout.group_size)
                )
                d_mean, d_cov = _sum_statistics_grads(dm, dc, layout, ctx.process_group)
            # d/dx of mean and cov: dmean / n + (dC + dC^T) (x - mean) / n
            bias = d_mean / n if d_mean is not None else torch.zeros_like(mean)
            s = None
            if d_cov is not None:
                s = (d_cov + d_cov.transpose(-1, -2)) / n
                bias = bias - _matvec(s, mean, layout)
            v, kind = _as_view(x)
            if _compiling():
                dxv = _channel_view(bias, kind).expand_as(v)
                if s is not None:
                    dxv = _affine_new(s, v, kind, layout, bias)
                dx = _from_view(dxv, kind, x)
                return (dx if d_input is None else dx + d_input), None, None
            dv = None
            if d_input is not None and d_input.dtype == x.dtype:
                view, dkind = _as_view(d_input)
                if dkind == kind and view.data_ptr() == d_input.data_ptr():
                    dv = view  # the incoming gradient is ours (an internal alias): add in place
            if dv is not None:
                dx = d_input
                for rows in _chunks(v):
                    if s is not None:
                        _gmm(s, v[rows], kind, layout, dv[rows], bias, accumulate=True)
                    else:
                        dv[rows].add_(_channel_view(bias, kind))
            else:
                dx, dv = _empty_like_view(x, kind, x.dtype)
                for rows in _chunks(v):
                    if s is not None:
                        _gmm(s, v[rows], kind, layout, dv[rows], bias)
                    else:
                        dv[rows].copy_(_channel_view(bias, kind).expand_as(dv[rows]))
                if d_input is not None:
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
    with _no_autocast(x):
        return BatchMoments(*_BatchCovariance.apply(x, layout, process_group))


# --------------------------------------------------------------------------------------------
# Grouped affine map (autograd Function)
# --------------------------------------------------------------------------------------------
class _GroupedAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, matrices, offset, weight, bias, layout):  # type: ignore[override]
        a = matrices
        if weight is not None:
            a = a * _pad_vector(weight, layout).unsqueeze(-1)
        # weight * (A (x - offset)) + bias = A' x + (bias - A' offset): no centered copy of x.
        b = -_matvec(a, offset, layout)
        if bias is not None:
            b = b + bias
        v, kind = _as_view(x)
        if _compiling():
            y = _from_view(_affine_new(a, v, kind, layout, b), kind, x)
        else:
            y, yv = _empty_like_view(x, kind, x.dtype)
            _grouped_affine_into(a, v, kind, layout, yv, b)
        ctx.save_for_backward(x, matrices, offset, weight)
        ctx.layout = layout
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, matrices, offset, weight = ctx.saved_tensors
        layout = ctx.layout
        need_x, need_a, need_off, need_w, need_b = ctx.needs_input_grad[:5]
        dx = dmat = doff = dw = db = None
        with _no_autocast(x):
            v, kind = _as_view(x)
            g = _in_view_of(dy, kind)
            a = matrices
            if weight is not None:
                a = a * _pad_vector(weight, layout).unsqueeze(-1)
            at = a.transpose(-1, -2)
            need_cross = need_a or need_w
            eager_dx = need_x and not _compiling()
            if eager_dx:
                dx, dxv = _empty_like_view(x, kind, x.dtype)
            elif need_x:
                dx = _from_view(_affine_new(at, g, kind, layout, None), kind, x)
            s_dy = None
            cross = None
            # One pass over dy and x: sum dy, sum dy (x - offset)^T, and A^T dy per chunk.
            for rows in _chunks(v):
                gc = g[rows]
                part = _channel_sum(gc, kind)
                s_dy = part if s_dy is None else s_dy + part
                if need_cross:
                    centered = v[rows] - _channel_view(offset, kind)
                    part = _gram(gc, centered, kind, layout)
                    cross = part if cross is None else cross + part
                if eager_dx:
                    _gmm(at, gc, kind, layout, dxv[rows])
            if need_w:
                dw = _unpad_vector((matrices * cross).sum(-1), layout)
            if need_a:
                dmat = (
                    cross * _pad_vector(weight, layout).unsqueeze(-1)
                    if weight is not None
                    else cross
                )
            if need_off:
                doff = -_matvec(at, s_dy, layout)
            if need_b and ctx.has_bias:
                db = s_dy
        return dx, dmat, doff, dw, db, None


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
    with _no_autocast(x):
        return _GroupedAffine.apply(x, matrices, offset, weight, bias, layout)


# --------------------------------------------------------------------------------------------
# Whitening matrices from covariances: small (G, d, d) maps with hand-written backward passes
# --------------------------------------------------------------------------------------------
class MatrixMap:
    """A map ``cov (G, d, d) -> W (G, d, d)`` with an explicit backward.

    ``forward`` returns ``W`` and what the backward needs; ``backward`` turns ``dL/dW`` into
    ``dL/dcov``. Keeping the backward explicit (instead of autograd over ~10 small ops per
    iteration) lets :func:`whiten` differentiate the whole layer in one autograd node.

    The tensors a map needs (a padding mask, SWBN's ``W``) are listed by :meth:`tensors` and
    handed back to ``forward``/``backward`` as arguments: they enter the autograd Function as
    inputs, which is what ``torch.compile`` needs to see them (a tensor kept on a plain Python
    object would be read again, after a buffer update, in a compiled backward).
    """

    #: Whether ``backward`` always returns a diagonal ``dL/dcov`` (lets the layer's backward use
    #: a per-channel scale instead of a GEMM).
    diagonal_grad: bool = False

    def tensors(self) -> tuple[Tensor | None, ...]:
        return ()

    def forward(self, cov: Tensor, *tensors: Tensor | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        raise NotImplementedError

    def backward(self, saved: tuple[Tensor, ...], grad: Tensor, *tensors: Tensor | None) -> Tensor:
        raise NotImplementedError


def _masked(t: Tensor, valid: Tensor | None) -> Tensor:
    """Zero the entries outside the real blocks (the padding of a canonical matrix is constant)."""
    if valid is None:
        return t
    return t * (valid.unsqueeze(-1) & valid.unsqueeze(-2)).to(t.dtype)


def _newton_forward(
    s: Tensor, iterations: int, method: IterNormMethod
) -> tuple[Tensor, list[Tensor]]:
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(s)
    if method == "newton":
        ps = [eye]
        for _ in range(iterations):
            p = ps[-1]
            ps.append(torch.baddbmm(p, p @ p @ p, s, beta=1.5, alpha=-0.5))
        return ps[-1], ps[:-1]
    ys, zs = [s], [eye]
    for _ in range(iterations):
        t = torch.baddbmm(eye, zs[-1], ys[-1], beta=1.5, alpha=-0.5)
        ys.append(ys[-1] @ t)
        zs.append(t @ zs[-1])
    return zs[-1], ys[:-1] + zs[:-1]


def _newton_backward(
    s: Tensor, saved: list[Tensor], grad: Tensor, iterations: int, method: IterNormMethod
) -> Tensor:
    """Exact gradient of the truncated iterations w.r.t. ``s`` (checked against autograd)."""
    st = s.transpose(-1, -2)
    if method == "newton":
        # P' = 1.5 P - 0.5 P^3 S:
        # dP = 1.5 G - 0.5 (G (P^2 S)^T + P^T G (P S)^T + (P^2)^T G S^T),  dS = -0.5 (P^3)^T G
        g, gs = grad, torch.zeros_like(s)
        for k in range(iterations - 1, -1, -1):
            p = saved[k]
            pt = p.transpose(-1, -2)
            p2t = (p @ p).transpose(-1, -2)
            gs = torch.baddbmm(gs, p2t @ pt, g, alpha=-0.5)
            term = g @ (st @ p2t) + pt @ g @ (st @ pt) + p2t @ (g @ st)
            g = torch.add(1.5 * g, term, alpha=-0.5)
        return gs
    # coupled: T = 1.5 I - 0.5 Z Y, Y' = Y T, Z' = T Z, output Z_T, Y_0 = S, Z_0 = I
    ys, zs = saved[:iterations], saved[iterations:]
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    gy, gz = torch.zeros_like(s), grad
    for k in range(iterations - 1, -1, -1):
        y, z = ys[k], zs[k]
        yt, zt = y.transpose(-1, -2), z.transpose(-1, -2)
        t = torch.baddbmm(eye, z, y, beta=1.5, alpha=-0.5)
        gt = yt @ gy + gz @ zt
        gy, gz = (
            torch.baddbmm(gy @ t.transpose(-1, -2), zt, gt, alpha=-0.5),
            torch.baddbmm(t.transpose(-1, -2) @ gz, gt, yt, alpha=-0.5),
        )
    return gy


class IterNormMap(MatrixMap):
    """IterNorm's ``W ~= (cov + eps I)^-1/2`` by ``T`` Newton steps (see :func:`iternorm_matrix`)."""

    def __init__(self, iterations: int = 5, eps: float = 1e-5, method: IterNormMethod = "newton",
                 valid: Tensor | None = None) -> None:  # fmt: skip
        if method not in ("newton", "coupled"):
            raise ValueError(f"method must be 'newton' or 'coupled', got {method!r}")
        self.iterations, self.eps, self.method, self.valid = iterations, eps, method, valid

    def tensors(self):
        return (self.valid,)

    def forward(self, cov, valid=None):
        d = cov.shape[-1]
        sigma = cov + self.eps * torch.eye(d, dtype=cov.dtype, device=cov.device)
        diag = sigma.diagonal(dim1=-2, dim2=-1)
        trace = (diag if valid is None else diag * valid).sum(-1).view(-1, 1, 1)
        # The padding block must stay harmless for the iteration (eigenvalues 1/d keep it bounded).
        sigma_n = canonicalize(sigma / trace, valid, 1.0 / d)
        p, iterates = _newton_forward(sigma_n, self.iterations, self.method)
        w = canonicalize(p * trace.rsqrt(), valid)
        return w, (sigma, trace, sigma_n, p, *iterates)

    def backward(self, saved, grad, valid=None):
        sigma, trace, sigma_n, p, *iterates = saved
        grad = _masked(grad, valid)
        r = trace.rsqrt()
        # W = P tr^-1/2
        d_trace = (grad * p).sum((-1, -2), keepdim=True) * (-0.5) * r / trace
        d_sn = _masked(
            _newton_backward(sigma_n, iterates, grad * r, self.iterations, self.method), valid
        )
        # Sigma_N = Sigma / tr
        d_sigma = d_sn / trace
        d_trace = d_trace - (d_sn * sigma).sum((-1, -2), keepdim=True) / trace**2
        # tr = sum of the real diagonal entries
        diag = valid.to(grad.dtype) if valid is not None else torch.ones_like(sigma[..., 0])
        d_sigma = d_sigma + torch.diag_embed(diag) * d_trace
        return _masked(d_sigma, valid)


class ZCAMap(MatrixMap):
    """DBN's ``W = U diag(lambda)^-1/2 U^T`` of ``cov + eps I`` (see :func:`zca_matrix`)."""

    def __init__(self, eps: float = 1e-5, valid: Tensor | None = None) -> None:
        self.eps, self.valid = eps, valid

    def tensors(self):
        return (self.valid,)

    def forward(self, cov, valid=None):
        d = cov.shape[-1]
        eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
        sigma = cov + self.eps * eye
        # LAPACK refuses non-finite input; decompose the identity for such groups instead and
        # give them a NaN result, so a bad batch shows in the output (running statistics are
        # guarded separately) rather than raising deep inside eigh or being silently "fixed".
        finite = torch.isfinite(sigma).flatten(-2).all(-1).view(-1, 1, 1)
        evals, evecs = torch.linalg.eigh(torch.where(finite, sigma, eye))
        # The exact eigenvalues of cov + eps I are >= eps; clamping only removes rounding error.
        s = evals.clamp_min(self.eps).sqrt()
        w = (evecs / s.unsqueeze(-2)) @ evecs.transpose(-1, -2)
        w = torch.where(finite, w, torch.full_like(w, float("nan")))
        return canonicalize(w, valid), (evecs, s)

    def backward(self, saved, grad, valid=None):
        evecs, s = saved
        grad = _masked(grad, valid)
        # Daleckii-Krein: dSigma = U (L o U^T dW U) U^T with the divided differences of
        # f(l) = l^-1/2, L_ij = (f(l_i) - f(l_j)) / (l_i - l_j) = -1 / (s_i s_j (s_i + s_j)),
        # which is f'(l_i) on the diagonal and has no 1/(l_i - l_j) term to blow up on ties.
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        lmat = -1.0 / (si * sj * (si + sj))
        inner = evecs.transpose(-1, -2) @ grad @ evecs
        inner = 0.5 * (inner + inner.transpose(-1, -2))
        return _masked(evecs @ (lmat * inner) @ evecs.transpose(-1, -2), valid)


class StandardizeMap(MatrixMap):
    """SWBN's effective map ``W diag(var + eps)^-1/2`` with ``var = diag(cov)`` and a constant
    ``W`` (see :func:`standardize_matrix`)."""

    diagonal_grad = True

    def __init__(
        self, eps: float, whitening: Tensor | None = None, valid: Tensor | None = None
    ) -> None:
        self.eps, self.whitening, self.valid = eps, whitening, valid

    def tensors(self):
        return (self.whitening, self.valid)

    def forward(self, cov, whitening=None, valid=None):
        inv_std = (cov.diagonal(dim1=-2, dim2=-1) + self.eps).rsqrt()
        if whitening is None:
            return torch.diag_embed(inv_std), (inv_std,)
        w = whitening.to(cov.dtype)
        return w * inv_std.unsqueeze(-2), (inv_std, w)

    def backward(self, saved, grad, whitening=None, valid=None):
        inv_std, *rest = saved
        # d/d var_j of (W_ij inv_std_j): sum_i dA_ij W_ij * (-1/2) inv_std_j^3
        d_inv = (grad * rest[0]).sum(-2) if rest else grad.diagonal(dim1=-2, dim2=-1)
        d_var = -0.5 * d_inv * inv_std**3
        if valid is not None:
            d_var = d_var * valid.to(d_var.dtype)
        return torch.diag_embed(d_var)


class _MatrixMapFn(torch.autograd.Function):
    """Differentiable application of a :class:`MatrixMap` (for the standalone functions)."""

    @staticmethod
    def forward(ctx, cov, fn, *tensors):  # type: ignore[override]
        w, saved = fn.forward(cov, *tensors)
        ctx.fn = fn
        ctx.num_tensors = len(tensors)
        ctx.save_for_backward(*saved, *tensors)
        return w

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        k = ctx.num_tensors
        saved = ctx.saved_tensors
        saved, tensors = saved[: len(saved) - k], saved[len(saved) - k :]
        with _no_autocast(grad):
            return ctx.fn.backward(tuple(saved), grad, *tensors), None, *([None] * k)


def iternorm_matrix(
    cov: Tensor,
    iterations: int = 5,
    eps: float = 1e-5,
    method: IterNormMethod = "newton",
    valid: Tensor | None = None,
) -> Tensor:
    """IterNorm whitening matrix ``W ~= (cov + eps I)^-1/2`` by ``T = iterations`` Newton steps.

    Per group (Huang et al., CVPR 2019)::

        Sigma   = cov + eps I
        Sigma_N = Sigma / tr(Sigma)
        P_0 = I,   P_k = (3 P_{k-1} - P_{k-1}^3 Sigma_N) / 2,   k = 1..T     (method="newton")
        W = P_T / sqrt(tr(Sigma))

    ``method="coupled"`` runs the coupled Newton-Schulz form ``Y_0 = Sigma_N, Z_0 = I,
    T_k = (3I - Z Y) / 2, Y <- Y T_k, Z <- T_k Z`` and returns ``Z_T / sqrt(tr)``; it equals the
    Newton form in exact arithmetic and stays stable for large ``T``.

    Args:
        cov: ``(G, d, d)`` covariances (canonical padding).
        valid: padding mask from :func:`valid_mask`, or ``None``.

    Returns:
        ``(G, d, d)`` whitening matrices (canonical padding). The gradient is the exact gradient
        of the ``T`` truncated steps (a hand-written backward over the saved ``(G, d, d)``
        iterates, checked against autograd in the tests).
    """
    fn = IterNormMap(iterations, eps, method, valid)
    return _MatrixMapFn.apply(cov, fn, *fn.tensors())


def zca_matrix(cov: Tensor, eps: float = 1e-5, valid: Tensor | None = None) -> Tensor:
    """DBN's ZCA whitening matrix ``W = U diag(lambda)^-1/2 U^T`` of ``cov + eps I`` per group.

    Args:
        cov: ``(G, d, d)`` covariances (canonical padding).

    Returns:
        ``(G, d, d)``, canonical padding. The backward uses divided differences
        ``(f(l_i) - f(l_j)) / (l_i - l_j)`` in closed form, so it stays finite and correct for
        repeated eigenvalues (plain autograd through ``eigh`` divides by ``l_i - l_j``).
    """
    fn = ZCAMap(eps, valid)
    return _MatrixMapFn.apply(cov, fn, *fn.tensors())


def standardize_matrix(cov: Tensor, eps: float, whitening: Tensor | None = None) -> Tensor:
    """SWBN's effective map ``W diag(var + eps)^-1/2`` with ``var = diag(cov)``.

    Applied to centered data this is ``W X_s`` with ``X_s = (x - mu) / sqrt(var + eps)``.
    Differentiable w.r.t. ``cov`` (the BN standardization); ``whitening`` (``W``) is treated as
    a constant. Without ``whitening`` this is plain BatchNorm standardization.
    """
    fn = StandardizeMap(eps, whitening)
    return _MatrixMapFn.apply(cov, fn, *fn.tensors())


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
        v, kind = _as_view(x)
        n, mean, cov = _batch_statistics(x, v, kind, layout, process_group)
        w, saved = fn.forward(cov, *tensors)
        a = w if weight is None else w * _pad_vector(weight, layout).unsqueeze(-1)
        # weight * (W (x - mean)) + bias = A x + (bias - A mean): no centered copy of x.
        b = -_matvec(a, mean, layout)
        if bias is not None:
            b = b + bias
        if _compiling():
            y = _from_view(_affine_new(a, v, kind, layout, b), kind, x)
        else:
            y, yv = _empty_like_view(x, kind, x.dtype)
            _grouped_affine_into(a, v, kind, layout, yv, b)
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
        with _no_autocast(x):
            v, kind = _as_view(x)
            g = _in_view_of(dy, kind)
            chunks = _chunks(v)
            # Phase 1 (one pass over dy and x): sum dy and the cross moment sum dy x^T. Taken
            # raw and corrected by (sum dy) mean^T: unlike the forward covariance, this term
            # only loses ~u * |mean| / std relative precision, which gradients do not mind.
            s_dy, cross = None, None
            for rows in chunks:
                gc, xc = g[rows], v[rows]
                part_s, part_c = _channel_sum(gc, kind), _gram(gc, xc, kind, layout)
                s_dy = part_s if s_dy is None else s_dy + part_s
                cross = part_c if cross is None else cross + part_c
            cross = cross - _outer(s_dy, mean, layout)  # sum dy (x - mean)^T
            if weight is not None:
                dweight = _unpad_vector((w * cross).sum(-1), layout)
                d_w = cross * _pad_vector(weight, layout).unsqueeze(-1)
            else:
                d_w = cross
            if ctx.has_bias:
                dbias = s_dy
            if ctx.needs_input_grad[0]:
                d_cov = fn.backward(tuple(saved), d_w, *tensors)
                d_mean = -_matvec(a.transpose(-1, -2), s_dy, layout)
                if ctx.process_group is not None:
                    d_mean, d_cov = _sum_statistics_grads(d_mean, d_cov, layout, ctx.process_group)
                # Phase 2: dx = A^T dy + S (x - mean) + d_mean / n, S = (dC + dC^T) / n,
                # both GEMMs accumulating into the same cache-resident chunk of dx.
                s = (d_cov + d_cov.transpose(-1, -2)) / n
                c = d_mean / n - _matvec(s, mean, layout)
                at = a.transpose(-1, -2)
                # A map whose covariance gradient is diagonal (SWBN: only the variances are
                # differentiated) needs a per-channel scale, not a d x d GEMM, for S (x - mean).
                scale = (
                    _unpad_vector(s.diagonal(dim1=-2, dim2=-1), layout)
                    if fn.diagonal_grad
                    else None
                )
                if _compiling():
                    if scale is not None:
                        cov_term = v * _channel_view(scale, kind) + _channel_view(c, kind)
                    else:
                        cov_term = _affine_new(s, v, kind, layout, c)
                    dx = _from_view(_affine_new(at, g, kind, layout, None) + cov_term, kind, x)
                else:
                    dx, dxv = _empty_like_view(x, kind, x.dtype)
                    for rows in chunks:
                        _gmm(at, g[rows], kind, layout, dxv[rows])
                        if scale is not None:
                            dxv[rows].addcmul_(v[rows], _channel_view(scale, kind)).add_(
                                _channel_view(c, kind)
                            )
                        else:
                            _gmm(s, v[rows], kind, layout, dxv[rows], c, accumulate=True)
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
    with _no_autocast(x):
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
