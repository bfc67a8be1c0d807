"""Float64 reference implementations written directly from the papers' formulas.

Deliberately naive (python loops over groups, ``matrix_power``, plain ``eigh``) and sharing no
code with the package, so tests compare the package against an independent expectation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_sizes(num_features: int, group_size: int) -> list[int]:
    d = min(group_size, num_features)
    sizes = [d] * (num_features // d)
    if num_features % d:
        sizes.append(num_features % d)
    return sizes


def as_matrix(x: Tensor) -> Tensor:
    """(N, C, *) -> (C, m)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def from_matrix(y: Tensor, like: Tensor) -> Tensor:
    """(C, m) -> shape of ``like``."""
    return y.reshape(like.shape[1], like.shape[0], *like.shape[2:]).transpose(0, 1)


def newton_inverse_sqrt(cov: Tensor, iterations: int, eps: float) -> Tensor:
    """IterNorm's whitening matrix for one group, exactly as in the paper."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    sigma = cov + eps * eye
    trace = torch.trace(sigma)
    sigma_n = sigma / trace
    p = eye
    for _ in range(iterations):
        p = 1.5 * p - 0.5 * torch.linalg.matrix_power(p, 3) @ sigma_n
    return p / trace.sqrt()


def zca_inverse_sqrt(cov: Tensor, eps: float) -> Tensor:
    evals, evecs = torch.linalg.eigh(cov + eps * torch.eye(cov.shape[0], dtype=cov.dtype))
    return evecs @ torch.diag(evals.rsqrt()) @ evecs.T


def whiten(x: Tensor, group_size: int, matrix_fn, weight=None, bias=None) -> Tensor:
    """Training-mode whitening of ``x`` with ``matrix_fn(cov) -> W`` per group."""
    xm = as_matrix(x)
    m = xm.shape[1]
    outs, start = [], 0
    for size in group_sizes(x.shape[1], group_size):
        xg = xm[start : start + size]
        start += size
        xc = xg - xg.mean(1, keepdim=True)
        cov = xc @ xc.T / m
        outs.append(matrix_fn(cov) @ xc)
    y = from_matrix(torch.cat(outs), x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def batch_covariances(x: Tensor, group_size: int) -> list[Tensor]:
    xm = as_matrix(x)
    covs, start = [], 0
    for size in group_sizes(x.shape[1], group_size):
        xg = xm[start : start + size]
        start += size
        xc = xg - xg.mean(1, keepdim=True)
        covs.append(xc @ xc.T / xm.shape[1])
    return covs


def swbn_step(w: Tensor, cov_std: Tensor, rate: float, criterion: str) -> Tensor:
    eye = torch.eye(w.shape[0], dtype=w.dtype)
    m = w @ cov_std @ w.T - eye
    if criterion == "kl":
        delta = m @ w
    else:
        delta = m @ w @ cov_std / torch.linalg.norm(eye - w @ cov_std @ w.T)
    new = w - rate * delta
    return (new + new.T) / 2


def correlated(shape, dtype=torch.float64, strength: float = 0.7, generator=None) -> Tensor:
    """Random activations with strongly correlated channels and non-zero means."""
    x = torch.randn(shape, dtype=dtype, generator=generator)
    c = shape[1]
    mix = (
        torch.eye(c, dtype=dtype)
        + strength * torch.randn(c, c, dtype=dtype, generator=generator) / c**0.5
    )
    y = torch.einsum("ij,nj...->ni...", mix, x)
    means = torch.randn(c, dtype=dtype, generator=generator).view((1, c) + (1,) * (len(shape) - 2))
    return y + means


def sam_perturbation(
    weights: dict[str, Tensor],
    grads: dict[str, Tensor],
    rho: float,
    adaptive: bool,
    eta: float,
    p: int | str,
    layerwise: bool,
    normalize_bias: bool,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """SAM / ASAM's ascent ``eps`` for the perturbed set S (the keys of ``grads``), from the
    SAM-ON paper's equations (Mueller et al., NeurIPS 2023, sec. 3) with the official code's
    two conventions: layerwise ``T = ||w|| (1 + eta)`` and ``+ 1e-16`` added to the norm.
    Returns ``(eps, T)`` per name (``T = 1`` for SAM and for biases without normalize_bias)."""
    operators = {}
    for name, w in weights.items():
        one = torch.ones_like(w)
        if adaptive and (name.rsplit(".", 1)[-1] == "weight" or normalize_bias):
            operators[name] = torch.linalg.norm(w) * (1 + eta) * one if layerwise else w.abs() + eta
        else:
            operators[name] = one
    eps = {}
    if p == 2:
        denominator = sum(float(((operators[n] * g) ** 2).sum()) for n, g in grads.items()) ** 0.5
        for name, g in grads.items():
            eps[name] = rho * operators[name] ** 2 * g / (denominator + 1e-16)
    else:
        for name, g in grads.items():
            eps[name] = rho * operators[name] * torch.sign(g)
    return eps, operators
