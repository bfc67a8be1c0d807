"""Whitening matrices from covariances: small ``(G, d, d)`` maps with hand-written backward passes.

A :class:`MatrixMap` turns a batch covariance into the whitening matrix of one method:
:class:`IterNormMap` (Newton or coupled Newton-Schulz iterations, differentiated through the
truncated steps), :class:`ZCAMap` (eigendecomposition with a divided-difference backward) and
:class:`StandardizeMap` (SWBN's ``W diag(var + eps)^-1/2``). The fused layer op
:func:`lightning_whiten.functional.whiten` calls a map's ``forward``/``backward`` inside its own
autograd node; :func:`iternorm_matrix`, :func:`zca_matrix` and :func:`standardize_matrix` are
the same maps as standalone differentiable functions.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._backend import canonicalize, compiling, full_precision

__all__ = [
    "IterNormMap",
    "IterNormMethod",
    "MatrixMap",
    "SWBNCriterion",
    "StandardizeMap",
    "ZCAMap",
    "iternorm_matrix",
    "standardize_matrix",
    "zca_matrix",
]

IterNormMethod = Literal["newton", "coupled"]
SWBNCriterion = Literal["kl", "fro"]


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
    if method == "newton":
        # Every P_k is a polynomial in S: symmetric and commuting with S, so
        # P^3 S = P (P (P S)), and the backward needs only P_k, Q_k = P_k S, R_k = P_k^2 S
        # (saved). P_1 = 1.5 I - 0.5 S costs no product.
        p = s * -0.5
        p.diagonal(dim1=-2, dim2=-1).add_(1.5)
        saved = [p]
        for _ in range(iterations - 1):
            q = p @ s
            r = p @ q
            saved += [q, r]
            p = torch.baddbmm(p, p, r, beta=1.5, alpha=-0.5)
            saved.append(p)
        # saved = [P_1, Q_1, R_1, P_2, ..., P_T]; the last one is the result
        return p, saved[:-1]
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(s)
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
    if method == "newton":
        # P' = 1.5 P - 0.5 P^3 S with P, S symmetric and commuting (P = p(S)), Q = P S,
        # R = P^2 S (all symmetric):
        #   dP = 1.5 G - 0.5 (G R + P G Q + P^2 G S),   dS += -0.5 P^3 G
        # 6 products per step (a general chain needs ~10); the first step (P_0 = I) needs
        # none: its dS is -0.5 G and there is no dP_0 to propagate.
        # (The scalings ride on baddbmm's alpha/beta: no separate elementwise kernels.)
        g, gs = grad, None
        for k in range(iterations - 1, 0, -1):
            p, q, r = saved[3 * (k - 1)], saved[3 * (k - 1) + 1], saved[3 * (k - 1) + 2]
            pg = p @ g
            p2g = p @ pg
            if gs is None:  # beta=0: the input only gives the shape
                gs = torch.baddbmm(p2g, p, p2g, beta=0.0, alpha=-0.5)
            else:
                gs.baddbmm_(p, p2g, alpha=-0.5)
            g_next = torch.baddbmm(g, g, r, beta=1.5, alpha=-0.5)
            g_next.baddbmm_(pg, q, alpha=-0.5)
            g = g_next.baddbmm_(p2g, s, alpha=-0.5)
        return -0.5 * g if gs is None else gs.add_(g, alpha=-0.5)
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


# --------------------------------------------------------------------------------------------
# The same Newton polynomial, evaluated on the eigenvalues
# --------------------------------------------------------------------------------------------
# Every Newton iterate P_k is a polynomial p_k in Sigma_N (p_0 = 1,
# p_{k+1}(l) = 1.5 p_k(l) - 0.5 p_k(l)^3 l; the coupled form gives the same Z_k = p_k(Sigma_N)),
# so with Sigma_N = U diag(l) U^T:  P_T = U diag(p_T(l)) U^T, and the exact gradient of the
# truncated steps is the Daleckii-Krein formula  dSigma_N = U (D o (U^T dP U)) U^T  with the
# divided differences D_ij = (p_T(l_i) - p_T(l_j)) / (l_i - l_j) (p_T'(l_i) on ties). D follows
# the recursion of p itself, with no division at all (so no loss on near-equal eigenvalues):
#   D_{k+1} = 1.5 D_k - 0.5 [ (p_k(a)^3 + p_k(b)^3) / 2
#                             + (a + b) / 2 * D_k * (p_k(a)^2 + p_k(a) p_k(b) + p_k(b)^2) ]
# (divided differences of f g and of p^3, written symmetrically in a = l_i, b = l_j).
# Forward: one eigh + one product (the matrix iteration: 3 products per step); backward: four
# products (the matrix chain: 6 per step). Where this pays is measured, see
# EIGEN_MIN_GROUP_SIZE.

#: Smallest group size for which the eigen evaluation is used on CPU. Measured (2-core AMD EPYC
#: VM, one thread, forward + backward of the map, interleaved, against the 6-products-per-step
#: chain below): the chain is faster at d <= 32 (1.5-2x: LAPACK's per-matrix cost in eigh), equal at
#: d = 64, and 1.5-3x slower from d = 128 (36 products of d^3 against one eigh and 5 products).
EIGEN_MIN_GROUP_SIZE = 128
#: Newton steps above which the matrix iteration is kept for ``method="newton"``: the layer
#: refuses more than 8 (float32 round-off of the *matrix* iteration grows beyond); the eigen
#: evaluation would not show that divergence, and the layer's guard expects the iteration's
#: own behaviour there.
EIGEN_MAX_NEWTON_STEPS = 8


def _use_eigen(s: Tensor, iterations: int, method: IterNormMethod) -> bool:
    """Dispatch of :class:`IterNormMap`: eigen evaluation on CPU for groups of at least
    :data:`EIGEN_MIN_GROUP_SIZE` channels in eager mode; the matrix iteration elsewhere (on GPUs
    the batched products are cheap and ``eigh`` is not; under ``torch.compile`` the products
    compile and fuse)."""
    if compiling() or s.device.type != "cpu" or s.shape[-1] < EIGEN_MIN_GROUP_SIZE:
        return False
    return method == "coupled" or iterations <= EIGEN_MAX_NEWTON_STEPS


def _eigen_forward(s: Tensor, iterations: int) -> tuple[Tensor, tuple[Tensor, ...]] | None:
    """``p_T(s)`` through ``eigh``, and what :func:`_eigen_backward` needs; ``None`` when
    LAPACK fails (the caller falls back to the matrix iteration)."""
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    # Non-finite groups: decompose the identity and give them a NaN matrix (as the iteration
    # would), so the layer's non-finite guard sees the bad batch.
    finite = torch.isfinite(s).flatten(-2).all(-1).view(-1, 1, 1)
    try:
        lam, u = torch.linalg.eigh(torch.where(finite, s, eye))
    except torch.linalg.LinAlgError:
        return None
    ps = [torch.ones_like(lam)]
    for _ in range(iterations):
        p = ps[-1]
        ps.append(1.5 * p - 0.5 * p**3 * lam)
    w = (u * ps[-1].unsqueeze(-2)) @ u.transpose(-1, -2)
    w = torch.where(finite, w, torch.full_like(w, float("nan")))
    return w, (u, lam, torch.stack(ps[:-1]))


def _eigen_backward(u: Tensor, lam: Tensor, ps: Tensor, grad: Tensor) -> Tensor:
    """Exact gradient of ``p_T(s)`` w.r.t. ``s`` (any ``grad``, not only symmetric ones)."""
    a, b = lam.unsqueeze(-1), lam.unsqueeze(-2)
    half_sum = 0.5 * (a + b)
    dd = torch.full_like(half_sum, -0.5)  # p_1(l) = 1.5 - 0.5 l
    for p in ps[1:]:
        pa, pb = p.unsqueeze(-1), p.unsqueeze(-2)
        pa3, pb3 = pa**3, pb**3
        # 0.5 (pa^3 + pb^3) + half_sum * dd * (pa^2 + pa pb + pb^2)
        inner = torch.addcmul(0.5 * (pa3 + pb3), half_sum * dd, pa * pa + pa * pb + pb * pb)
        dd = torch.add(1.5 * dd, inner, alpha=-0.5)
    ut = u.transpose(-1, -2)
    return u @ (dd * (ut @ grad @ u)) @ ut


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
        eigen = None
        if _use_eigen(sigma_n, self.iterations, self.method):
            eigen = _eigen_forward(sigma_n, self.iterations)
        if eigen is not None:
            p, iterates = eigen
        else:
            p, iterates = _newton_forward(sigma_n, self.iterations, self.method)
        w = canonicalize(p * trace.rsqrt(), valid)
        # The backward tells the evaluations apart by what was saved: (U, l, p_k(l)) has a
        # (G, d) tensor second, the matrix iterates are all (G, d, d).
        return w, (sigma, trace, sigma_n, p, *iterates)

    def backward(self, saved, grad, valid=None):
        sigma, trace, sigma_n, p, *iterates = saved
        grad = _masked(grad, valid)
        r = trace.rsqrt()
        # W = P tr^-1/2
        d_trace = (grad * p).sum((-1, -2), keepdim=True) * (-0.5) * r / trace
        if len(iterates) == 3 and iterates[1].dim() == 2:
            d_sn = _eigen_backward(*iterates, grad * r)
        else:
            d_sn = _newton_backward(sigma_n, iterates, grad * r, self.iterations, self.method)
        d_sn = _masked(d_sn, valid)
        # Sigma_N = Sigma / tr
        d_sigma = d_sn / trace
        d_trace = d_trace - (d_sn * sigma).sum((-1, -2), keepdim=True) / trace**2
        # tr = sum of the real diagonal entries
        diag = valid.to(grad.dtype) if valid is not None else torch.ones_like(sigma[..., 0])
        d_sigma = d_sigma + torch.diag_embed(diag) * d_trace
        return _masked(d_sigma, valid)


class ZCAMap(MatrixMap):
    """DBN's ``W = U diag(lambda)^-1/2 U^T`` of ``cov + eps I`` (see :func:`zca_matrix`).

    ``blocks``, a ``(d, d)`` boolean block-diagonal mask, whitens within sub-groups only:
    ``W = (cov * blocks + eps I)^-1/2`` is then block-diagonal too (DBN's cap of the group it
    whitens when a batch has too few samples for the whole group).
    """

    def __init__(
        self, eps: float = 1e-5, valid: Tensor | None = None, blocks: Tensor | None = None
    ) -> None:
        self.eps, self.valid, self.blocks = eps, valid, blocks

    def tensors(self):
        return (self.valid, self.blocks)

    def forward(self, cov, valid=None, blocks=None):
        d = cov.shape[-1]
        eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
        if blocks is not None:
            cov = cov * blocks.to(cov.dtype)
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

    def backward(self, saved, grad, valid=None, blocks=None):
        evecs, s = saved
        grad = _masked(grad, valid)
        # Daleckii-Krein: dSigma = U (L o U^T dW U) U^T with the divided differences of
        # f(l) = l^-1/2, L_ij = (f(l_i) - f(l_j)) / (l_i - l_j) = -1 / (s_i s_j (s_i + s_j)),
        # which is f'(l_i) on the diagonal and has no 1/(l_i - l_j) term to blow up on ties.
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        lmat = -1.0 / (si * sj * (si + sj))
        inner = evecs.transpose(-1, -2) @ grad @ evecs
        inner = 0.5 * (inner + inner.transpose(-1, -2))
        d_sigma = _masked(evecs @ (lmat * inner) @ evecs.transpose(-1, -2), valid)
        return d_sigma if blocks is None else d_sigma * blocks.to(d_sigma.dtype)


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
        with full_precision(grad):
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
        iterates, checked against autograd in the tests). On CPU, for groups of at least
        :data:`EIGEN_MIN_GROUP_SIZE` channels, the same polynomial ``p_T`` is evaluated on the
        eigenvalues of ``Sigma_N`` and differentiated by its divided differences (equal in
        exact arithmetic, faster there; see ``docs/benchmarks.md``).
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
