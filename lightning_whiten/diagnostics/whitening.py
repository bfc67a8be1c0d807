"""Diagnostics of normalization layers (plain PyTorch): SND and whiteness.

Both work for the whitening layers and for ``nn.BatchNorm*`` (so users can compare), use the
layer's *training-mode* transformation without the affine part, and touch no state: running
buffers, SWBN's whitening matrix, gradients and the global random number generator are left
exactly as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..functional import (
    batch_covariance,
    group_layout,
    grouped_affine,
    iternorm_matrix,
    newton_residual,
    valid_mask,
    whitening_error,
)
from ..layers import IterNorm, WhiteningNorm

__all__ = [
    "Whiteness",
    "batch_transform",
    "diverged_batches",
    "nonfinite_batches",
    "snd",
    "whiteness",
]


_PER_SAMPLE = (nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def batch_transform(layer: nn.Module, x: Tensor, training: bool = True) -> Tensor:
    """``F(x; x)``: the layer's normalization of the batch ``x``, affine excluded, without
    updating any state.

    With ``training=True`` (the definition of SND) the batch statistics are used; with
    ``training=False`` the eval-time map from the running buffers, which ignores the batch.
    GroupNorm and LayerNorm (per-sample statistics) are accepted for comparison.
    """
    if isinstance(layer, WhiteningNorm):
        if training or not layer.track_running_stats:  # no running buffers: eval uses the batch
            return layer.whiten_batch(x)
        matrix, offset = layer.inference_map()
        return grouped_affine(x.to(matrix.dtype), matrix, offset).to(x.dtype)
    if isinstance(layer, _BatchNorm):
        if training or layer.running_mean is None:
            return nn.functional.batch_norm(x, None, None, None, None, training=True, eps=layer.eps)
        return nn.functional.batch_norm(
            x, layer.running_mean, layer.running_var, None, None, training=False, eps=layer.eps
        )
    if isinstance(layer, nn.GroupNorm):
        return nn.functional.group_norm(x, layer.num_groups, eps=layer.eps)
    if isinstance(layer, nn.LayerNorm):
        return nn.functional.layer_norm(x, layer.normalized_shape, eps=layer.eps)
    raise TypeError(
        "diagnostics support whitening layers, BatchNorm, GroupNorm and LayerNorm, got "
        f"{type(layer).__name__}"
    )


@torch.no_grad()
def snd(
    layer: nn.Module,
    inputs: Tensor,
    batch_size: int,
    num_batches: int = 16,
    probes: int | Tensor = 16,
    seed: int = 0,
    training: bool = True,
    relative: bool = False,
) -> Tensor:
    """Stochastic Normalization Disturbance (Huang et al., CVPR 2019), estimated.

    For a probe sample ``x`` and ``s = num_batches`` random mini-batches ``B_i`` of
    ``batch_size`` samples drawn from ``inputs`` that each contain ``x``::

        SND(x) = (1/s) sum_i || F(x; B_i) - (1/s) sum_j F(x; B_j) ||_2

    where ``F(x; B)`` is the layer's training-mode output for ``x`` when normalized with the
    statistics of ``B`` (affine excluded). It measures how much a sample's normalized output
    depends on the rest of its mini-batch (0 for a layer that ignores the batch).

    Args:
        layer: a whitening layer or an ``nn.BatchNorm*d``.
        inputs: ``(M, C, *spatial)`` samples to draw mini-batches from (e.g. cached inputs of
            the layer during training); ``M >= batch_size``.
        batch_size: mini-batch size ``m`` (the probe plus ``m - 1`` other samples).
        num_batches: ``s``, mini-batches per probe.
        probes: number of probe samples (drawn from ``inputs``), or their indices.
        seed: seeds a private generator: the result is reproducible and the global RNG untouched.
        training: use batch statistics (the definition); ``False`` uses the eval-time map, whose
            SND is 0.
        relative: divide each probe's SND by the norm of its mean output ``||E_B F(x; B)||``.
            SND is a norm of the output, so a layer that shrinks its output (IterNorm with few
            iterations whitens only partly) also shows a smaller SND; the relative SND is
            scale-free and compares the disturbance alone.

    Returns:
        The mean SND over the probes (a 0-dim float64 tensor).
    """
    total = inputs.shape[0]
    if not 2 <= batch_size <= total:
        raise ValueError(
            f"snd: batch_size must be in [2, {total}] (the number of inputs), got {batch_size}"
        )
    if num_batches < 2:
        raise ValueError(f"snd: num_batches must be >= 2, got {num_batches}")
    gen = torch.Generator().manual_seed(seed)
    if isinstance(probes, Tensor):
        probe_index = probes.to(torch.long).cpu()
    else:
        probe_index = torch.randperm(total, generator=gen)[: min(int(probes), total)]
    values = []
    for p in probe_index.tolist():
        others = torch.cat([torch.arange(p), torch.arange(p + 1, total)])
        outputs = []
        for _ in range(num_batches):
            pick = others[torch.randperm(total - 1, generator=gen)[: batch_size - 1]]
            index = torch.cat([torch.tensor([p]), pick]).to(inputs.device)
            outputs.append(batch_transform(layer, inputs[index], training)[0].double())
        stack = torch.stack(outputs)
        mean = stack.mean(0)
        value = (stack - mean).flatten(1).norm(dim=1).mean()
        if relative:
            value = value / mean.norm().clamp_min(torch.finfo(mean.dtype).tiny)
        values.append(value)
    return torch.stack(values).mean()


@dataclass
class Whiteness:
    """How white a layer's output is, per channel group.

    Attributes:
        error: ``||Cov(Y) - I||_F / d`` per group of the normalized output ``Y`` (affine
            excluded), ``(G,)``; 0 is perfectly white.
        condition: condition number of the input covariance per group, ``(G,)``.
        newton_residual: IterNorm only: ``||W (Sigma + eps I) W^T - I||_F / d`` per group, how far
            ``T`` Newton iterations are from the exact inverse square root.
    """

    error: Tensor
    condition: Tensor
    newton_residual: Tensor | None = None

    def summary(self) -> dict[str, float]:
        out = {
            "whiteness": float(self.error.mean()),
            "condition_number": float(self.condition.mean()),
        }
        if self.newton_residual is not None:
            out["newton_residual"] = float(self.newton_residual.mean())
        return out


@torch.no_grad()
def whiteness(layer: nn.Module, inputs: Tensor, group_size: int | None = None) -> Whiteness:
    """Whiteness of ``layer``'s training-mode output on ``inputs`` (one batch), per group.

    Args:
        layer: a whitening layer or an ``nn.BatchNorm*d``.
        inputs: ``(M, C, *spatial)``.
        group_size: channel groups to measure in (default: the layer's; all channels for BN).
    """
    channels = inputs.shape[1]
    if group_size is None:
        group_size = layer.group_size if isinstance(layer, WhiteningNorm) else channels
    x = inputs.to(torch.float64)
    output = batch_transform(layer, inputs).to(torch.float64)
    layout = group_layout(channels, group_size)
    valid = valid_mask(layout, inputs.device)
    cov_out = batch_covariance(output, group_size).cov
    cov_in = batch_covariance(x, group_size).cov
    evals = torch.linalg.eigvalsh(cov_in)
    condition = evals[..., -1] / evals[..., 0].clamp_min(torch.finfo(evals.dtype).tiny)
    if valid is not None:  # the padded last group: its identity block is not part of the data
        r = layout.last_group_size
        last = torch.linalg.eigvalsh(cov_in[-1, :r, :r])
        condition[-1] = last[-1] / last[0].clamp_min(torch.finfo(last.dtype).tiny)
    residual = None
    if isinstance(layer, IterNorm):
        matrix = iternorm_matrix(cov_in, layer.iterations, layer.eps, layer.method, valid)
        residual = newton_residual(cov_in, matrix, layer.eps, valid)
    return Whiteness(whitening_error(cov_out, valid), condition, residual)


def nonfinite_batches(model: nn.Module) -> dict[str, int]:
    """Training batches each whitening layer of ``model`` skipped for non-finite statistics.

    The counts live on the layers' devices; this reads them all with one host synchronization.
    Keys are qualified module names.
    """
    return _counts(model, "nonfinite_batches")


def diverged_batches(model: nn.Module) -> dict[str, int]:
    """Training batches each whitening layer of ``model`` kept out of its running statistics
    because its whitening matrix diverged (see ``diverged_batches`` on the layers)."""
    return _counts(model, "diverged_batches")


def _counts(model: nn.Module, counter: str) -> dict[str, int]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, WhiteningNorm)]
    if not layers:
        return {}
    device = getattr(layers[0][1], counter).device
    counts = torch.stack([getattr(m, counter).to(device) for _, m in layers]).tolist()
    return dict(zip([n for n, _ in layers], counts, strict=True))
