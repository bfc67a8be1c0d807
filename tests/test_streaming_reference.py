"""StreamingNorm against the authors' streaming algorithm (``liaoq/StreamingNorm``), in float64.

The reference below is written from the authors' ``Streaming`` op as read (not copied): each
streamed statistic has its own op with a forward history, a long-term forward average, a
backward history, a long-term backward average and a *weight-update detector*, a parameter
that receives a constant gradient in every backward call, so that an optimizer step makes it
nonzero. A training forward call whose detector is nonzero first closes the window (folds the
histories into the long-term averages and clears them), then joins the new one. The forward
returns ``alpha_long L + alpha_short S`` (``L = S`` until set) as a constant; the backward pushes
the incoming gradient into the backward history and returns
``beta_long G_L + beta_short G_S + beta_current g`` as the gradient of the op's input.

The statistic streamed is the package's documented one (not the authors' published one, see
``docs/guide/streaming.md``): the batch mean ``m`` is streamed to the center ``c``, the p-th
absolute moment ``d = mean |x - c|^p`` around it is streamed to ``M``, and
``y = weight (x - c) (M + eps)^(-1/p) + bias``; the long-term statistics start from the prior
``(0, 1)`` and are lerped with ``momentum = 1 - decay_factor`` from the first update on.

With the detector reset after each check (commented out in the authors' code), the op has one
window per weight update, as the paper and this package; as published, the detector is never
reset, so after the first update every forward call is its own window.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

import lightning_whiten as lw

F64 = {"dtype": torch.float64}
OPTIONS = {
    "eps": 1e-3,
    "alpha": 0.6,
    "beta_long": 0.5,
    "beta_short": 0.3,
    "beta_current": 0.2,
    "momentum": 0.25,
    "grad_momentum": 0.4,
}
LR = 0.05


class _StreamedGrad(torch.autograd.Function):
    """Forward: the op's mixed statistic (a constant); backward: the op's streamed gradient."""

    @staticmethod
    def forward(ctx, stat, mixed, op):  # type: ignore[override]
        ctx.op = op
        return mixed.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return ctx.op.backward(grad), None, None


class AuthorsStreamingOp:
    """One streamed statistic (per channel), the authors' ``Streaming`` module as read."""

    def __init__(self, prior: Tensor, reset_detector: bool) -> None:
        self.long = prior.clone()  # the package's prior (the authors': unset until an update)
        self.forward_history: list[Tensor] = []
        self.grad_long: Tensor | None = None
        self.grad_history: list[Tensor] = []
        self.detector = 0.0
        self.detector_grad = 0.0
        self.reset_detector = reset_detector
        self.windows_closed = 0

    @staticmethod
    def _mean(history: list[Tensor]) -> Tensor:
        return torch.stack(history).mean(0)

    def __call__(self, stat: Tensor) -> Tensor:
        if self.detector != 0:  # the weights were updated since the detector was last reset
            self._close()
            if self.reset_detector:
                self.detector = 0.0
        self.forward_history.append(stat.detach())
        a = OPTIONS["alpha"]
        mixed = a * self.long + (1 - a) * self._mean(self.forward_history)
        return _StreamedGrad.apply(stat, mixed, self)

    def backward(self, grad: Tensor) -> Tensor:
        self.detector_grad += 1.0  # the constant gradient the detector receives
        self.grad_history.append(grad)
        short = self._mean(self.grad_history)
        long = short if self.grad_long is None else self.grad_long
        return (
            OPTIONS["beta_long"] * long
            + OPTIONS["beta_short"] * short
            + OPTIONS["beta_current"] * grad
        )

    def _close(self) -> None:
        self.windows_closed += 1
        if self.forward_history:
            k = OPTIONS["momentum"]
            self.long = (1 - k) * self.long + k * self._mean(self.forward_history)
        if self.grad_history:
            short = self._mean(self.grad_history)
            k = OPTIONS["grad_momentum"]
            self.grad_long = (
                short if self.grad_long is None else (1 - k) * self.grad_long + k * short
            )
        self.forward_history, self.grad_history = [], []

    def optimizer_step(self, lr: float) -> None:
        """What SGD does to the detector parameter."""
        self.detector -= lr * self.detector_grad
        self.detector_grad = 0.0

    def buffers(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(L, S, G_L, G_S)`` as the layer stores them (zeros where unset or empty)."""
        zeros = torch.zeros_like(self.long)
        short = self._mean(self.forward_history) if self.forward_history else zeros
        grad_long = zeros if self.grad_long is None else self.grad_long
        grad_short = self._mean(self.grad_history) if self.grad_history else zeros
        return self.long, short, grad_long, grad_short


class AuthorsStreamingNorm:
    """Streaming normalization with two authors' ops (mean and p-th moment) and the package's
    documented statistic; ``weight`` and ``bias`` are trained by plain SGD."""

    def __init__(self, channels: int, p: float, weight: Tensor, bias: Tensor, reset: bool) -> None:
        self.p = p
        self.center_op = AuthorsStreamingOp(torch.zeros(channels, **F64), reset)
        self.moment_op = AuthorsStreamingOp(torch.ones(channels, **F64), reset)
        self.weight = weight.detach().clone().requires_grad_()
        self.bias = bias.detach().clone().requires_grad_()

    def __call__(self, x: Tensor) -> Tensor:
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        c = self.center_op(x.mean(dims)).view(shape)
        d = (x - c).abs().pow(self.p).mean(dims)
        big_m = self.moment_op(d).view(shape)
        scale = (big_m + OPTIONS["eps"]).pow(-1.0 / self.p)
        return (x - c) * scale * self.weight.view(shape) + self.bias.view(shape)

    def optimizer_step(self, lr: float) -> None:
        with torch.no_grad():
            for t in (self.weight, self.bias):
                t -= lr * t.grad
                t.grad = None
        self.center_op.optimizer_step(lr)
        self.moment_op.optimizer_step(lr)


def _pair(channels: int, p: float, reset: bool = True):
    torch.manual_seed(0)
    layer = lw.StreamingNorm(channels, p=p, dtype=torch.float64, **OPTIONS)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    return layer, AuthorsStreamingNorm(channels, p, layer.weight, layer.bias, reset)


def _assert_buffers(layer: lw.StreamingNorm, ref: AuthorsStreamingNorm, msg: str) -> None:
    """All 8 statistics buffers of the layer against the two ops' state."""
    close = {"rtol": 1e-11, "atol": 1e-12}
    names = (
        ("running_mean", "short_mean", "grad_running_mean", "grad_short_mean"),
        ("running_moment", "short_moment", "grad_running_moment", "grad_short_moment"),
    )
    for op, buffers in zip((ref.center_op, ref.moment_op), names, strict=True):
        for name, expected in zip(buffers, op.buffers(), strict=True):
            torch.testing.assert_close(getattr(layer, name), expected, **close, msg=f"{msg} {name}")
    assert int(layer.short_count) == len(ref.center_op.forward_history), msg


def _sgd(layer: lw.StreamingNorm, ref: AuthorsStreamingNorm) -> None:
    close = {"rtol": 1e-10, "atol": 1e-11}
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, **close, msg="weight grad")
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, **close, msg="bias grad")
    with torch.no_grad():
        for t in (layer.weight, layer.bias):
            t -= LR * t.grad
            t.grad = None
    ref.optimizer_step(LR)


