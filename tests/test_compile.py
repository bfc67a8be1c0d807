"""torch.compile(fullgraph=True): no graph breaks, results equal to eager (CPU)."""

from __future__ import annotations

import pytest
import torch

import lightning_whiten as lw

pytestmark = pytest.mark.slow  # compilation: 2-8 s a case on 2 CPU cores


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Every test compiles new layer instances of the same forward code: without a reset the
    # process would hit dynamo's per-code recompile limit (a whole model compiles once).
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


LAYERS = {
    "iternorm": lambda: lw.IterNorm(20, group_size=8, iterations=5),
    "iternorm-coupled": lambda: lw.IterNorm(20, group_size=8, iterations=7, method="coupled"),
    "dbn": lambda: lw.DBN(20, group_size=8),
    # a large whitening rate: W changes visibly at every step
    "swbn": lambda: lw.SWBN(20, group_size=8, whitening_rate=0.1),
}


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_layer_equals_eager_in_training_and_eval(name, memory_format):
    torch.manual_seed(0)
    eager = LAYERS[name]()
    compiled_layer = LAYERS[name]()
    compiled_layer.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_layer, fullgraph=True)  # fullgraph: a graph break raises
    for step in range(3):
        x = (torch.randn(6, 20, 3, 3) * 2 + 1).contiguous(memory_format=memory_format)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        grad = torch.randn_like(ye)
        ye.backward(grad)
        yc.backward(grad)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5, msg=f"output, step {step}")
        torch.testing.assert_close(
            xc.grad, xe.grad, rtol=1e-4, atol=1e-5, msg=f"input grad, step {step}"
        )
        torch.testing.assert_close(
            compiled_layer.weight.grad, eager.weight.grad, rtol=1e-4, atol=1e-5
        )
        eager.zero_grad()
        compiled_layer.zero_grad()
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(
            compiled_layer.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key
        )
    eager.eval()
    compiled_layer.eval()
    x = torch.randn(4, 20, 3, 3)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


def test_compiled_swbn_backward_uses_the_applied_whitening_matrix():
    # Regression: an in-place update of W after its use made the compiled backward read the
    # updated W (the compiler recomputes cheap values from the mutated buffer). With W = I at
    # the first step the layer is BatchNorm, so its input gradient is BatchNorm's.
    layer = lw.SWBN(8, group_size=8, whitening_rate=0.5, eps=1e-5)
    compiled = torch.compile(layer, fullgraph=True)
    x = (torch.randn(16, 8) * 3).requires_grad_()
    xr = x.detach().double().requires_grad_()
    grad = torch.randn(16, 8)
    compiled(x).backward(grad)
    torch.nn.functional.batch_norm(xr, None, None, training=True, eps=1e-5).backward(grad.double())
    assert not torch.allclose(layer.whitening, torch.eye(8))  # W was updated
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-5)


def test_compiled_model_does_not_recompile_across_steps():
    from torch import nn
    from torch._dynamo.utils import counters

    counters.clear()
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), lw.SWBN(16, group_size=8, whitening_rate=0.1), nn.ReLU(),
        nn.Conv2d(16, 16, 3), lw.IterNorm(16, group_size=8), nn.ReLU(),
    )  # fmt: skip
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(4):
        compiled(torch.randn(4, 3, 8, 8)).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_layer_feeds_an_inplace_relu(name, memory_format):
    # timm's and torchvision's ResNets apply ReLU(inplace=True) to the normalization's output:
    # the compiled layer must hand back a tensor of its own, not a view of one made inside its
    # autograd Function (which autograd forbids modifying in place).
    from torch import nn

    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 20, 3), LAYERS[name](), nn.ReLU(inplace=True))
    copy = nn.Sequential(nn.Conv2d(3, 20, 3), LAYERS[name](), nn.ReLU(inplace=True))
    copy.load_state_dict(eager.state_dict())
    compiled = torch.compile(copy, fullgraph=True)
    x = torch.randn(6, 3, 6, 6).contiguous(memory_format=memory_format)
    ye, yc = eager(x), compiled(x)
    ye.square().sum().backward()
    yc.square().sum().backward()
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    assert yc.is_contiguous(memory_format=memory_format)
    # the conv's weight gradient sums 6 * 16 products per entry: float32 reordering noise
    scale = eager[0].weight.grad.abs().max().item()
    torch.testing.assert_close(
        copy[0].weight.grad, eager[0].weight.grad, rtol=1e-3, atol=1e-4 * scale
    )


def test_float_schedules_reach_the_compiled_graph_without_recompiling_per_step():
    # Before: the momentum was read as a Python float, which the compiler specializes on: one
    # graph per value, the recompile limit, then eager. Now it is a buffer filled in place;
    # eps and whitening_rate become dynamic after their first change (one recompilation).
    from torch import nn
    from torch._dynamo.utils import counters

    from lightning_whiten.schedules import LayerScheduler, Linear

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 16, 3), lw.SWBN(16, group_size=8, whitening_rate=0.01), nn.ReLU(),
            nn.Conv2d(16, 16, 3), lw.IterNorm(16, group_size=8), nn.ReLU(),
        )  # fmt: skip

    schedules = {
        "momentum": Linear(0.5, 0.05, stop=10, unit="step"),
        "eps": Linear(1e-3, 1e-5, stop=10, unit="step"),
        "whitening_rate": Linear(0.05, 0.001, stop=10, unit="step"),
    }
    eager, model = build(), build()
    compiled = torch.compile(model, fullgraph=True)
    runs = [(eager, eager, LayerScheduler(schedules).bind(eager)),
            (model, compiled, LayerScheduler(schedules).bind(model))]  # fmt: skip
    counters.clear()
    graphs = []
    for step in range(7):
        x = torch.randn(4, 3, 8, 8)
        for _, forward, scheduler in runs:
            scheduler.apply({"step": float(step)})
            forward(x).square().mean().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[2] <= 2, graphs  # none after the first changes
    # and the values reached the graph: the running statistics follow the schedule as in eager
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert model[4]._momentum_factor.item() == pytest.approx(0.5 - 0.45 * 6 / 10)
