"""Adversarial training and robust evaluation (plain PyTorch, no Lightning).

Attacks are L-infinity bounded and live in *pixel* space: an image ``p`` with values in
``[0, 1]``, perturbed by ``delta`` with ``|delta| <= epsilon`` and ``p + delta`` kept in
``[0, 1]``. The datamodules normalize inside the dataset, so the model sees
``x = (p - mean) / std`` per channel; an :class:`InputSpace` holds ``mean`` and ``std`` and
maps the pixel perturbation to the model's input: ``x_adv = x + delta / std``, clamped to
``[(0 - mean) / std, (1 - mean) / std]``. So ``epsilon = 8/255`` means 8 grey levels whatever
the normalization (the usual CIFAR-10 convention, and the ConvNorm authors' code: they
normalize after perturbing, which is the same map). ``InputSpace.unbounded()`` is for inputs
that are not images in ``[0, 1]`` (synthetic data): epsilon in input units, no clamping.

* :func:`fgsm`: one signed-gradient step (Goodfellow et al., 2015); with ``random_start`` the
  "fast" FGSM of Wong, Rice & Kolter (ICLR 2020): ``delta ~ U(-eps, eps)``, one step of
  ``step_size`` (their 1.25 eps), projected back.
* :func:`pgd`: projected gradient descent (Madry et al., 2018), ``steps`` signed steps of
  ``step_size`` from a uniform random start.
* :class:`AdversarialTraining`: how the classifier perturbs training batches (``"fgsm_rs"``,
  ``"pgd"``, or ``"free"``: Shafahi et al.'s "adversarial training for free", each batch
  replayed ``replays`` times with one optimizer step per replay, the perturbation carried over
  and updated by the gradient of the same backward pass -- what the ConvNorm authors'
  robust-training code does, with the perturbation reset to zero at each new batch).
* :class:`RobustEvaluation` and :func:`robust_predictions`: PGD and FGSM accuracy at eval
  time. The model is put in eval mode for the attacks and every module's mode is restored
  afterwards; only the gradient with respect to the perturbation is computed (no parameter's
  ``.grad`` changes), and eval mode leaves BatchNorm buffers alone. The random start uses a
  private generator, so evaluation never advances the global random number generator.

The attack loss is the mean cross-entropy (the sign of its gradient is what matters).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AdversarialTraining",
    "InputSpace",
    "RobustEvaluation",
    "fgsm",
    "pgd",
    "robust_predictions",
]

Forward = Callable[[Tensor], Tensor]


def as_number(value: Any, owner: str, option: str) -> float:
    """A float from a number or a fraction string such as ``"8/255"`` (readable in YAML)."""
    if isinstance(value, str):
        try:
            return float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"{owner}: {option} must be a number or 'a/b', got {value!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}: {option} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class InputSpace:
    """How pixel values in ``[0, 1]`` map to the model's input: ``x = (p - mean) / std``.

    ``mean`` and ``std`` have one entry per channel (or one for all); ``bounded=False`` means
    the inputs are not images in ``[0, 1]`` (no clamping; epsilon in input units).
    """

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    bounded: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError(
                f"InputSpace: mean and std need the same, non-zero length, got {self.mean} and {self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"InputSpace: std must be positive, got {self.std}")

    @classmethod
    def unbounded(cls) -> InputSpace:
        """Inputs that are not normalized images: epsilon in input units, no clamping."""
        return cls((0.0,), (1.0,), bounded=False)

    def _per_channel(self, values: tuple[float, ...], x: Tensor) -> Tensor:
        t = torch.tensor(values, device=x.device, dtype=x.dtype)
        if len(values) > 1 and (x.dim() < 2 or x.shape[1] != len(values)):
            raise ValueError(
                f"InputSpace: {len(values)} channel statistics for an input of shape {tuple(x.shape)}"
            )
        return t.view(1, -1, *([1] * (x.dim() - 2))) if x.dim() >= 2 else t

    def perturb(self, x: Tensor, delta: Tensor) -> Tensor:
        """``x + delta / std``, clamped to the image range ``[0, 1]`` in pixel space."""
        scale = self._per_channel(self.std, x)
        out = x + delta / scale
        if self.bounded:
            mean = self._per_channel(self.mean, x)
            out = torch.maximum(torch.minimum(out, (1 - mean) / scale), -mean / scale)
        return out

    def project(self, x: Tensor, delta: Tensor, epsilon: float) -> Tensor:
        """``delta`` clamped to ``[-epsilon, epsilon]`` and so that ``p + delta`` stays in
        ``[0, 1]`` (the perturbation actually applied)."""
        delta = delta.clamp(-epsilon, epsilon)
        if self.bounded:
            delta = (self.perturb(x, delta) - x) * self._per_channel(self.std, x)
        return delta


def _uniform(like: Tensor, epsilon: float, generator: torch.Generator | None) -> Tensor:
    noise = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return (2 * noise - 1) * epsilon


def _delta_grad(forward: Forward, x: Tensor, y: Tensor, delta: Tensor, space: InputSpace) -> Tensor:
    delta = delta.detach().requires_grad_(True)
    loss = F.cross_entropy(forward(space.perturb(x, delta)), y)
    (grad,) = torch.autograd.grad(loss, delta)
    return grad


@contextlib.contextmanager
def _gradients_enabled() -> Iterator[None]:
    # Lightning's validation loop runs under inference_mode: attacks need autograd.
    with torch.inference_mode(False), torch.enable_grad():
        yield


def fgsm(
    forward: Forward,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    space: InputSpace,
    step_size: float | None = None,
    random_start: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fast gradient sign method: ``delta = proj(delta_0 + step_size sign(grad))``.

    Args:
        forward: the model (called on perturbed inputs; its mode is the caller's business).
        x: model inputs ``(N, C, H, W)`` (normalized as :class:`InputSpace` says); y: labels.
        epsilon: L-infinity bound in pixel units (``8/255``).
        step_size: defaults to ``epsilon`` (plain FGSM); Wong et al. use ``1.25 epsilon``
            with ``random_start``.
        random_start: start from ``U(-epsilon, epsilon)`` (Wong et al.'s fast FGSM).
        generator: for the random start (``None``: the global generator).

    Returns:
        the adversarial input (detached), in the model's input space.
    """
    with _gradients_enabled():
        x = x.detach().clone()
        delta = torch.zeros_like(x)
        if random_start:
            delta = space.project(x, _uniform(x, epsilon, generator), epsilon)
        grad = _delta_grad(forward, x, y, delta, space)
        step = epsilon if step_size is None else step_size
        delta = space.project(x, delta + step * grad.sign(), epsilon)
        return space.perturb(x, delta).detach()