def _inputs(shape, calls: int, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Statistics that change from call to call: every window rule and mixing weight shows.
    return [
        torch.randn(shape, generator=gen, **F64) * (1 + 0.5 * t) + 0.3 * t - 0.5
        for t in range(calls)
    ]


@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("shape", [(1, 4), (8, 4), (2, 3, 4, 4)], ids=str)
def test_a_plain_stream_matches_the_authors_op_step_by_step(p, shape):
    # The online loop: one forward, one backward and one SGD step per sample/batch.
    layer, ref = _pair(shape[1], p)
    for step, x in enumerate(_inputs(shape, 6, seed=1)):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = layer(x1), ref(x2)
        torch.testing.assert_close(y1, y2, rtol=1e-11, atol=1e-12, msg=f"output {step}")
        _assert_buffers(layer, ref, f"step {step} after forward")
        grad = torch.randn_like(y1)
        y1.backward(grad)
        y2.backward(grad)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-11, msg=f"dx {step}")
        _sgd(layer, ref)
    # The layer closes a window when its backward is done, the authors' op at the next forward
    # (the same numbers): the last window is still open in the reference.
    assert int(layer.num_batches_tracked) == 6 == ref.center_op.windows_closed + 1


def _recurrence(layer, ref, steps: int, calls: int, shape, check: bool = True) -> list[float]:
    """``steps`` weight updates of a recurrence of ``calls`` time steps
    (``h_t = u_t + tanh(norm(h_{t-1}))``, a loss on every output, one backward, an SGD step),
    layer and reference call by call. With ``check``: the buffers after every call, the input
    and parameter gradients after every backward. Returns every call's largest output
    difference."""
    diffs = []
    for step in range(steps):
        inputs = _inputs(shape, calls, seed=10 + step)
        gen = torch.Generator().manual_seed(100 + step)
        targets = [torch.randn(shape, generator=gen, **F64) for _ in range(calls)]
        us = [[u.clone().requires_grad_() for u in inputs] for _ in range(2)]
        hs, losses = [us[0][0], us[1][0]], [0.0, 0.0]
        for t in range(calls):
            ys = [layer(hs[0]), ref(hs[1])]
            diffs.append(float((ys[0] - ys[1]).detach().abs().max()))
            if check:
                _assert_buffers(layer, ref, f"update {step} call {t}")
            for i in range(2):
                losses[i] = losses[i] + (ys[i] * targets[t]).sum()
                if t + 1 < calls:
                    hs[i] = us[i][t + 1] + torch.tanh(ys[i])
        losses[0].backward()
        losses[1].backward()
        if check:
            for t, (u1, u2) in enumerate(zip(*us, strict=True)):
                torch.testing.assert_close(
                    u1.grad, u2.grad, rtol=1e-9, atol=1e-10, msg=f"update {step} du_{t}"
                )
            _sgd(layer, ref)
        else:
            with torch.no_grad():
                for t in (layer.weight, layer.bias):
                    t -= LR * t.grad
                    t.grad = None
            ref.optimizer_step(LR)
    return diffs


