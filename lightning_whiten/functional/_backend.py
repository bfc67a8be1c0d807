"""The backend of the whitening math: group layout, activation views, chunked kernels and the
activation-sized passes that every autograd Function of :mod:`lightning_whiten.functional` shares.

Nothing here is differentiable by itself: the autograd Functions in ``whitening.py`` call these
passes from their ``forward``/``backward``. Each pass has two implementations, chosen in one
place (:func:`ops`): the eager one works chunk by chunk in place (cache reuse, no
activation-sized temporaries), the traceable one runs out of place for ``torch.compile``
(Inductor plans the memory; the eager path's in-place, chunked writes do not trace).

Notation: an input ``(N, C, *spatial)`` is split into ``G = ceil(C / d)`` contiguous groups of
``d = group_size`` channels (the last one may be smaller, ``r = C - (G - 1) d``). Per-group
matrices are ``(G, d, d)``; the padding of a smaller last group is the identity ("canonical
padding"), and ``valid`` (``(G, d)`` bool, or ``None``) marks the real channels.
"""

from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "GroupLayout",
    "canonicalize",
    "full_precision",
    "group_layout",
    "valid_mask",
]


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


def pad_vector(v: Tensor, layout: GroupLayout) -> Tensor:
    """``(C,)`` -> ``(G, d)`` with zeros in the padding."""
    pad = layout.num_groups * layout.group_size - layout.num_features
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    return v.view(layout.num_groups, layout.group_size)


def unpad_vector(v: Tensor, layout: GroupLayout) -> Tensor:
    """``(G, d)`` -> ``(C,)``."""
    return v.reshape(-1)[: layout.num_features]


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
_SCRATCH = True  # (benchmark switch: the reusable centering buffer of _moments)


def view_kind(x: Tensor) -> str:
    """The view :func:`_as_view` takes of ``x`` (``"cf"`` or ``"cl"``), without copying."""
    if x.dim() == 2:
        return "cl"
    if x.is_contiguous():
        return "cf"
    return "cl" if x.movedim(1, -1).is_contiguous() else "cf"


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


def _per_sample(layout: GroupLayout, v: Tensor, kind: str) -> bool:
    """Whether the channels-first GEMMs loop over samples instead of batching over them.

    Batched over samples, a ``(n, C, L)`` chunk needs the ``(G, d, d)`` matrices copied ``n``
    times (``bmm`` takes one batch stride) and the Gram matrices as ``n`` partial ``(G, d, d)``
    results summed afterwards: ``d / L`` times the activation's own traffic, which is no longer
    small once ``L <= 2 d`` (ResNet's last stages: 8x8 or 7x7 positions in groups of 64;
    measured 20-30% off those GEMMs). A loop over samples reads the matrices in place and
    accumulates the Gram matrix in place, at one call per sample: kept for ``L >= 16``, where a
    call's work is well above its overhead. CPU only: on a GPU the loop would be ``n`` kernel
    launches instead of one (not measured there; the batched form is kept).
    """
    if kind != "cf" or layout.padded or v.device.type != "cpu":
        return False
    length = v.shape[-1]
    return 16 <= length <= 2 * layout.group_size


def _gram(a: Tensor, b: Tensor, kind: str, layout: GroupLayout) -> Tensor:
    """Per-group ``sum_samples a_g b_g^T`` as ``(G, d, d)`` (zeros in the padding)."""
    g, d, r = layout.num_groups, layout.group_size, layout.last_group_size
    full = g if r == d else g - 1
    cf = full * d
    if _per_sample(layout, a, kind) and not compiling():
        length = a.shape[-1]
        acc = a.new_zeros(g, d, d)
        for i in range(a.shape[0]):
            acc.baddbmm_(a[i].view(g, d, length), b[i].view(g, d, length).transpose(1, 2))
        return acc
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
    if _per_sample(layout, v, kind):
        # (see _per_sample) each sample's (C, L) block is contiguous: one bmm per sample
        length = v.shape[-1]
        for i in range(v.shape[0]):
            target = out[i].view(g, d, length)
            if accumulate:
                target.baddbmm_(matrices, v[i].view(g, d, length))
            else:
                torch.bmm(matrices, v[i].view(g, d, length), out=target)
        if bias is not None:
            out.add_(_channel_view(bias, kind))
        return
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


