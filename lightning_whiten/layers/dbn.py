"""DBN: group-wise ZCA whitening by eigendecomposition (Huang et al., CVPR 2018)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ..functional import MatrixMap, ZCAMap, canonicalize
from ..functional._backend import compiling
from ..registry import NormFamily, register_family
from . import base
from .base import RunningWhiteningNorm, lerp_
from .norm_act import NormActMixin

#: Relative size (to the trace) below which an eigenvalue of a batch covariance counts as zero.
_RANK_TOLERANCE = 1e-6

__all__ = ["DBN", "DBNAct"]


class DBN(RunningWhiteningNorm):
    r"""Decorrelated Batch Normalization: ZCA whitening per channel group.

    Per group of ``group_size`` channels, in training::

        X_c   = X - mean(X)
        Sigma = X_c X_c^T / m + eps I = U diag(lambda) U^T
        Y     = U diag(lambda)^-1/2 U^T X_c,   then  weight * Y + bias (per channel)

    The output covariance is the identity (up to ``eps``). The backward pass uses the divided
    differences of ``lambda^-1/2`` in closed form, so it stays finite and exact when eigenvalues
    repeat (autograd through ``eigh`` would divide by ``lambda_i - lambda_j``).

    Eval: the running covariance (unbiased, averaged with ``momentum`` as BatchNorm averages its
    variance) gives the eval map ``running_whitening = (running_cov + eps I)^-1/2``, brought up
    to date when it is next read (eval, :meth:`inference_map`, ``state_dict``), not after each
    training batch (a float64 ``eigh`` per step, measured 0.4-0.9 ms per layer at 512
    channels); eval applies ``running_whitening (x - running_mean)``. The matrix
    of the mean covariance, not the mean of each batch's matrix: when a covariance is
    rank-deficient (duplicated or constant channels, e.g. grayscale images copied to RGB), each
    batch's ZCA matrix boosts a different, random direction of its null space by up to
    ``1/sqrt(eps)``, and an average of those matrices amplifies real data in eval.

    Args:
        num_features: channels ``C``.
        group_size: channels per group (default 16, the paper's).
        eps, momentum, affine, track_running_stats, sync, check_finite, device, dtype: as in
            :class:`IterNorm` (keyword-only; ``eps=1e-5``, ``momentum=0.1``).

    Shape:
        Input ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``; output the same
        shape, dtype and memory format.

    Note:
        Small batches: a training batch with ``m`` samples per channel (``N*H*W`` for images,
        summed over synced processes) whitens sub-groups of at most
        ``m // min_samples_per_channel`` channels (4 per channel: :meth:`whitened_group_size`),
        warned once per layer; its running covariance gets those sub-groups' blocks only.
        With fewer samples the covariance is (nearly) rank-deficient and ZCA amplifies noise by
        up to ``1/sqrt(eps)``: two SGD steps at 16 samples for groups of 16 took MobileNetV2's
        parameters to 5e6 and RegNet's to NaN. The layer also warns once (on CPU) when a batch covariance is
        numerically rank-deficient (an eigenvalue below ``1e-6`` of its trace).

        ``torch.linalg.eigh`` synchronizes with the host on CUDA; prefer :class:`IterNorm` or
        :class:`SWBN` where that matters.
    """

    #: Samples per whitened channel a training batch must have: a batch of ``m`` samples per
    #: channel (``N*H*W``, summed over the processes it is synced across) whitens sub-groups
    #: of at most ``m // min_samples_per_channel`` channels (see :meth:`whitened_group_size`).
    #: Measured (``benchmarks/dbn_small_batch.py``, batch 4 at 64 px, groups of 16, two SGD
    #: steps at lr 0.01): whole groups (16 samples for 16 channels) took parameters to 5e6 or
    #: NaN; at 2 samples per channel to 20-114; at 4 to 6-29 (batch 16: 1.3-3.7, uncapped).
    min_samples_per_channel: float = 4.0
    _batch_map_reads_samples = True
    #: Version 2 keeps ``running_cov`` (version 1 averaged the batch matrices themselves).
    _version = 2

    def __init__(self, num_features: int, group_size: int | None = 16, **kwargs: Any) -> None:
        super().__init__(num_features, group_size=group_size, **kwargs)
        self._null_space_warned = False
        self._cap_warned = False
        self._step_blocks: Tensor | None = None  # the sub-group mask of the current batch

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "eps" and "_eval_map_stale" in self.__dict__:
            self._eval_map_stale = True  # the eval map is (running_cov + eps I)^-1/2

    def _matrix_map(self) -> MatrixMap:
        return ZCAMap(self.eps, self.group_mask)

    def whitened_group_size(self, samples: int) -> int:
        """Channels whitened together in a training batch of ``samples`` samples per channel.

        ``min(group_size, samples // min_samples_per_channel)``, at least 1. The centered
        covariance of ``m`` samples has rank at most ``m - 1``: ZCA of a group of ``d >= m``
        channels divides directions without data by ``sqrt(eps)`` (up to ``1/sqrt(eps)`` =
        316x gain at ``eps=1e-5``), and at ``m`` close to ``d`` its smallest eigenvalues are
        still tiny (Marchenko-Pastur: about ``(1 - sqrt(d/m))^2`` of the variance, 1/4 at the
        default ``m = 4 d``).
        """
        cap = int(samples // self.min_samples_per_channel)
        return max(1, min(self.group_size, cap))

    def _batch_map(self, samples: int) -> MatrixMap:
        # Too few samples for the whole group: whiten contiguous sub-groups of the capped size
        # (the block-diagonal part of the covariance) for this batch, and say so once.
        size = self.whitened_group_size(samples)
        self._step_blocks = None
        if size < self.group_size:
            index = torch.arange(self.group_size, device=self.nonfinite_batches.device) // size
            self._step_blocks = index.unsqueeze(0) == index.unsqueeze(1)
            if not self._cap_warned and not compiling():
                self._cap_warned = True
                needed = int(self.group_size * self.min_samples_per_channel)
                warnings.warn(
                    f"{self.describe()}: {samples} samples per channel in this training batch "
                    f"(batch x spatial positions, all processes) are too few to whiten groups of "
                    f"{self.group_size} channels stably (ZCA needs >= {needed}, "
                    f"{self.min_samples_per_channel:g} per channel): batches this small whiten "
                    f"sub-groups of {size} channels instead (said once per layer). For whole "
                    "groups use a larger batch or input, a smaller group_size, or IterNorm.",
                    UserWarning,
                    stacklevel=5,
                )
        return ZCAMap(self.eps, self.group_mask, self._step_blocks)

    def _register_state(self, factory: dict[str, Any]) -> None:
        super()._register_state(factory)
        if self.track_running_stats:
            self.register_buffer("running_cov", self._identity_matrices(**factory))
            # The running_cov that running_whitening was last computed from: a weight-averaging
            # callback that swaps or averages buffers changes running_cov behind our back.
            self.register_buffer(
                "_eval_map_source", self._identity_matrices(**factory), persistent=False
            )
        else:
            self.register_buffer("running_cov", None)
            self.register_buffer("_eval_map_source", None, persistent=False)

    def _reset_state(self) -> None:
        # As BatchNorm's reset (running_var = 1): eval is x / sqrt(1 + eps).
        if self.running_cov is not None:
            self.running_cov.copy_(self._identity_matrices())
            self._refresh_eval_map()

    #: Whether ``running_whitening`` lags ``running_cov`` (training updated the covariance or a
    #: schedule changed ``eps`` since the last refresh). Class default: up to date.
    _eval_map_stale: bool = False

    @torch.no_grad()
    def _refresh_eval_map(self) -> None:
        buffers = self._buffers  # (not self.running_whitening: its read refreshes, see below)
        cov = buffers["running_cov"].to(torch.float64)
        matrix, _ = ZCAMap(self.eps, self.group_mask).forward(cov, self.group_mask)
        buffers["running_whitening"].copy_(matrix)
        buffers["_eval_map_source"].copy_(buffers["running_cov"])
        self._eval_map_stale = False

    def _refresh_if_stale(self) -> None:
        buffers = self._buffers
        if buffers.get("running_whitening") is None:
            return
        stale = self._eval_map_stale
        if not stale and not compiling():
            # (a host read: on reads of the eval map only, never in a training step)
            stale = not torch.equal(buffers["running_cov"], buffers["_eval_map_source"])
        if stale:
            self._refresh_eval_map()

    def __getattr__(self, name: str) -> Any:
        # Buffers are read through nn.Module.__getattr__: whoever reads running_whitening
        # (eval, export, a user inspecting the layer) gets the matrix of the current covariance.
        if name == "running_whitening":
            self._refresh_if_stale()
        return super().__getattr__(name)

    def inference_map(self) -> tuple[Tensor, Tensor]:
        self._refresh_if_stale()
        return super().inference_map()

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        # A checkpoint always carries the eval map of the covariance it saves.
        self._refresh_if_stale()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A loaded running_whitening belongs to the loaded running_cov (a version-1 checkpoint's
        # too: eval stays as it was until the next training batch); without one, derive it.
        if self.running_cov is not None:
            self._eval_map_source.copy_(self.running_cov)
        self._eval_map_stale = prefix + "running_whitening" not in state_dict

    def _update_state(self, stats, matrix, factor, finite) -> Tensor | None:
        # A host read: on CPU only (an accelerator would stall), once, and not when the
        # warning about too few samples per group has already said why.
        if (
            not self._null_space_warned
            and not self._rank_deficiency_warned
            and self._step_blocks is None
            and base.warns_at_batch(matrix.device)
            and not compiling()
        ):
            self._warn_if_null_space(stats.cov, matrix)
        if self.track_running_stats:
            n = stats.count
            cov = stats.cov if self._step_blocks is None else stats.cov * self._step_blocks
            # (A capped batch adds only its sub-groups' covariance: eval whitens what training
            # whitened when batches stay this small.)
            unbiased = canonicalize(cov * (n / (n - 1).clamp_min(1)), self.group_mask)
            lerp_(self.running_cov, unbiased, factor, finite)
            self._eval_map_stale = True
        return None

    def _warn_if_null_space(self, cov: Tensor, matrix: Tensor) -> None:
        # ||W||_F^2 = sum 1 / (lambda_i + eps) >= 1 / (lambda_min + eps): above 1 / (tol tr + eps)
        # an eigenvalue is (nearly) below tol * trace. No eigendecomposition needed.
        trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
        gain = matrix.square().sum((-1, -2))
        if bool((gain * (_RANK_TOLERANCE * trace + self.eps) > 1).any()):
            self._null_space_warned = True
            warnings.warn(
                f"{self.describe()}: a training batch covariance is numerically rank-deficient "
                f"(an eigenvalue below {_RANK_TOLERANCE:g} of its trace: duplicated or constant "
                "channels, e.g. grayscale images copied to RGB). ZCA whitening amplifies those "
                f"directions by up to 1/sqrt(eps) = {(1 / self.eps) ** 0.5:.0f}x in training; eval "
                "uses the running covariance and is not affected. A smaller group_size or "
                "IterNorm (whose truncated iteration bounds the gain) avoids it.",
                UserWarning,
                stacklevel=5,
            )

    def _set_running_stats(self, mean: Tensor, var: Tensor, eps: float) -> None:
        # BatchNorm's eval map is diag(var + eps)^-1/2: the running covariance is its variance
        # shifted by the difference of the two eps, so eval is the same function.
        self.running_mean.copy_(mean)
        shifted = var.to(torch.float64) + (eps - self.eps)
        if bool((shifted < 0).any()):
            warnings.warn(
                f"{self.describe()}.from_batchnorm: eps={self.eps:g} exceeds running_var + eps "
                f"of the BatchNorm ({eps:g}) in {int((shifted < 0).sum())} channel(s); their eval "
                "output changes (use a smaller eps to keep the converted model the same function)",
                UserWarning,
                stacklevel=4,
            )
        self.running_cov.copy_(
            canonicalize(self._diag_matrices(shifted.clamp_min(0)), self.group_mask)
        )
        self._refresh_eval_map()

    def _migrate_state(self, state_dict: dict[str, Any], prefix: str, version: int) -> None:
        # Version 1 kept only the average of the batch whitening matrices W. Its covariance,
        # W^-2 - eps I (W is symmetric positive definite), starts the running covariance; the
        # stored W itself is kept, so eval is unchanged until the next training batch.
        key = prefix + "running_whitening"
        if version < 2 and key in state_dict and prefix + "running_cov" not in state_dict:
            w = state_dict[key].to(torch.float64)
            evals, evecs = torch.linalg.eigh(w)
            cov_evals = (evals.clamp_min(torch.finfo(w.dtype).tiny) ** -2 - self.eps).clamp_min(0)
            cov = (evecs * cov_evals.unsqueeze(-2)) @ evecs.transpose(-1, -2)
            mask = None if self.group_mask is None else self.group_mask.to(cov.device)
            state_dict[prefix + "running_cov"] = canonicalize(cov, mask).to(state_dict[key].dtype)


class DBNAct(NormActMixin, DBN):
    """:class:`DBN` followed by ``drop`` and ``act`` (replaces timm's ``BatchNormAct2d``)."""


register_family(NormFamily("dbn", DBN, act_layer=DBNAct, description=__doc__))
