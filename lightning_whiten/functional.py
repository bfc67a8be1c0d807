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

The activation-sized work is done by two autograd Functions whose backward passes save only
the centered input (the same memory as BatchNorm, whatever the number of iterations):

* :func:`batch_covariance` -- ``x -> (x - shift, mean, cov)``.
* :func:`grouped_affine` -- ``y = weight * (A (x - offset)) + bias`` with a block-diagonal ``A``.

The method-specific part is a differentiable function of the small ``(G, d, d)`` covariance:
:func:`iternorm_matrix` (Newton or coupled Newton-Schulz iterations, differentiated through the
truncated steps), :func:`zca_matrix` (eigendecomposition with a divided-difference backward)
and :func:`standardize_matrix` (SWBN's ``W diag(var + eps)^-1/2``), plus the SWBN update
:func:`swbn_update`.
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
    "batch_covariance",
    "canonicalize",
    "group_layout",
    "grouped_affine",
    "iternorm_matrix",
    "standardize_matrix",
    "swbn_update",
    "valid_mask",
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
    mask = torch.ones(layout.num_groups, layout.group_size, dtype=torch.bool, device=device)
    mask[-1, layout.last_group_size :] = False
    return mask


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
# An activation (N, C, *spatial) is handled in one of two 2-D/3-D views without copying:
#   "cf" (channels first):  (N, C, L) contiguous, L = prod(spatial)
#   "cl" (channels last):   (M, C) contiguous, M = N * prod(spatial)
# 2-D inputs and channels_last(_3d) tensors use "cl"; contiguous tensors use "cf".


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


def _like(v: Tensor, kind: str, x: Tensor) -> Tensor:
    """Give a view result back the shape (and memory format) of ``x``."""
    if kind == "cf":
        return v.view(x.shape)
    if x.dim() == 2:
        return v
    return v.view(x.shape[0], *x.shape[2:], x.shape[1]).movedim(-1, 1)


def _in_view_of(t: Tensor, kind: str) -> Tensor:
    """View ``t`` (same shape as the reference activation) in the given layout, copying if needed."""
    c = t.shape[1]
    if kind == "cf":
        return t.contiguous().view(t.shape[0], c, -1)
    if t.dim() == 2:
        return t.contiguous()
    return t.movedim(1, -1).contiguous().view(-1, c)


def _channel_sum(v: Tensor, kind: str) -> Tensor:
    return v.sum(dim=(0, 2)) if kind == "cf" else v.sum(dim=0)


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
            ar, br = a[:, cf:], b[:, cf:]
            last = torch.matmul(ar, br.transpose(-1, -2)).sum(0)
        else:
            last = a[:, cf:].t() @ b[:, cf:]
        blocks.append(torch.nn.functional.pad(last, (0, d - r, 0, d - r)).unsqueeze(0))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, 0)


def _grouped_mm(
    matrices: Tensor, v: Tensor, kind: str, layout: GroupLayout, bias: Tensor | None, out: Tensor
) -> Tensor:
    """Per-group ``out_g = A_g v_g (+ bias)``; ``out`` is a view (same layout as ``v``) to fill."""
    g, d, r = layout.num_groups, layout.group_size, layout.last_group_size
    full = g if r == d else g - 1
    cf = full * d
    if kind == "cf":
        n, _, length = v.shape
        if full:
            vf = v if r == d else v[:, :cf]
            a = matrices[:full].unsqueeze(0).expand(n, full, d, d).reshape(n * full, d, d)
            vb = vf.reshape(n * full, d, length)
            # Write straight into the output when its full groups are one contiguous block.
            target = out.view(n * full, d, length) if r == d else None
            if bias is not None:
                bb = bias[:cf].view(1, full, d, 1).expand(n, full, d, 1).reshape(n * full, d, 1)
                yf = (
                    torch.baddbmm(bb, a, vb, out=target)
                    if target is not None
                    else torch.baddbmm(bb, a, vb)
                )
            else:
                yf = torch.bmm(a, vb, out=target) if target is not None else torch.bmm(a, vb)
            if target is None:
                out[:, :cf] = yf.view(n, cf, length)
        if r != d:
            yl = torch.matmul(matrices[-1, :r, :r], v[:, cf:])
            out[:, cf:] = yl if bias is None else yl + bias[cf:].view(1, r, 1)
        return out
    m = v.shape[0]
    if full:
        vf = v[:, :cf].reshape(m, full, d).transpose(0, 1)
        of = out[:, :cf].view(m, full, d).transpose(0, 1)
        at = matrices[:full].transpose(1, 2)
        if bias is not None:
            of.copy_(bias[:cf].view(full, 1, d).expand(full, m, d))
            torch.baddbmm(of, vf, at, out=of)
        else:
            torch.bmm(vf, at, out=of)
    if r != d:
        yl = v[:, cf:] @ matrices[-1, :r, :r].t()
        out[:, cf:] = yl if bias is None else yl + bias[cf:]
    return out