# --------------------------------------------------------------------------------------------
# Small per-group helpers on channel vectors
# --------------------------------------------------------------------------------------------
def matvec(matrices: Tensor, vec: Tensor, layout: GroupLayout) -> Tensor:
    """Per-group ``A_g v_g`` for a channel vector ``(C,)`` -> ``(C,)``."""
    return unpad_vector(
        torch.matmul(matrices, pad_vector(vec, layout).unsqueeze(-1)).squeeze(-1), layout
    )


def outer(u: Tensor, v: Tensor, layout: GroupLayout) -> Tensor:
    """Per-group outer product of two channel vectors ``(C,)`` -> ``(G, d, d)``."""
    up, vp = pad_vector(u, layout), pad_vector(v, layout)
    return up.unsqueeze(-1) * vp.unsqueeze(-2)


def fold_affine(
    matrices: Tensor,
    offset: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    layout: GroupLayout,
) -> tuple[Tensor, Tensor]:
    """``weight * (A (x - offset)) + bias`` as ``A' x + b'``: ``(A', b')`` with
    ``A' = diag(weight) A`` per group and ``b' = bias - A' offset`` (no centered copy of x)."""
    a = matrices if weight is None else matrices * pad_vector(weight, layout).unsqueeze(-1)
    b = -matvec(a, offset, layout)
    return a, b if bias is None else b + bias


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------
def compiling() -> bool:
    """Whether ``torch.compile`` is tracing (the traceable kernels and no host-side checks)."""
    return torch.compiler.is_compiling()


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


class _FullPrecision:
    """Eager :func:`full_precision`: autocast off and full float32 products inside, the user's
    settings restored on exit. Enters only what is on (every layer step crosses this three
    times: a plain ``ExitStack`` of two context managers cost ~15 us each time)."""

    __slots__ = ("autocast", "device_type", "previous")

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type

    def __enter__(self) -> None:
        self.previous = torch.get_float32_matmul_precision()
        if self.previous != "highest":
            torch.set_float32_matmul_precision("highest")
        self.autocast = None
        if self.device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(self.device_type):
            self.autocast = torch.autocast(device_type=self.device_type, enabled=False)
            self.autocast.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.autocast is not None:
            self.autocast.__exit__(*exc)
        if self.previous != "highest":
            torch.set_float32_matmul_precision(self.previous)


def full_precision(t: Tensor) -> contextlib.AbstractContextManager:
    """Covariance math at full precision on the device of ``t``, whatever the user set.

    Autocast is disabled there (statistics and iterations stay in float32/float64 whatever the
    autocast dtype), and float32 matrix products run in full float32: a user's
    ``torch.set_float32_matmul_precision("high")`` (TF32 on Ampere and later) or ``"medium"``
    (bfloat16, also on CPUs with AMX) would make the covariance, the Newton iterations and the
    whitening GEMMs too coarse (Newton's iteration amplifies the error). The user's setting is
    restored on exit. Under ``torch.compile`` only autocast is handled (the precision is a
    global setting the compiler reads when it compiles; see the README).
    """
    if compiling():
        if t.device.type in _AUTOCAST_DEVICES:
            return torch.autocast(device_type=t.device.type, enabled=False)
        return contextlib.nullcontext()
    return _FullPrecision(t.device.type)  # type: ignore[return-value]


@torch.library.custom_op("lightning_whiten::snapshot", mutates_args=())
def snapshot(t: Tensor) -> Tensor:
    """A copy of ``t`` that a compiled backward never recomputes from ``t``.

    A layer that updates a buffer in place after using it (SWBN's whitening matrix) hands the
    autograd node a snapshot: eagerly a plain copy; under ``torch.compile`` an opaque op, so the
    compiler saves its result for the backward instead of re-reading the buffer, which the
    in-place update has changed by then.
    """
    return t.clone()


