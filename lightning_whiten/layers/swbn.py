"""SWBN: stochastic (online) whitening batch normalization (Zhang et al., CVPR 2021)."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import Tensor

from ..functional import MatrixMap, StandardizeMap, SWBNCriterion, canonicalize, swbn_update
from ..functional._backend import snapshot
from ..registry import NormFamily, register_family
from .base import WhiteningNorm, lerp_
from .norm_act import NormActMixin

__all__ = ["AUTO_RATE", "SWBN", "SWBNAct"]

#: ``whitening_rate="auto"``: this fraction of the stable bound ``1 / group_size``, per
#: criterion (measured: ``benchmarks/swbn_rate.py``, see the SWBN docs).
AUTO_RATE = {"kl": 0.05, "fro": 0.15}


class SWBN(WhiteningNorm):
    r"""Stochastic Whitening Batch Normalization: BN standardization followed by a whitening
    matrix ``W`` that is estimated online instead of recomputed every step.

    Per group of ``group_size`` channels, in training::

        X_s = (X - mean(X)) / sqrt(var(X) + eps)        (BN standardization, differentiable)
        Y   = W X_s,   then  weight * Y + bias            (W is a constant for the backward)
        S   = X_s X_s^T / m                                (no gradient)
        M   = W S W^T - I
        Delta = M W              (criterion="kl")   or   M W S / ||M||_F   (criterion="fro")
        W  <- W - whitening_rate * Delta;   W <- (W + W^T) / 2

    ``W`` is a buffer updated only in the training forward, after it has been applied, so a
    layer starts exactly as BatchNorm (``W = I``) in training and in eval. Running mean and
    (unbiased) variance are kept as in BatchNorm; eval computes
    ``weight * W (x - running_mean) / sqrt(running_var + eps) + bias``.

    ``whitening_rate`` (the paper's alpha) and ``momentum`` are plain attributes that may be
    changed between steps (the paper decays alpha with the learning rate; see
    :class:`lightning_whiten.schedules` and ``WhiteningCallback(tie_whitening_rate_to_lr=...)``).

    Args:
        num_features: channels ``C``.
        group_size: channels per group (default 64, as IterNorm's, so the two compare at equal
            group size; the paper does not prescribe one).
        whitening_rate: step size alpha of the online update. Default ``"auto"``:
            ``AUTO_RATE[criterion] / group_size`` (0.05 / d for KL, 0.15 / d for Frobenius), at
            which W whitens within a few hundred steps. W moves by about ``alpha x steps``, so
            the paper's 1e-5 (pass ``whitening_rate=1e-5``, or tie it to the learning rate as
            the paper does) leaves SWBN equal to BatchNorm in runs shorter than tens of
            thousands of steps. Keep ``whitening_rate * group_size < 1`` (warned otherwise):
            beyond, the update of W grows for strongly correlated channels; a diverging update
            is rejected (``diverged_batches``). With KL, a direction in which the batches never
            vary grows by ``(1 + alpha)`` per step: over very long runs at a constant rate, tie
            the rate to the learning rate or schedule it down.
        criterion: ``"kl"`` (default) or ``"fro"``.
        eps: added to the variance (default 1e-8, the paper's).
        momentum: running mean/var factor (default 0.05 per step, the paper's), or ``None``.
        affine, track_running_stats, sync, check_finite, device, dtype: as in :class:`IterNorm`.

    ``eps`` and the options after it are keyword-only.
    """

    schedulable = ("eps", "momentum", "whitening_rate")
    exact_without_running_stats = True

    def __init__(
        self,
        num_features: int,
        group_size: int | None = 64,
        whitening_rate: float | Literal["auto"] = "auto",
        criterion: SWBNCriterion = "kl",
        *,
        eps: float = 1e-8,
        momentum: float | None = 0.05,
        **kwargs: Any,
    ) -> None:
        if criterion not in ("kl", "fro"):
            raise ValueError(f"SWBN: criterion must be 'kl' or 'fro', got {criterion!r}")
        super().__init__(num_features, group_size=group_size, eps=eps, momentum=momentum, **kwargs)
        self.criterion = criterion
        self.whitening_rate = whitening_rate  # after the criterion: "auto" depends on it

    def _register_state(self, factory: dict[str, Any]) -> None:
        self.register_buffer("whitening", self._identity_matrices(**factory))
        if self.track_running_stats:
            self.register_buffer("running_var", torch.empty(self.num_features, **factory))
        else:
            self.register_buffer("running_var", None)

    def _reset_state(self) -> None:
        self.whitening.copy_(self._identity_matrices())
        if self.running_var is not None:
            self.running_var.fill_(1.0)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "whitening_rate":
            if isinstance(value, str) and value == "auto":
                value = self.auto_whitening_rate()
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(
                    f"SWBN: whitening_rate must be a number >= 0 or 'auto', got {value!r}"
                )
            size = self.__dict__.get("group_size")
            if size and value * size >= 1 and not self.__dict__.get("_rate_warned", False):
                super().__setattr__("_rate_warned", True)
                warnings.warn(
                    f"SWBN: whitening_rate={value:g} with groups of {size} channels is at or above "
                    f"the stable range (whitening_rate * group_size < 1): for strongly "
                    "correlated channels the online update of W grows instead of converging; "
                    "diverging updates are rejected (counted in diverged_batches). The paper "
                    "uses 1e-5.",
                    UserWarning,
                    stacklevel=2,
                )
        super().__setattr__(name, value)

    def auto_whitening_rate(self) -> float:
        """The rate ``whitening_rate="auto"`` stands for: ``AUTO_RATE[criterion] / group_size``
        (0.05 / d for KL, 0.15 / d for Frobenius; d = 16: 3.1e-3 and 9.4e-3)."""
        return AUTO_RATE[self.__dict__.get("criterion", "kl")] / self.__dict__["group_size"]

    def _matrix_map(self) -> MatrixMap:
        # The backward needs the W applied here, and _update_state then writes the buffer in
        # place (so it keeps its identity for DDP's broadcast, EMA and SWA): the node gets a
        # snapshot, which a compiled backward cannot recompute from the updated buffer.
        return StandardizeMap(self.eps, snapshot(self.whitening), self.group_mask)

    def inference_map(self) -> tuple[Tensor, Tensor]:
        inv_std = self._grouped((self.running_var + self.eps).rsqrt())
        return self.whitening * inv_std.unsqueeze(-2), self.running_mean

    @classmethod
    def _options_from_batchnorm(cls, bn) -> dict[str, Any]:
        # BN's eps is part of its eval map: keep it so the converted layer is the same function.
        options = super()._options_from_batchnorm(bn)
        options["eps"] = float(getattr(bn, "eps", 1e-5))
        return options

    def _update_state(self, moments, matrix, factor, finite) -> None:
        cov = moments.cov
        var = cov.diagonal(dim1=-2, dim2=-1)
        inv_std = (var + self.eps).rsqrt()
        # Padding back to exactly I: (1 + eps)^-1 there would enter the "fro" step size.
        cov_std = canonicalize(cov * inv_std.unsqueeze(-1) * inv_std.unsqueeze(-2), self.group_mask)
        old_w = self.whitening.to(cov.dtype)
        new_w = swbn_update(old_w, cov_std, self.whitening_rate, self.criterion, self.group_mask)
        # An update that diverges (too large a rate) makes W S W^T grow geometrically while it
        # stays finite: keep W when the update more than doubles it beyond the identity's norm.
        d = new_w.shape[-1]
        before = _gram_norm(old_w, cov_std).clamp_min(d**0.5)
        rejected = (_gram_norm(new_w, cov_std) > 2 * before).any() & finite
        accept = finite & ~rejected
        self.whitening.copy_(torch.where(accept, new_w.to(self.whitening.dtype), self.whitening))
        if self.track_running_stats:
            n = moments.count
            unbiased = var.reshape(-1)[: self.num_features] * (n / (n - 1).clamp_min(1))
            lerp_(self.running_var, unbiased, factor, finite)
        return rejected

    def _divergence_hint(self) -> str:
        return (
            f"the online update of W diverged (whitening_rate={self.whitening_rate:g}; keep it "
            f"below 1 / group_size = {1 / self.group_size:g}) and was rejected"
        )

    def _set_running_stats(self, mean: Tensor, var: Tensor, eps: float) -> None:
        self.running_mean.copy_(mean)
        # The eval map divides by sqrt(running_var + self.eps); BN's by sqrt(var + eps). Shift
        # the variance by the difference so a layer built with another eps is the same function.
        shifted = var.to(torch.float64) + (eps - self.eps)
        if bool((shifted < 0).any()):
            count = int((shifted < 0).sum())
            warnings.warn(
                f"{self.describe()}.from_batchnorm: eps={self.eps:g} exceeds running_var + "
                f"eps of the BatchNorm ({eps:g}) in {count} channel(s); their eval output "
                "changes (use a smaller eps to keep the converted model the same function)",
                UserWarning,
                stacklevel=4,
            )
        self.running_var.copy_(shifted.clamp_min(0))
        self.whitening.copy_(
            self._identity_matrices(dtype=self.whitening.dtype, device=self.whitening.device)
        )

    def _extra_repr_options(self) -> list[str]:
        return [f"whitening_rate={self.whitening_rate}", f"criterion={self.criterion!r}"]


class SWBNAct(NormActMixin, SWBN):
    """:class:`SWBN` followed by ``drop`` and ``act`` (replaces timm's ``BatchNormAct2d``)."""


register_family(NormFamily("swbn", SWBN, act_layer=SWBNAct, description=__doc__))


def _gram_norm(w: Tensor, s: Tensor) -> Tensor:
    """``||W S W^T||_F`` per group: the output covariance W gives a standardized batch."""
    return torch.linalg.matrix_norm(w @ s @ w.transpose(-1, -2))
