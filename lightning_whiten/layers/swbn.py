"""SWBN: stochastic (online) whitening batch normalization (Zhang et al., CVPR 2021)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from ..distributed import SyncMode
from .base import WhiteningNorm, _lerp_

__all__ = ["SWBN"]


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
        whitening_rate: step size alpha of the online update (default 1e-5, the paper's).
        criterion: ``"kl"`` (default) or ``"fro"``.
        eps: added to the variance (default 1e-8, the paper's).
        momentum: running mean/var factor (default 0.05 per step, the paper's), or ``None``.
        affine, track_running_stats, sync, check_finite: as in :class:`IterNorm`.
    """

    default_group_size = 64
    schedulable = ("eps", "momentum", "whitening_rate")
    _exact_without_running_stats = True

    def __init__(
        self,
        num_features: int,
        group_size: int = 64,
        whitening_rate: float = 1e-5,
        criterion: F.SWBNCriterion = "kl",
        eps: float = 1e-8,
        momentum: float | None = 0.05,
        affine: bool = True,
        track_running_stats: bool = True,
        sync: SyncMode = "batch",
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features,
            group_size,
            eps,
            momentum,
            affine,
            track_running_stats,
            sync,
            check_finite,
            device,
            dtype,
        )
        if criterion not in ("kl", "fro"):
            raise ValueError(f"SWBN: criterion must be 'kl' or 'fro', got {criterion!r}")
        self.whitening_rate = whitening_rate
        self.criterion = criterion
        factory: dict[str, Any] = {"device": device, "dtype": _matrix_dtype(dtype)}
        self.register_buffer("whitening", self._identity_matrices(**factory))
        if track_running_stats:
            self.register_buffer("running_var", torch.ones(num_features, **factory))
        else:
            self.register_buffer("running_var", None)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "whitening_rate" and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0
        ):
            raise ValueError(f"SWBN: whitening_rate must be a number >= 0, got {value!r}")
        super().__setattr__(name, value)

    def _matrix_map(self) -> F.MatrixMap:
        # The W applied here is saved for the backward; _update_state gives the buffer a new
        # tensor instead of writing into this one, so the backward always sees this W.
        return F.StandardizeMap(self.eps, self.whitening, self.group_mask)

    def _inference_map(self) -> tuple[Tensor, Tensor]:
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
        cov_std = F.canonicalize(
            cov * inv_std.unsqueeze(-1) * inv_std.unsqueeze(-2), self.group_mask
        )
        new_w = F.swbn_update(
            self.whitening.to(cov.dtype),
            cov_std,
            self.whitening_rate,
            self.criterion,
            self.group_mask,
        )
        # Rebind the buffer to a new tensor rather than copy_ into it: the backward of this
        # step needs the W that was applied, and under torch.compile an in-place update of a
        # tensor the backward depends on is read back after the update (the compiled backward
        # recomputes cheap values from the mutated buffer; eager would only raise a version
        # error). The buffer stays registered, so state_dict, .to() and checkpoints see it.
        self.whitening = torch.where(finite, new_w.to(self.whitening.dtype), self.whitening)
        if self.track_running_stats:
            n = moments.count
            unbiased = var.reshape(-1)[: self.num_features] * (n / (n - 1).clamp_min(1))
            _lerp_(self.running_var, unbiased, factor, finite)

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


def _matrix_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    return dtype if dtype in (None, torch.float32, torch.float64) else torch.float32