@snapshot.register_fake
def _(t: Tensor) -> Tensor:
    return torch.empty_like(t)


# --------------------------------------------------------------------------------------------
# Batch statistics (exact, chunked, optionally reduced across processes)
# --------------------------------------------------------------------------------------------
class _Scratch(threading.local):
    """One reusable CPU buffer per thread for the centered chunk of :func:`_moments`.

    A fresh chunk-sized (up to :data:`_CHUNK_BYTES`) temporary per chunk is a fresh ``mmap``
    for the allocator, and its first touch costs a page fault per 4 KiB page: measured on a
    loaded 2-core AMD EPYC VM, centering a 4 MiB chunk into a new tensor took 1.5-12 ms (the
    whole forward + backward of IterNorm at (64, 64, 32, 32) takes ~15 ms idle); with this
    buffer the layer's step took 0.82-0.95 of its time (interleaved A/B, four shapes). Never escapes :func:`_moments`; CUDA's caching allocator needs no such help.
    """

    buffer: Tensor | None = None

    def get(self, like: Tensor) -> Tensor:
        b = self.buffer
        if b is None or b.dtype != like.dtype or b.numel() < like.numel():
            b = self.buffer = torch.empty(
                max(like.numel(), _CHUNK_BYTES // like.element_size()), dtype=like.dtype
            )
        return b[: like.numel()].view(like.shape)


_scratch = _Scratch()


def _group_major_gram(layout: GroupLayout) -> bool:
    """Whether :func:`_moments` centers a channels-first chunk into a group-major buffer.

    The centering pass writes a buffer anyway; written as ``(C, n, L)`` instead of
    ``(n, C, L)`` (a transposed copy of blocks of ``L`` contiguous values), each group is one
    contiguous ``(d, n L)`` matrix and the chunk's Gram matrices are a single ``bmm`` over the
    groups with ``K = n L``, instead of one partial product per sample (summed afterwards, or
    accumulated by a loop over samples). Measured (2-core AMD EPYC, statistics pass alone,
    cold and hot caches): 0.55-0.70x the time at 8x8 and 4x4 positions, 0.8-0.9x at 16x16 and
    32x32 in groups of 16; slower only for a single group (``G = 1``: one GEMM with a long
    ``K`` does not use both cores; 1.3x at (64, 64, 32, 32) in one group of 64), where the
    per-sample form is kept. Not for a padded last group (the groups must tile ``C``).
    """
    return layout.num_groups > 1 and not layout.padded


def _moments(v: Tensor, kind: str, layout: GroupLayout) -> tuple[Tensor, Tensor, Tensor]:
    """Exact centered moments in one pass over ``v``: ``(count, mean, M2)`` in float64.

    Each chunk is centered at its own mean while in cache (the two-pass algorithm within the
    chunk); the chunks are combined with Chan's parallel formula in float64::

        mean = sum_c n_c mu_c / n,   M2 = sum_c [G_c + n_c (mu_c - mean)(mu_c - mean)^T]
    """
    counts, means, grams = [], [], []
    scratch = v.device.type == "cpu" and not compiling() and _SCRATCH
    group_major = scratch and kind == "cf" and _group_major_gram(layout)
    for rows in _chunks(v):
        chunk = v[rows]
        n = chunk.numel() // layout.num_features
        mean = chunk.mean(dim=(0, 2)) if kind == "cf" else chunk.mean(dim=0)
        if group_major:
            # Centered straight into a group-major buffer (C, n, L): each group is then one
            # (d, n L) matrix and the Gram matrices are one bmm over the groups, with no
            # per-sample partial products (see _group_major_gram).
            buf = _scratch.get(chunk).view(layout.num_features, chunk.shape[0], -1)
            torch.sub(chunk.transpose(0, 1), mean.view(-1, 1, 1), out=buf)
            xg = buf.view(layout.num_groups, layout.group_size, -1)
            gram = torch.bmm(xg, xg.transpose(1, 2))
        else:
            if scratch:
                centered = torch.sub(chunk, _channel_view(mean, kind), out=_scratch.get(chunk))
            else:
                centered = chunk - _channel_view(mean, kind)
            gram = _gram(centered, centered, kind, layout)
        counts.append(n)
        means.append(mean)
        grams.append(gram)
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
    dev = torch.stack([pad_vector(m, layout) for m in (mus - mean)])  # (k, G, d)
    m2 = torch.stack(grams).double().sum(0) + torch.einsum("k,kgi,kgj->gij", weights, dev, dev)
    return n, mean, m2


def batch_statistics(
    x: Tensor, layout: GroupLayout, process_group: dist.ProcessGroup | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(count, mean (C,), cov (G, d, d))`` of a batch in ``x``'s dtype, over every rank of
    ``process_group`` when given: one collective per layer and step, of (sum x, sum x x^T,
    count) in float64, so uneven per-rank batches are weighted by their counts and nothing
    cancels badly."""
    v, kind = _as_view(x)
    n, mean, m2 = _moments(v, kind, layout)
    if process_group is not None:
        c = layout.num_features
        s2 = m2 + n * outer(mean, mean, layout)
        packed = torch.cat([n * mean, s2.reshape(-1), n.view(1)])
        dist.all_reduce(packed, group=process_group)
        n = packed[-1].clone()
        mean = packed[:c] / n
        m2 = packed[c:-1].view_as(s2) - n * outer(mean, mean, layout)
    cov = canonicalize((m2 / n).to(x.dtype), valid_mask(layout, x.device))
    return n.to(x.dtype), mean.to(x.dtype), cov


def sum_statistics_grads(
    d_mean: Tensor, d_cov: Tensor, layout: GroupLayout, process_group: dist.ProcessGroup
) -> tuple[Tensor, Tensor]:
    """Every rank's loss depends on the global statistics: sum their gradients over the ranks
    (one collective)."""
    packed = torch.cat([d_mean.reshape(-1), d_cov.reshape(-1)])
    dist.all_reduce(packed, group=process_group)
    return packed[: layout.num_features], packed[layout.num_features :].view_as(d_cov)


# --------------------------------------------------------------------------------------------
# The activation-sized passes, eager (chunked, in place) and traceable (out of place)
# --------------------------------------------------------------------------------------------
class GradientSums(NamedTuple):
    """One pass over ``dy`` and ``x``: ``sum dy`` ``(C,)``, ``sum dy (x - offset)^T``
    ``(G, d, d)`` (or ``None``), and ``A^T dy`` when asked for (or ``None``)."""

    dy_sum: Tensor
    cross: Tensor | None
    transposed: Tensor | None


class InputGrad(NamedTuple):
    """The terms of an input gradient ``dx = A^T dy + S x + c`` (each but ``c`` optional;
    ``scale`` replaces the GEMM ``S x`` by ``scale * x`` when ``S`` is diagonal)."""

    c: Tensor
    transpose: Tensor | None = None  # A^T, applied to dy
    dy: Tensor | None = None
    s: Tensor | None = None
    scale: Tensor | None = None


class _Eager:
    """Chunk-by-chunk passes writing in place: each chunk of the activation is reused from
    cache by the GEMMs that follow, and no activation-sized temporary is allocated."""

    @staticmethod
    def affine(a: Tensor, x: Tensor, b: Tensor | None, layout: GroupLayout) -> Tensor:
        v, kind = _as_view(x)
        y, yv = _empty_like_view(x, kind, x.dtype)
        for rows in _chunks(v):
            _gmm(a, v[rows], kind, layout, yv[rows], b)
        return y

    @staticmethod
    def gradient_sums(dy: Tensor, x: Tensor, offset: Tensor, layout: GroupLayout, cross: bool,
                      transpose: Tensor | None) -> GradientSums:  # fmt: skip
        v, kind = _as_view(x)
        g = _in_view_of(dy, kind)
        out = outv = None
        if transpose is not None:
            out, outv = _empty_like_view(x, kind, x.dtype)
        s_dy = c = None
        for rows in _chunks(v):
            gc = g[rows]
            part = _channel_sum(gc, kind)
            s_dy = part if s_dy is None else s_dy + part
            if cross:
                part = _gram(gc, v[rows], kind, layout)
                c = part if c is None else c + part
            if outv is not None:
                _gmm(transpose, gc, kind, layout, outv[rows])
        assert s_dy is not None
        # Taken raw and corrected by (sum dy) offset^T: unlike the forward covariance, this
        # only loses ~u * |offset| / std relative precision, which gradients do not mind.
        if c is not None:
            c = c - outer(s_dy, offset, layout)
        return GradientSums(s_dy, c, out)

    @staticmethod
    def input_grad(x: Tensor, layout: GroupLayout, terms: InputGrad,
                   accumulate: Tensor | None = None) -> Tensor:  # fmt: skip
        c, transpose, dy, s, scale = terms
        v, kind = _as_view(x)
        g = None if dy is None else _in_view_of(dy, kind)
        if accumulate is not None:
            out, outv = accumulate, _as_view(accumulate)[0]
        else:
            out, outv = _empty_like_view(x, kind, x.dtype)
        c_view = _channel_view(c, kind)
        for rows in _chunks(v):
            target = outv[rows]
            written = accumulate is not None
            if transpose is not None:
                assert g is not None
                _gmm(transpose, g[rows], kind, layout, target, accumulate=written)
                written = True
            if scale is not None:
                if written:
                    target.addcmul_(v[rows], _channel_view(scale, kind))
                else:
                    torch.mul(v[rows], _channel_view(scale, kind), out=target)
                target.add_(c_view)
            elif s is not None:
                _gmm(s, v[rows], kind, layout, target, c, accumulate=written)
            elif written:
                target.add_(c_view)
            else:
                target.copy_(c_view.expand_as(target))
        return out


class _Traceable:
    """The same passes out of place, for ``torch.compile``."""

    @staticmethod
    def affine(a: Tensor, x: Tensor, b: Tensor | None, layout: GroupLayout) -> Tensor:
        v, kind = _as_view(x)
        y = _from_view(_affine_new(a, v, kind, layout, b), kind, x)
        # The forward output of the autograd Functions: a view of a tensor made inside one may
        # not be modified in place, and timm's and torchvision's ReLU(inplace=True) does. The
        # copy is fused by the compiler into the kernel that writes y (no extra pass).
        return y.clone(memory_format=torch.preserve_format)

    @staticmethod
    def gradient_sums(dy: Tensor, x: Tensor, offset: Tensor, layout: GroupLayout, cross: bool,
                      transpose: Tensor | None) -> GradientSums:  # fmt: skip
        v, kind = _as_view(x)
        g = _in_view_of(dy, kind)
        s_dy = _channel_sum(g, kind)
        c = _gram(g, v, kind, layout) - outer(s_dy, offset, layout) if cross else None
        t = None
        if transpose is not None:
            t = _from_view(_affine_new(transpose, g, kind, layout, None), kind, x)
        return GradientSums(s_dy, c, t)

    @staticmethod
    def input_grad(x: Tensor, layout: GroupLayout, terms: InputGrad,
                   accumulate: Tensor | None = None) -> Tensor:  # fmt: skip
        v, kind = _as_view(x)
        if terms.scale is not None:
            out = v * _channel_view(terms.scale, kind) + _channel_view(terms.c, kind)
        elif terms.s is not None:
            out = _affine_new(terms.s, v, kind, layout, terms.c)
        else:
            out = _channel_view(terms.c, kind).expand_as(v)
        if terms.transpose is not None:
            assert terms.dy is not None
            g = _in_view_of(terms.dy, kind)
            out = out + _affine_new(terms.transpose, g, kind, layout, None)
        dx = _from_view(out, kind, x)
        return dx if accumulate is None else accumulate + dx


def ops() -> type[_Eager] | type[_Traceable]:
    """The implementation of the activation-sized passes for the current context: the only
    place where eager and ``torch.compile`` paths are told apart."""
    return _Traceable if compiling() else _Eager