@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("shape", [(1, 3), (4, 3, 2, 2)], ids=str)
def test_a_recurrence_matches_the_authors_op_with_its_detector_reset(p, shape):
    # T = 4 forward calls per weight update, one backward through all of them: one window per
    # update in both (the authors' op with the reset that their code has commented out).
    layer, ref = _pair(shape[1], p, reset=True)
    diffs = _recurrence(layer, ref, steps=3, calls=4, shape=shape)
    assert max(diffs) < 1e-10, diffs
    assert int(layer.num_batches_tracked) == 3 == ref.moment_op.windows_closed + 1


def test_as_published_every_call_after_the_first_update_is_its_own_window():
    # The documented difference: the authors' detector is never reset, so once the weights have
    # been updated every forward call closes a window. The first window (calls 0-3) and the
    # first call after the update (call 4, which closes it in both) agree; every later call of
    # a recurrence differs by O(1).
    shape, calls, steps = (4, 3), 4, 3
    layer, ref = _pair(shape[1], 1.0, reset=False)
    diffs = _recurrence(layer, ref, steps, calls, shape, check=False)
    assert max(diffs[: calls + 1]) < 1e-10, diffs
    assert min(diffs[calls + 1 :]) > 0.05, diffs
    assert max(diffs) > 0.5, diffs
    # Windows: one per update here, one per call after the first update as published.
    assert int(layer.num_batches_tracked) == steps
    assert ref.center_op.windows_closed == (steps - 1) * calls


def test_the_authors_published_statistic_is_nan_at_every_step_for_one_sample():
    # What the docs correct: the authors' op streams the Bessel-corrected std of the batch
    # (``x.std(dim=0)``), which is NaN for one sample of (1, C); the NaN enters their averages,
    # so every output is NaN (not only the first). StreamingNorm stays finite.
    torch.manual_seed(0)
    layer = lw.StreamingNorm(3, p=2.0, dtype=torch.float64, **OPTIONS)
    std_history: list[Tensor] = []
    for x in _inputs((1, 3), 5, seed=3):
        with warnings.catch_warnings():  # torch warns that one sample has no std
            warnings.simplefilter("ignore", UserWarning)
            std = x.std(dim=0) + OPTIONS["eps"]  # their statistic, eps inside
        std_history.append(std)
        # alpha = (0.5, 0.5, 0) with L = S before the first update; after it L averages S.
        streamed = torch.stack(std_history).mean(0)
        y_authors = (x - x.mean(0)) / (streamed + OPTIONS["eps"])  # eps again outside
        assert torch.isnan(y_authors).all()
        assert torch.isfinite(layer(x.requires_grad_())).all()
