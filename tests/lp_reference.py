"""Float64 references for Lp and streaming normalization, written from the paper's equations
(Liao, Kawaguchi & Poggio 2016) with plain autograd for every local derivative.

Deliberately naive and sharing no code with the package: lists of per-call statistics instead of
running averages, autograd instead of hand-written gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def channel_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def per_channel(v: Tensor, like: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (like.dim() - 2)))


def lp_norm(x: Tensor, p: float, eps: float, weight: Tensor, bias: Tensor) -> Tensor:
    """``y = w (x - m) / (mean |x - m|^p + eps)^(1/p) + b``, batch statistics per channel."""
    dims = channel_dims(x)
    m = x.mean(dims, keepdim=True)
    d = (x - m).abs().pow(p).mean(dims, keepdim=True)
    return (x - m) / (d + eps).pow(1.0 / p) * per_channel(weight, x) + per_channel(bias, x)


class StreamingReference:
    """Streaming normalization: short-term statistics (lists of the window's per-call
    statistics), long-term running averages updated when a window closes, the mix
    ``alpha L + (1 - alpha) S`` for normalization and streamed gradients
    ``beta_long G_L + beta_short G_S + beta_current g`` for the statistics."""

    def __init__(self, channels, p, eps, alpha, betas, momentum, grad_momentum, weight, bias):
        self.p, self.eps, self.alpha, self.betas = p, eps, alpha, betas
        self.momentum, self.grad_momentum = momentum, grad_momentum
        self.weight, self.bias = weight.clone(), bias.clone()
        f64 = {"dtype": torch.float64}
        self.long_mean, self.long_moment = torch.zeros(channels, **f64), torch.ones(channels, **f64)
        self.windows = 0
        self.grad_long_mean = torch.zeros(channels, **f64)
        self.grad_long_moment = torch.zeros(channels, **f64)
        self.grad_windows = 0
        self.means, self.moments, self.grad_means, self.grad_moments = [], [], [], []

    @staticmethod
    def _avg(values):
        return torch.stack(values).mean(0)

    def forward(self, x: Tensor):
        dims = channel_dims(x)
        m = x.mean(dims)
        self.means.append(m)
        c = self.alpha * self.long_mean + (1 - self.alpha) * self._avg(self.means)
        d = (x - per_channel(c, x)).abs().pow(self.p).mean(dims)
        self.moments.append(d)
        big_m = self.alpha * self.long_moment + (1 - self.alpha) * self._avg(self.moments)
        return self._normalize(x, c, big_m, self.weight, self.bias), (x, c, big_m)

    def _normalize(self, x, c, big_m, weight, bias):
        scale = (big_m + self.eps).pow(-1.0 / self.p)
        return (x - per_channel(c, x)) * per_channel(scale * weight, x) + per_channel(bias, x)

    def _streamed(self, long, shorts, windows, g):
        b_long, b_short, b_current = self.betas
        short = self._avg(shorts)
        long = long if windows > 0 else short
        return b_long * long + b_short * short + b_current * g

    def backward(self, saved, grad_y: Tensor):
        """Input, weight and bias gradients of one call (calls are back-propagated in reverse)."""
        x, c, big_m = (t.detach().clone().requires_grad_() for t in saved)
        w = self.weight.clone().requires_grad_()
        b = self.bias.clone().requires_grad_()
        y = self._normalize(x, c, big_m, w, b)
        gx, gc, g_moment, gw, gb = torch.autograd.grad(y, (x, c, big_m, w, b), grad_y)
        self.grad_moments.append(g_moment)
        g_d = self._streamed(self.grad_long_moment, self.grad_moments, self.grad_windows, g_moment)
        x2, c2 = x.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
        d = (x2 - per_channel(c2, x2)).abs().pow(self.p).mean(channel_dims(x2))
        gx_d, gc_d = torch.autograd.grad(d, (x2, c2), g_d)
        g_center = gc + gc_d
        self.grad_means.append(g_center)
        g_m = self._streamed(self.grad_long_mean, self.grad_means, self.grad_windows, g_center)
        x3 = x.detach().clone().requires_grad_()
        (gx_m,) = torch.autograd.grad(x3.mean(channel_dims(x3)), x3, g_m)
        return gx + gx_d + gx_m, gw, gb

    def close_window(self):
        if self.means:
            self.windows += 1
            f = 1.0 / self.windows if self.momentum is None else self.momentum
            self.long_mean = (1 - f) * self.long_mean + f * self._avg(self.means)
            self.long_moment = (1 - f) * self.long_moment + f * self._avg(self.moments)
        if self.grad_means:
            f = self.grad_momentum if self.grad_windows > 0 else 1.0
            self.grad_long_mean = (1 - f) * self.grad_long_mean + f * self._avg(self.grad_means)
            self.grad_long_moment = (1 - f) * self.grad_long_moment + f * self._avg(
                self.grad_moments
            )
            self.grad_windows += 1
        self.means, self.moments, self.grad_means, self.grad_moments = [], [], [], []
