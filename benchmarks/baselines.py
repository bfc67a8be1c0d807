"""Plain-autograd implementations of the same math, kept as the speed baseline.

The straightforward way to write each layer: transpose to ``(G, d, m)`` (a copy), unrolled
iterations, autograd for the backward (which keeps every intermediate). Written like the
official IterNorm code, adapted to current PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn


class _Plain(nn.Module):
    def __init__(
        self, num_features: int, group_size: int, eps: float = 1e-5, momentum: float = 0.1
    ):
        super().__init__()
        self.g = num_features // group_size
        self.d = group_size
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(self.g, group_size, 1))
        self.register_buffer("running_wm", torch.eye(group_size).repeat(self.g, 1, 1))

    def matrix(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x):
        n, c = x.shape[:2]
        xt = x.transpose(0, 1).contiguous().view(self.g, self.d, -1)
        m = xt.shape[-1]
        mean = xt.mean(-1, keepdim=True)
        xc = xt - mean
        eye = torch.eye(self.d, dtype=x.dtype, device=x.device).expand(self.g, -1, -1)
        sigma = torch.baddbmm(eye, xc, xc.transpose(1, 2), beta=self.eps, alpha=1.0 / m)
        wm = self.matrix(sigma)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_wm.lerp_(wm, self.momentum)
        y = wm.matmul(xc).view(c, n, *x.shape[2:]).transpose(0, 1)
        shape = (1, c) + (1,) * (x.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)


class PlainIterNorm(_Plain):
    def __init__(self, num_features: int, group_size: int = 64, iterations: int = 5):
        super().__init__(num_features, group_size)
        self.iterations = iterations

    def matrix(self, sigma):
        trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True).unsqueeze(-1)
        sigma_n = sigma / trace
        p = torch.eye(self.d, dtype=sigma.dtype, device=sigma.device).expand_as(sigma)
        for _ in range(self.iterations):
            p = 1.5 * p - 0.5 * torch.matrix_power(p, 3).matmul(sigma_n)
        return p / trace.sqrt()


class PlainDBN(_Plain):
    def matrix(self, sigma):
        evals, evecs = torch.linalg.eigh(sigma)
        return evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.transpose(-1, -2)


class PlainSWBN(_Plain):
    """BN standardization + fixed W (updated without gradient), in plain autograd."""

    def __init__(self, num_features: int, group_size: int = 64, rate: float = 1e-5):
        super().__init__(num_features, group_size)
        self.rate = rate
        self.register_buffer("w", torch.eye(group_size).repeat(self.g, 1, 1))

    def forward(self, x):
        n, c = x.shape[:2]
        xt = x.transpose(0, 1).contiguous().view(self.g, self.d, -1)
        mean = xt.mean(-1, keepdim=True)
        var = xt.var(-1, unbiased=False, keepdim=True)
        xs = (xt - mean) / (var + self.eps).sqrt()
        with torch.no_grad():
            sigma = xs @ xs.transpose(1, 2) / xs.shape[-1]
            eye = torch.eye(self.d, dtype=x.dtype, device=x.device)
            delta = (self.w @ sigma @ self.w.transpose(1, 2) - eye) @ self.w
            w_used = self.w.clone()
            self.w.sub_(self.rate * delta)
        y = w_used.matmul(xs).view(c, n, *x.shape[2:]).transpose(0, 1)
        shape = (1, c) + (1,) * (x.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)