def _grouped_mm_like(
    matrices: Tensor, t: Tensor, layout: GroupLayout, bias: Tensor | None
) -> Tensor:
    """``_grouped_mm`` on an activation ``t`` returning a new tensor in ``t``'s memory format.

    The result is never a view (autograd forbids in-place ops, such as timm's in-place
    activations, on views created inside a custom Function).
    """
    v, kind = _as_view(t)
    if kind == "cf" or t.dim() == 2:
        out = torch.empty(t.shape, dtype=v.dtype, device=v.device)
    else:
        # channels_last-like: t is dense with channels innermost, the same strides keep it so.
        out = torch.empty_strided(t.shape, t.stride(), dtype=v.dtype, device=v.device)
    view, _ = _as_view(out)
    # The kernels write through this view: it must alias ``out`` (a copy would be a new
    # allocation; ``_base`` is not usable, inference mode does not track views).
    assert view.data_ptr() == out.data_ptr(), "internal error: output view is a copy"
    _grouped_mm(matrices, v, kind, layout, bias, view)
    return out


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


def _reduce_dims(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


# --------------------------------------------------------------------------------------------
# Batch covariance (autograd Function)
# --------------------------------------------------------------------------------------------
class BatchMoments(NamedTuple):
    """Result of :func:`batch_covariance`.

    Attributes:
        shifted: ``x - shift``, shape and memory format of ``x`` (differentiable).
        mean: batch mean ``(C,)`` (over every process of ``process_group`` when synced).
        cov: biased batch covariance per group ``(G, d, d)``, canonical padding.
        offset: ``mean - shift`` ``(C,)``, the mean of ``shifted``: ``shifted - offset`` is the
            centered input (zero when the batch mean itself was the shift).
        cov: biased batch covariance per group ``(G, d, d)``, canonical padding.
        count: number of samples per channel as a 0-dim tensor (global when synced).
    """

    shifted: Tensor
    mean: Tensor
    offset: Tensor
    cov: Tensor
    count: Tensor


class _BatchCovariance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, layout, process_group, use_batch_mean):  # type: ignore[override]
        c = layout.num_features
        if use_batch_mean:
            shift = x.mean(dim=_reduce_dims(x))
        shape = (1, c) + (1,) * (x.dim() - 2)
        shifted = x - shift.view(shape)
        v, kind = _as_view(shifted)
        count = v.numel() // c
        gram = _gram(v, v, kind, layout)
        if process_group is not None:
            # One collective per layer and step: (sum of shifted x, sum of outer products, count).
            # The shift is identical on every rank, so the sums add up exactly.
            s1 = _channel_sum(v, kind)
            packed = torch.cat([s1, gram.reshape(-1), s1.new_full((1,), float(count))])
            dist.all_reduce(packed, group=process_group)
            s1 = packed[:c]
            gram = packed[c:-1].view_as(gram)
            n = packed[-1].clone()
            delta = s1 / n
            cov = gram / n - _outer(delta, delta, layout)
        else:
            n = torch.tensor(float(count), dtype=x.dtype, device=x.device)
            if use_batch_mean:
                delta = torch.zeros_like(shift)
                cov = gram / count
            else:
                delta = _channel_sum(v, kind) / count
                cov = gram / count - _outer(delta, delta, layout)
        cov = canonicalize(cov, valid_mask(layout, x.device))
        mean = shift + delta
        ctx.save_for_backward(shifted, delta, n)
        ctx.layout = layout
        ctx.process_group = process_group
        ctx.mark_non_differentiable(n)
        return shifted, mean, delta, cov, n

    @staticmethod
    def backward(ctx, d_shifted, d_mean, d_offset, d_cov, _d_count):  # type: ignore[override]
        shifted, delta, n = ctx.saved_tensors
        layout = ctx.layout
        # offset = mean - shift with a constant shift: both carry the gradient of the mean.
        if d_offset is not None:
            d_mean = d_offset if d_mean is None else d_mean + d_offset
        with _no_autocast(shifted):
            if ctx.process_group is not None:
                # Every rank's loss depends on the global statistics: sum their gradients.
                dm = d_mean if d_mean is not None else torch.zeros_like(delta)
                dc = (
                    d_cov
                    if d_cov is not None
                    else shifted.new_zeros(layout.num_groups, layout.group_size, layout.group_size)
                )
                packed = torch.cat([dm.reshape(-1), dc.reshape(-1)])
                dist.all_reduce(packed, group=ctx.process_group)
                d_mean = packed[: layout.num_features]
                d_cov = packed[layout.num_features :].view_as(dc)
            bias = d_mean / n if d_mean is not None else None
            if d_cov is not None:
                # d cov / d x_c = (dC + dC^T) x_c / n, with x_c = shifted - delta.
                s = (d_cov + d_cov.transpose(-1, -2)) / n
                c_term = -_matvec(s, delta, layout)
                bias = c_term if bias is None else bias + c_term
                dx = _grouped_mm_like(s, shifted, layout, bias)
                if d_shifted is not None:
                    dx = dx + d_shifted
            else:
                dx = d_shifted if d_shifted is not None else torch.zeros_like(shifted)
                if bias is not None:
                    dx = dx + bias.view((1, -1) + (1,) * (shifted.dim() - 2))
        return dx, None, None, None, None


