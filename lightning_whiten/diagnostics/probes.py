"""Properties of a network at initialization (Lubana, Dick & Tanaka, *Beyond BatchNorm*, NeurIPS
2021): activation growth, similarity and rank of the samples' representations, spread before
normalization and activation-gradient norms, per layer, from one training-mode forward and
backward pass.

The definitions follow the authors' probes (``Activs_prober`` and ``Conv_prober`` in
``EkdeepSLubana/BeyondBatchNorm/layer_defs.py``), written here as functions of a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._state import preserved

__all__ = [
    "ACTIVATION_TYPES",
    "InitProbes",
    "activation_variance",
    "cosine_similarity",
    "init_probes",
    "prenorm_std",
    "stable_rank",
]

#: Modules whose output ``init_probes`` measures as an activation (a nonlinearity, or a fused
#: normalization + activation layer whose output is post-activation).
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.Hardsigmoid,
    nn.Softplus, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Threshold,
)  # fmt: skip

#: Modules whose output ``init_probes`` measures as a pre-normalization response.
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd,)


def _compute(a: Tensor) -> Tensor:
    """``a`` detached, in at least float32."""
    a = a.detach()
    return a if a.dtype in (torch.float32, torch.float64) else a.float()


def _check_batch(name: str, a: Tensor) -> None:
    if not isinstance(a, Tensor) or a.dim() < 2 or a.shape[0] < 2:
        shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
        raise ValueError(f"{name}: expected activations of shape (N >= 2, ...), got {shape}")


def _gram(a: Tensor) -> Tensor:
    """``G = M M^T`` (float64) of the samples' flattened activations ``M``, each row divided by
    its L2 norm (rows of zeros stay zero)."""
    m = _compute(a).flatten(1)
    m = m / m.norm(dim=1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    return (m @ m.T).double()


def cosine_similarity(a: Tensor) -> float:
    """Mean cosine similarity between the samples of a batch (Lubana et al.).

    With ``M`` the ``(N, D)`` flattened activations ``a`` (``(N, ...)``) and ``G`` the Gram matrix
    of its L2-normalized rows::

        cosine_similarity = (1 / (N (N - 1))) sum_{i != j} G_ij

    (the authors' ``mean_i (sum_j G_ij - 1) / (N - 1)``: 1 when all samples point the same way,
    0 for orthogonal samples). A sample that is exactly zero (a dead ReLU output) counts as
    orthogonal to the others.
    """
    _check_batch("cosine_similarity", a)
    g = _gram(a)
    n = g.shape[0]
    return float((g.sum() - g.diagonal().sum()) / (n * (n - 1)))


def stable_rank(a: Tensor) -> float:
    """Stable rank of the batch's representations (Lubana et al.).

    ``trace(G) / ||G||_2`` with ``G`` the Gram matrix of the L2-normalized flattened samples,
    i.e. ``||M||_F^2 / ||M||_2^2`` of the normalized ``(N, D)`` matrix: ``N`` for orthogonal
    samples, 1 when they are all parallel. 0 if every sample is zero.
    """
    _check_batch("stable_rank", a)
    g = _gram(a)
    top = torch.linalg.eigvalsh(g)[-1]
    return float(g.diagonal().sum() / top) if top > 0 else 0.0


def _per_channel(a: Tensor) -> Tensor:
    """``(N, C, *spatial)`` -> ``(C, N * prod(spatial))``."""
    return _compute(a).transpose(0, 1).reshape(a.shape[1], -1)


def activation_variance(a: Tensor) -> float:
    """Mean over channels of the unbiased variance over (batch, spatial): ``a`` is ``(N, C,
    *spatial)`` (Lubana et al.'s activation variance, grows with depth without normalization)."""
    _check_batch("activation_variance", a)
    return float(_per_channel(a).var(dim=1).mean())


def prenorm_std(a: Tensor) -> float:
    """Mean over channels of the unbiased standard deviation over (batch, spatial) of a
    pre-normalization response ``(N, C, *spatial)`` (Lubana et al.'s ``Conv_prober``)."""
    _check_batch("prenorm_std", a)
    return float(_per_channel(a).std(dim=1).mean())


_ACTIVATION_METRICS = ("activation_variance", "cosine_similarity", "stable_rank")
_CONV_METRICS = ("prenorm_std", "grad_norm")


@dataclass
class InitProbes:
    """What :func:`init_probes` measured.

    Attributes:
        loss: the loss of the batch.
        batch_size: ``N``.
        layers: per measured output, in the order of the forward pass: ``{"type": class name,
            "kind": "activation" | "conv", metric: value}``; activations have
            ``activation_variance``, ``cosine_similarity``, ``stable_rank``; convolutions have
            ``prenorm_std`` and ``grad_norm`` (``nan`` when the output needs no gradient).
    """

    loss: float
    batch_size: int
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def _values(self, kind: str, metric: str) -> list[float]:
        return [row[metric] for row in self.layers.values() if row["kind"] == kind]

    def summary(self) -> dict[str, float]:
        """The three numbers behind the paper's claims.

        * ``activation_growth``: activation variance of the last measured activation over the
          first (ResNets without normalization: exponential in depth).
        * ``final_cosine_similarity``, ``final_stable_rank``: of the last activation (samples
          collapse onto one direction: similarity near 1, stable rank near 1).
        * ``gradient_ratio``: activation-gradient norm at the first convolution over the last
          (large with small normalization groups: early layers get exploding gradients).
        """
        out: dict[str, float] = {"loss": self.loss}
        var = self._values("activation", "activation_variance")
        if var:
            out["activation_growth"] = var[-1] / var[0] if var[0] > 0 else float("inf")
            out["mean_cosine_similarity"] = sum(
                self._values("activation", "cosine_similarity")
            ) / len(var)
            out["final_cosine_similarity"] = self._values("activation", "cosine_similarity")[-1]
            out["final_stable_rank"] = self._values("activation", "stable_rank")[-1]
        grads = self._values("conv", "grad_norm")
        if grads:
            out["gradient_ratio"] = grads[0] / grads[-1] if grads[-1] > 0 else float("inf")
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict: ``{"loss", "batch_size", "layers": {name: {...}},
        "summary": {...}}``."""
        return {
            "loss": self.loss,
            "batch_size": self.batch_size,
            "layers": {name: dict(row) for name, row in self.layers.items()},
            "summary": self.summary(),
        }

    def table(self, title: str | None = None):
        """A ``rich.table.Table`` of every measured layer."""
        from rich.table import Table

        def fmt(value: Any) -> str:
            return "-" if value is None else f"{value:.4g}"

        summary = self.summary()
        if title is None:
            title = (
                f"Initialization probes (Lubana et al.): batch {self.batch_size}, "
                f"loss {self.loss:.4g}"
            )
            if "activation_growth" in summary:
                title += f", activation growth {summary['activation_growth']:.3g}x"
            if "gradient_ratio" in summary:
                title += f", first/last gradient {summary['gradient_ratio']:.3g}x"
        table = Table(title=title, title_justify="left")
        columns = ("layer", "type", "act. variance", "cos. sim.", "stable rank", "pre-norm std",
                   "grad norm")  # fmt: skip
        for column in columns:
            table.add_column(column, justify="left" if column in ("layer", "type") else "right")
        for name, row in self.layers.items():
            table.add_row(
                name,
                row["type"],
                *(fmt(row.get(m)) for m in (*_ACTIVATION_METRICS, *_CONV_METRICS)),
            )
        return table

    def __rich__(self):
        return self.table()

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=120, record=True, file=_NullFile())
        console.print(self.table())
        return console.export_text()


class _NullFile:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


LayerFilter = Sequence[type[nn.Module]] | Callable[[str, nn.Module], bool]


def _selector(spec: LayerFilter) -> Callable[[str, nn.Module], bool]:
    if callable(spec) and not isinstance(spec, type):
        return spec
    types = tuple(spec)
    return lambda name, module: isinstance(module, types)


def _split_batch(batch: Any, where: str) -> tuple[Any, Any]:
    try:
        x, y = batch
    except (TypeError, ValueError):
        raise TypeError(
            f"{where}: batch must be a pair (inputs, targets) with loss_fn(model(inputs), targets)"
            f" a scalar, got {type(batch).__name__}"
        ) from None
    return x, y


def _scalar_loss(loss: Any, where: str) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"{where}: loss_fn must return a scalar tensor, got {shape}")
    return loss.reshape(())


def init_probes(
    model: nn.Module,
    batch: tuple[Any, Any],
    loss_fn: Callable[[Any, Any], Tensor],
    activations: LayerFilter = ACTIVATION_TYPES,
    convs: LayerFilter = CONV_TYPES,
) -> InitProbes:
    """Lubana et al.'s probes on one batch, in the mode the model is in (training mode: batch
    statistics, as the paper measures at initialization).

    One forward and one backward pass of ``loss_fn(model(x), y)`` for ``batch = (x, y)``:

    * after every **activation** module (``activations``: default the nonlinearities of
      ``torch.nn``, e.g. each ``ReLU``; in a post-activation ResNet this is the first ReLU of a
      block and the block output), with ``a`` its ``(N, C, *spatial)`` output:
      ``activation_variance`` (:func:`activation_variance`), ``cosine_similarity``
      (:func:`cosine_similarity`) and ``stable_rank`` (:func:`stable_rank`);
    * after every **convolution** (``convs``, default every ``nn.Conv*d``), the response before
      normalization: ``prenorm_std`` (:func:`prenorm_std`) and ``grad_norm = ||dL/da||_F`` over
      the batch (it scales with the loss's reduction: a mean over the batch divides it by N).

    Keys are the names of ``model.named_modules()``; a module called more than once per
    forward (e.g. torchvision's ``BasicBlock.relu``) gets ``name`` for its first call and
    ``name#2``, ``name#3``, ... for the next ones. The order is that of the forward pass.

    Nothing is left changed: parameters, their ``.grad``, every buffer (running statistics,
    whitening matrices, counters), module attributes and the random number generators are
    restored (see ``ModelState``); gradients are taken with ``torch.autograd.grad``.

    Args:
        model: the network.
        batch: ``(inputs, targets)``.
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar.
        activations: module types (or a ``(name, module) -> bool`` predicate) measured as
            activations.
        convs: module types (or a predicate) measured as pre-normalization responses.

    Returns:
        :class:`InitProbes` (``.layers``, ``.summary()``, ``.to_dict()``, ``.table()``).
    """
    x, y = _split_batch(batch, "init_probes")
    is_activation, is_conv = _selector(activations), _selector(convs)
    names = {id(m): n for n, m in model.named_modules()}
    layers: dict[str, dict[str, Any]] = {}
    calls: dict[str, int] = {}
    conv_outputs: list[tuple[str, Tensor]] = []

    def key(name: str) -> str:
        calls[name] = calls.get(name, 0) + 1
        return name if calls[name] == 1 else f"{name}#{calls[name]}"

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if not isinstance(output, Tensor) or output.dim() < 2:
            return None
        name = names[id(module)]
        if is_activation(name, module):
            layers[key(name)] = {
                "type": type(module).__name__,
                "kind": "activation",
                "activation_variance": activation_variance(output),
                "cosine_similarity": cosine_similarity(output),
                "stable_rank": stable_rank(output),
            }
            return None
        k = key(name)
        layers[k] = {
            "type": type(module).__name__,
            "kind": "conv",
            "prenorm_std": prenorm_std(output),
            "grad_norm": float("nan"),
        }
        if not output.requires_grad:
            return None
        conv_outputs.append((k, output))
        # The layers after may change their input in place (ReLU(inplace=True) right after a
        # convolution): they get a copy, and dL/d(output) is read on the original.
        return output.clone()

    with preserved(model):
        handles = [
            m.register_forward_hook(hook)
            for n, m in model.named_modules()
            if is_activation(n, m) or is_conv(n, m)
        ]
        try:
            loss = _scalar_loss(loss_fn(model(x), y), "init_probes")
            if conv_outputs and loss.requires_grad:
                grads = torch.autograd.grad(loss, [t for _, t in conv_outputs], allow_unused=True)
                for (k, _), g in zip(conv_outputs, grads, strict=True):
                    layers[k]["grad_norm"] = 0.0 if g is None else float(g.double().norm())
        finally:
            for handle in handles:
                handle.remove()
        n = x.shape[0] if isinstance(x, Tensor) else len(x)
        return InitProbes(float(loss.detach()), int(n), layers)