def pgd(
    forward: Forward,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    step_size: float,
    steps: int,
    space: InputSpace,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient descent (L-infinity): ``steps`` times
    ``delta <- proj(delta + step_size sign(grad))``, from ``U(-epsilon, epsilon)`` when
    ``random_start`` (as the ConvNorm authors' evaluation: 20 steps of 2/255 at 8/255).

    Arguments as :func:`fgsm`; returns the adversarial input (detached).
    """
    with _gradients_enabled():
        x = x.detach().clone()
        delta = torch.zeros_like(x)
        if random_start:
            delta = space.project(x, _uniform(x, epsilon, generator), epsilon)
        for _ in range(steps):
            grad = _delta_grad(forward, x, y, delta, space)
            delta = space.project(x, delta + step_size * grad.sign(), epsilon)
        return space.perturb(x, delta).detach()


def _options(cls: type, config: Mapping[str, Any] | Any, owner: str) -> Any:
    if isinstance(config, cls):
        return config
    if not isinstance(config, Mapping):
        raise TypeError(f"{owner}: expected a dict of options, got {type(config).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(
            f"{owner}: unknown option(s) {', '.join(map(repr, unknown))}; expected some of {sorted(known)}"
        )
    return cls(**config)


@dataclass(frozen=True)
class AdversarialTraining:
    """How :class:`lightning_whiten.ImageClassifier` perturbs training batches.

    Attributes:
        method: ``"fgsm_rs"`` (Wong et al. 2020: random start, one step of ``step_size``),
            ``"pgd"`` (Madry et al.: ``steps`` steps of ``step_size`` from a random start) or
            ``"free"`` (Shafahi et al. 2019, the ConvNorm authors' robust training: each batch
            replayed ``replays`` times, one optimizer step per replay, the perturbation
            updated by ``step_size sign(grad)`` from each replay's backward and reset to zero
            for each new batch).
        epsilon: L-infinity bound in pixel units (a number or ``"8/255"``).
        step_size: the attack step (pixel units); ``None``: ``1.25 epsilon`` for fgsm_rs,
            ``epsilon`` for free, ``epsilon / 4`` for pgd.
        steps: PGD steps (``"pgd"`` only).
        replays: minibatch replays (``"free"`` only).
    """

    method: Literal["fgsm_rs", "pgd", "free"] = "fgsm_rs"
    epsilon: float | str = 8 / 255
    step_size: float | str | None = None
    steps: int = 7
    replays: int = 4

    def __post_init__(self) -> None:
        owner = "ImageClassifier: adversarial"
        if self.method not in ("fgsm_rs", "pgd", "free"):
            raise ValueError(
                f"{owner}: method must be 'fgsm_rs', 'pgd' or 'free', got {self.method!r}"
            )
        epsilon = as_number(self.epsilon, owner, "epsilon")
        if not epsilon > 0:
            raise ValueError(f"{owner}: epsilon must be > 0, got {self.epsilon!r}")
        default = {"fgsm_rs": 1.25 * epsilon, "free": epsilon, "pgd": epsilon / 4}[self.method]
        step = default if self.step_size is None else as_number(self.step_size, owner, "step_size")
        if not step > 0:
            raise ValueError(f"{owner}: step_size must be > 0, got {self.step_size!r}")
        for option in ("steps", "replays"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}: {option} must be a positive int, got {value!r}")
        object.__setattr__(self, "epsilon", epsilon)
        object.__setattr__(self, "step_size", step)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | AdversarialTraining) -> AdversarialTraining:
        return _options(cls, config, "ImageClassifier: adversarial")

    def example(self, forward: Forward, x: Tensor, y: Tensor, space: InputSpace) -> Tensor:
        """The adversarial training input for ``"fgsm_rs"`` and ``"pgd"`` (the model stays in
        training mode, as in the published code: the attack's forwards update BatchNorm's
        running statistics too)."""
        if self.method == "fgsm_rs":
            return fgsm(forward, x, y, self.epsilon, space, self.step_size, random_start=True)  # type: ignore[arg-type]
        if self.method == "pgd":
            return pgd(forward, x, y, self.epsilon, self.step_size, self.steps, space)  # type: ignore[arg-type]
        raise ValueError("AdversarialTraining.example: 'free' replays batches in the training loop")


@dataclass(frozen=True)
class RobustEvaluation:
    """Robust accuracy measured at validation/test time (the ConvNorm authors' evaluation:
    PGD-20, step 2/255, random start, and FGSM, both at epsilon 8/255).

    Attributes:
        epsilon: L-infinity bound in pixel units (a number or ``"8/255"``).
        pgd_steps: PGD steps (0: no PGD); logged as ``<stage>/acc_pgd<steps>``.
        pgd_step_size: PGD step (pixel units).
        pgd_random_start: start PGD from ``U(-epsilon, epsilon)``.
        fgsm: also measure FGSM (one step of ``epsilon``, no random start), logged as
            ``<stage>/acc_fgsm``.
        every_n_epochs: during fit, attack every n-th epoch's validation (and the last one).
        max_batches: attack only the first batches of each validation (``None``: all).
        seed: of the private generator for random starts (plus the batch index).
    """

    epsilon: float | str = 8 / 255
    pgd_steps: int = 20
    pgd_step_size: float | str = 2 / 255
    pgd_random_start: bool = True
    fgsm: bool = True
    every_n_epochs: int = 1
    max_batches: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "ImageClassifier: robust_eval"
        epsilon = as_number(self.epsilon, owner, "epsilon")
        step = as_number(self.pgd_step_size, owner, "pgd_step_size")
        if not epsilon > 0 or not step > 0:
            raise ValueError(f"{owner}: epsilon and pgd_step_size must be > 0")
        for option, low in (("pgd_steps", 0), ("every_n_epochs", 1), ("seed", 0)):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{owner}: {option} must be an int >= {low}, got {value!r}")
        if self.max_batches is not None and (
            isinstance(self.max_batches, bool)
            or not isinstance(self.max_batches, int)
            or self.max_batches < 1
        ):
            raise ValueError(
                f"{owner}: max_batches must be a positive int or None, got {self.max_batches!r}"
            )
        if self.pgd_steps == 0 and not self.fgsm:
            raise ValueError(f"{owner}: nothing to measure (pgd_steps=0 and fgsm=False)")
        object.__setattr__(self, "epsilon", epsilon)
        object.__setattr__(self, "pgd_step_size", step)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | RobustEvaluation) -> RobustEvaluation:
        return _options(cls, config, "ImageClassifier: robust_eval")

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The suffixes logged: ``acc_pgd<steps>`` and/or ``acc_fgsm``."""
        names = (f"acc_pgd{self.pgd_steps}",) if self.pgd_steps else ()
        return names + (("acc_fgsm",) if self.fgsm else ())


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def robust_predictions(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    evaluation: RobustEvaluation,
    space: InputSpace,
    forward: Forward | None = None,
    seed_offset: int = 0,
) -> dict[str, Tensor]:
    """Predicted classes under the attacks of ``evaluation``: ``{"acc_pgd20": (N,), ...}``.

    ``model`` is put in eval mode for the attacks and every module's mode is restored after;
    ``forward`` (default: ``model``) is what is attacked, e.g. a LightningModule's forward.
    Only the perturbation's gradient is computed: parameters' ``.grad`` stay as they were.
    """
    forward = model if forward is None else forward
    device = x.device
    generator = torch.Generator(device=device)
    generator.manual_seed(evaluation.seed + seed_offset)
    out: dict[str, Tensor] = {}
    with _eval_mode(model):
        if evaluation.pgd_steps:
            adv = pgd(
                forward, x, y, evaluation.epsilon, evaluation.pgd_step_size,  # type: ignore[arg-type]
                evaluation.pgd_steps, space, evaluation.pgd_random_start, generator,
            )  # fmt: skip
            with torch.no_grad():
                out[f"acc_pgd{evaluation.pgd_steps}"] = forward(adv).argmax(-1)
        if evaluation.fgsm:
            adv = fgsm(forward, x, y, evaluation.epsilon, space)  # type: ignore[arg-type]
            with torch.no_grad():
                out["acc_fgsm"] = forward(adv).argmax(-1)
    return out