def batch_covariance(
    x: Tensor,
    group_size: int,
    shift: Tensor | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> BatchMoments:
    """Batch mean and per-group covariance of ``x`` (differentiable w.r.t. ``x``).

    Args:
        x: ``(N, C, *spatial)`` activations (float32 or float64).
        group_size: channels per group ``d``.
        shift: optional constant ``(C,)`` subtracted before accumulating (detached). Without it
            the batch mean is used, which is the exact two-pass algorithm. With it, the sums are
            shifted sums, which can be added across processes.
        process_group: when given, the sums are all-reduced over that group (one collective),
            so every rank gets the statistics of the concatenated batch, and the backward pass
            all-reduces the gradients of ``mean`` and ``cov``. ``shift`` must then be identical
            on every rank.

    Returns:
        :class:`BatchMoments` with ``mean = E[x]`` of shape ``(C,)`` and
        ``cov_g = E[(x_g - mu_g)(x_g - mu_g)^T]`` of shape ``(G, d, d)`` (biased, no ``eps``).
    """
    layout = group_layout(x.shape[1], group_size)
    use_batch_mean = shift is None
    if shift is None:
        shift = x.new_zeros(x.shape[1])
    with _no_autocast(x):
        return BatchMoments(
            *_BatchCovariance.apply(
                x, shift.detach().to(x.dtype), layout, process_group, use_batch_mean
            )
        )


# --------------------------------------------------------------------------------------------
# Grouped affine map (autograd Function)
# --------------------------------------------------------------------------------------------
class _GroupedAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, matrices, offset, weight, bias, layout):  # type: ignore[override]
        a = matrices
        if weight is not None:
            a = a * _pad_vector(weight, layout).unsqueeze(-1)
        b = -_matvec(a, offset, layout)
        if bias is not None:
            b = b + bias
        y = _grouped_mm_like(a, x, layout, b)
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
            s_dy = _channel_sum(g, kind)
            if need_a or need_w:
                # dL/dA_g = sum dy_g (x_g - offset_g)^T  (before the per-row weight)
                cross = _gram(g, v, kind, layout) - _outer(s_dy, offset, layout)
                if need_w:
                    dw = _unpad_vector((matrices * cross).sum(-1), layout)
                if need_a:
                    dmat = (
                        cross * _pad_vector(weight, layout).unsqueeze(-1)
                        if weight is not None
                        else cross
                    )
            if need_x:
                dx = _grouped_mm_like(a.transpose(-1, -2), _like(g, kind, x), layout, None)
            if need_off:
                doff = -_matvec(a.transpose(-1, -2), s_dy, layout)
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
        saves only ``x`` and the small matrices.
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
# Whitening matrices from covariances (small tensors, differentiable)
# --------------------------------------------------------------------------------------------
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
        ``(G, d, d)`` whitening matrices (canonical padding). Autograd differentiates exactly
        through the ``T`` truncated steps; only ``(G, d, d)`` intermediates are kept.
    """
    if method not in ("newton", "coupled"):
        raise ValueError(f"method must be 'newton' or 'coupled', got {method!r}")
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    sigma = cov + eps * eye
    diag = sigma.diagonal(dim1=-2, dim2=-1)
    trace = (diag if valid is None else diag * valid).sum(-1)
    sigma_n = sigma / trace.view(-1, 1, 1)
    # The padding block must stay harmless for the iteration (eigenvalues 1/d keep it bounded).
    sigma_n = canonicalize(sigma_n, valid, 1.0 / d)
    if method == "newton":
        p = eye.expand_as(sigma_n)
        for _ in range(iterations):
            p = torch.baddbmm(p, p @ p @ p, sigma_n, beta=1.5, alpha=-0.5)
    else:
        y, p = sigma_n, eye.expand_as(sigma_n)
        for _ in range(iterations):
            t = torch.baddbmm(eye, p, y, beta=1.5, alpha=-0.5)
            y, p = y @ t, t @ p
    return canonicalize(p * trace.rsqrt().view(-1, 1, 1), valid)


class _InverseSqrtEigh(torch.autograd.Function):
    """``Sigma^-1/2`` by eigendecomposition with a backward that stays finite on ties."""

    @staticmethod
    def forward(ctx, sigma, floor):  # type: ignore[override]
        # LAPACK refuses non-finite input; decompose the identity for such groups instead and
        # give them a NaN result, so a bad batch shows in the output (running statistics are
        # guarded separately) rather than raising deep inside eigh or being silently "fixed".
        finite = torch.isfinite(sigma).flatten(-2).all(-1).view(-1, 1, 1)
        eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
        evals, evecs = torch.linalg.eigh(torch.where(finite, sigma, eye))
        # The exact eigenvalues of cov + eps I are >= eps; clamping only removes rounding error.
        s = evals.clamp_min(floor).sqrt()
        w = (evecs / s.unsqueeze(-2)) @ evecs.transpose(-1, -2)
        w = torch.where(finite, w, torch.full_like(w, float("nan")))
        ctx.save_for_backward(evecs, s)
        return w

    @staticmethod
    def backward(ctx, dw):  # type: ignore[override]
        evecs, s = ctx.saved_tensors
        with _no_autocast(dw):
            # Daleckii-Krein: dSigma = U (L o U^T dW U) U^T with the divided differences of
            # f(l) = l^-1/2, L_ij = (f(l_i) - f(l_j)) / (l_i - l_j) = -1 / (s_i s_j (s_i + s_j)),
            # which is f'(l_i) on the diagonal and has no 1/(l_i - l_j) term to blow up.
            si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
            lmat = -1.0 / (si * sj * (si + sj))
            inner = evecs.transpose(-1, -2) @ dw @ evecs
            inner = 0.5 * (inner + inner.transpose(-1, -2))
            dsigma = evecs @ (lmat * inner) @ evecs.transpose(-1, -2)
        return dsigma, None


def zca_matrix(cov: Tensor, eps: float = 1e-5, valid: Tensor | None = None) -> Tensor:
    """DBN's ZCA whitening matrix ``W = U diag(lambda)^-1/2 U^T`` of ``cov + eps I`` per group.

    Args:
        cov: ``(G, d, d)`` covariances (canonical padding).

    Returns:
        ``(G, d, d)``, canonical padding. The backward uses divided differences
        ``(f(l_i) - f(l_j)) / (l_i - l_j)`` in closed form, so it stays finite and correct for
        repeated eigenvalues (plain autograd through ``eigh`` divides by ``l_i - l_j``).
    """
    d = cov.shape[-1]
    sigma = cov + eps * torch.eye(d, dtype=cov.dtype, device=cov.device)
    return canonicalize(_InverseSqrtEigh.apply(sigma, eps), valid)


def standardize_matrix(cov: Tensor, eps: float, whitening: Tensor | None = None) -> Tensor:
    """SWBN's effective map ``W diag(var + eps)^-1/2`` with ``var = diag(cov)``.

    Applied to centered data this is ``W X_s`` with ``X_s = (x - mu) / sqrt(var + eps)``.
    Differentiable w.r.t. ``cov`` (the BN standardization); ``whitening`` (``W``) is treated as
    a constant. Without ``whitening`` this is plain BatchNorm standardization.
    """
    inv_std = (cov.diagonal(dim1=-2, dim2=-1) + eps).rsqrt()
    if whitening is None:
        return torch.diag_embed(inv_std)
    return whitening.detach() * inv_std.unsqueeze(-2)


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
