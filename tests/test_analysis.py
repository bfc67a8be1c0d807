"""Normalization analysis: Lubana et al.'s probes and Santurkar et al.'s measurements against
hand computations and float64 references, and the promise that nothing is left changed."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lightning_whiten as lw
from lightning_whiten import diagnostics as D

# ---------------------------------------------------------------------------------------------
# cosine similarity and stable rank by hand
# ---------------------------------------------------------------------------------------------


def test_identical_samples_have_similarity_one_and_rank_one():
    a = torch.randn(1, 3, 4, 4).expand(5, 3, 4, 4) * torch.tensor([1.0, 2, 3, 4, 5]).view(
        5, 1, 1, 1
    )
    assert D.cosine_similarity(a) == pytest.approx(1.0, abs=1e-6)
    assert D.stable_rank(a) == pytest.approx(1.0, abs=1e-6)


def test_orthogonal_samples_have_similarity_zero_and_full_rank():
    a = torch.diag(torch.tensor([1.0, 3.0, 0.5, 7.0])).reshape(4, 1, 2, 2)  # norms differ
    assert D.cosine_similarity(a) == pytest.approx(0.0, abs=1e-7)
    assert D.stable_rank(a) == pytest.approx(4.0, rel=1e-6)


def test_similarity_and_rank_of_a_small_matrix_by_hand():
    # rows (1,0), (1,1), (0,2): pairwise cosines 1/sqrt2, 0, 1/sqrt2
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    s = 1 / math.sqrt(2)
    assert D.cosine_similarity(a) == pytest.approx(2 * (s + 0 + s) / (3 * 2), rel=1e-6)
    # G = [[1, s, 0], [s, 1, s], [0, s, 1]]: eigenvalues 1 - 1, 1, 1 + 1 -> 3 / 2
    assert D.stable_rank(a) == pytest.approx(1.5, rel=1e-6)


def test_a_zero_sample_counts_as_orthogonal():
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    # pairs: (0,1) similarity 1, the zero sample 0 -> 2 * 1 / 6
    assert D.cosine_similarity(a) == pytest.approx(1 / 3, rel=1e-6)
    assert D.stable_rank(a) == pytest.approx(1.0, rel=1e-6)  # trace 2, top eigenvalue 2


def test_probes_reject_a_single_sample():
    with pytest.raises(ValueError, match="cosine_similarity: expected activations of shape"):
        D.cosine_similarity(torch.randn(1, 4))
    with pytest.raises(ValueError, match="stable_rank"):
        D.stable_rank(torch.randn(5))


# ---------------------------------------------------------------------------------------------
# init_probes against a float64 computation
# ---------------------------------------------------------------------------------------------


class Twice(nn.Module):
    """A ReLU module called twice (as torchvision's BasicBlock does)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.act = nn.ReLU(inplace=True)  # in place, right after a convolution
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.relu(self.bn(self.conv1(x)))
        h = self.relu(h + self.act(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def reference_probes(net: Twice, x, y):
    """The probes from their definitions, in float64, with the network written out by hand."""
    p = {n: t.detach().clone().requires_grad_() for n, t in net.named_parameters()}
    c1 = nn.functional.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1)
    mean = c1.mean((0, 2, 3), keepdim=True)
    var = c1.var((0, 2, 3), unbiased=False, keepdim=True)
    bn = (c1 - mean) / (var + net.bn.eps).sqrt() * p["bn.weight"].view(1, -1, 1, 1)
    r1 = torch.relu(bn + p["bn.bias"].view(1, -1, 1, 1))
    c2 = nn.functional.conv2d(r1, p["conv2.weight"], None, padding=1)
    a2 = torch.relu(c2)
    r2 = torch.relu(r1 + a2)
    logits = r2.mean((2, 3)) @ p["fc.weight"].T + p["fc.bias"]
    loss = nn.functional.cross_entropy(logits, y)
    g1, g2 = torch.autograd.grad(loss, [c1, c2])

    def act_stats(a):
        a = a.detach()
        n, c = a.shape[:2]
        per_channel = [a[:, k].flatten() for k in range(c)]
        variance = sum(((v - v.mean()) ** 2).sum() / (v.numel() - 1) for v in per_channel) / c
        rows = [a[i].flatten() for i in range(n)]
        cos = [
            float(rows[i] @ rows[j] / (rows[i].norm() * rows[j].norm()))
            for i in range(n)
            for j in range(n)
            if i != j
        ]
        m = torch.stack([r / r.norm() for r in rows])
        gram = m @ m.T
        rank = torch.trace(gram) / torch.linalg.matrix_norm(gram, ord=2)
        return {
            "activation_variance": float(variance),
            "cosine_similarity": sum(cos) / len(cos),
            "stable_rank": float(rank),
        }

    def conv_stats(c, g):
        c = c.detach()
        stds = [c[:, k].flatten().std() for k in range(c.shape[1])]
        return {"prenorm_std": float(sum(stds) / len(stds)), "grad_norm": float(g.norm())}

    return float(loss.detach()), {
        "conv1": conv_stats(c1, g1),
        "relu": act_stats(r1),
        "conv2": conv_stats(c2, g2),
        "act": act_stats(a2),
        "relu#2": act_stats(r2),
    }


def test_init_probes_match_a_float64_computation():
    torch.manual_seed(0)
    net = Twice().double()
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    probes = D.init_probes(net, (x, y), nn.functional.cross_entropy)
    loss, expected = reference_probes(net, x, y)
    assert probes.loss == pytest.approx(loss, rel=1e-12)
    assert probes.batch_size == 6
    assert list(probes.layers) == ["conv1", "relu", "conv2", "act", "relu#2"]  # forward order
    for name, metrics in expected.items():
        for metric, value in metrics.items():
            assert probes.layers[name][metric] == pytest.approx(value, rel=1e-9), (name, metric)
    assert (
        probes.layers["relu"]["kind"] == "activation" and probes.layers["conv1"]["kind"] == "conv"
    )
    summary = probes.summary()
    assert summary["activation_growth"] == pytest.approx(
        expected["relu#2"]["activation_variance"] / expected["relu"]["activation_variance"]
    )
    assert summary["gradient_ratio"] == pytest.approx(
        expected["conv1"]["grad_norm"] / expected["conv2"]["grad_norm"]
    )
    as_dict = probes.to_dict()
    assert as_dict["layers"]["conv2"]["grad_norm"] == probes.layers["conv2"]["grad_norm"]
    text = str(probes)
    assert "relu#2" in text and "stable rank" in text


def test_init_probes_selects_layers_by_type_or_predicate():
    torch.manual_seed(0)
    net = Twice()
    x, y = torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 2, 0])
    only_act = D.init_probes(net, (x, y), nn.functional.cross_entropy, convs=())
    assert set(only_act.layers) == {"relu", "act", "relu#2"}
    chosen = D.init_probes(
        net,
        (x, y),
        nn.functional.cross_entropy,
        activations=lambda name, m: name == "act",
        convs=[nn.Linear],
    )
    assert list(chosen.layers) == ["act", "fc"]
    assert chosen.layers["fc"]["grad_norm"] > 0


# ---------------------------------------------------------------------------------------------
# landscape: exact on linear least squares
# ---------------------------------------------------------------------------------------------


def test_landscape_is_exact_on_linear_least_squares():
    torch.manual_seed(0)
    n, d = 20, 5
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randn(n, 1, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    etas = (0.05, 0.1, 0.3, 0.7)
    result = D.landscape(model, nn.functional.mse_loss, (x, y), step_sizes=etas)

    # L(w) = |A w - y|^2 / n with A = [x, 1], w = [weight, bias]: H = 2 A^T A / n
    a = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    w = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    residual = a @ w - y.flatten()
    loss = float(residual.pow(2).mean())
    g = 2 * a.T @ residual / n
    h = 2 * a.T @ a / n
    hg = h @ g
    expected_losses = [loss - e * float(g @ g) + e**2 * float(g @ hg) / 2 for e in etas]
    expected_changes = [e * float(hg.norm()) for e in etas]
    assert result["loss"] == pytest.approx(loss, rel=1e-12)
    assert result["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)
    assert result["beta_smoothness"] == pytest.approx(float(hg.norm() / g.norm()), rel=1e-9)
    assert result["losses"] == pytest.approx(expected_losses, rel=1e-9)
    assert result["gradient_changes"] == pytest.approx(expected_changes, rel=1e-9)
    assert result["loss_range"] == pytest.approx((min(expected_losses), max(expected_losses)))
    assert result["gradient_predictiveness"] == pytest.approx(
        (min(expected_changes), max(expected_changes))
    )
    assert result["step_sizes"] == list(etas)


def test_landscape_rejects_bad_arguments():
    model = nn.Linear(3, 1)
    batch = (torch.randn(4, 3), torch.randn(4, 1))
    with pytest.raises(ValueError, match="step_sizes must be positive"):
        D.landscape(model, nn.functional.mse_loss, batch, step_sizes=(0.1, -1))
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        D.landscape(model, lambda out, t: (out - t) ** 2, batch)
    with pytest.raises(TypeError, match="batch must be a pair"):
        D.landscape(model, nn.functional.mse_loss, torch.randn(4, 3))
    frozen = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        D.landscape(frozen, nn.functional.mse_loss, batch)


# ---------------------------------------------------------------------------------------------
# covariate shift
# ---------------------------------------------------------------------------------------------


def test_covariate_shift_matches_its_definition_on_a_two_layer_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.3)
    result = D.covariate_shift(net, nn.functional.mse_loss, (x, y), optimizer)

    w1, b1, w2, b2 = (p.detach().clone().requires_grad_() for p in net.parameters())

    def loss(w1, b1, w2, b2):
        return nn.functional.mse_loss(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)

    g = torch.autograd.grad(loss(w1, b1, w2, b2), [w1, b1, w2, b2])
    moved = [(w1 - 0.3 * g[0]).detach(), (b1 - 0.3 * g[1]).detach()]
    g_shift = torch.autograd.grad(loss(*moved, w2, b2), [w2, b2])
    g_layer, g_layer_shift = (
        torch.cat([g[2].flatten(), g[3]]),
        torch.cat([g_shift[0].flatten(), g_shift[1]]),
    )
    assert list(result) == ["0", "2"]
    assert result["0"]["l2"] == 0.0 and result["0"]["cosine"] == pytest.approx(1.0)
    assert result["2"]["l2"] == pytest.approx(float((g_layer - g_layer_shift).norm()), rel=1e-9)
    cosine = float(g_layer @ g_layer_shift / (g_layer.norm() * g_layer_shift.norm()))
    assert result["2"]["cosine"] == pytest.approx(cosine, rel=1e-12)
    assert result["2"]["grad_norm"] == pytest.approx(float(g_layer.norm()), rel=1e-12)
    assert result["2"]["l2"] > 1e-4


def make_cnn(layer: str = "bn") -> nn.Sequential:
    norm = {
        "bn": lambda c: nn.BatchNorm2d(c),
        "swbn": lambda c: lw.SWBN(c, group_size=4, whitening_rate=0.5),
        "iternorm": lambda c: lw.IterNorm(c, group_size=4),
        "dbn": lambda c: lw.DBN(c, group_size=4),
    }[layer]
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), norm(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), norm(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def test_covariate_shift_is_zero_when_the_earlier_layers_do_not_move():
    torch.manual_seed(0)
    net = make_cnn("swbn")
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 4, (16,))
    frozen = [*net[0].parameters(), *net[1].parameters()]
    rest = [p for p in net.parameters() if all(p is not q for q in frozen)]
    optimizer = torch.optim.SGD(
        [{"params": frozen, "lr": 0.0}, {"params": rest, "lr": 0.1}], momentum=0.9
    )
    result = D.covariate_shift(net, nn.functional.cross_entropy, (x, y), optimizer)
    assert list(result) == ["0", "3", "8"]
    assert result["0"]["l2"] == 0.0
    # layer 3 is after conv 0 and norm 1 only, which do not move (lr 0): computed, exactly zero
    assert result["3"]["l2"] == 0.0
    assert result["8"]["l2"] > 0 and result["8"]["cosine"] < 1

    layers = D.covariate_shift(net, nn.functional.cross_entropy, (x, y), optimizer, ["4", "8"])
    assert list(layers) == ["4", "8"] and layers["8"] == result["8"]
    spread = D.covariate_shift(net, nn.functional.cross_entropy, (x, y), optimizer, max_layers=2)
    assert spread == {"0": result["0"], "8": result["8"]}  # first and last
    with pytest.raises(ValueError, match="max_layers must be an integer"):
        D.covariate_shift(net, nn.functional.cross_entropy, (x, y), optimizer, max_layers=0)
    with pytest.raises(ValueError, match="no module named"):
        D.covariate_shift(net, nn.functional.cross_entropy, (x, y), optimizer, ["nope"])
    with pytest.raises(ValueError, match="own no trainable parameter"):
        D.covariate_shift(net, nn.functional.cross_entropy, (x, y), optimizer, ["2"])


# ---------------------------------------------------------------------------------------------
# nothing is left changed
# ---------------------------------------------------------------------------------------------


class Counting(nn.Module):
    """Changes plain attributes, a list and draws random numbers in its forward."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.seen: list[int] = []
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        self.calls += 1
        self.seen.append(x.shape[0])
        self.flag_set_in_forward = True
        return self.drop(x)


def full_model(layer: str) -> nn.Sequential:
    net = make_cnn(layer)
    net.insert(3, Counting())
    return net


def snapshot(model: nn.Module, optimizer=None):
    tensors = {
        **{f"p:{n}": (t, t.detach().clone()) for n, t in model.named_parameters()},
        **{f"b:{n}": (t, t.detach().clone()) for n, t in model.named_buffers()},
        **{
            f"g:{n}": (t.grad, t.grad.clone())
            for n, t in model.named_parameters()
            if t.grad is not None
        },
    }
    attrs = {
        n: {k: copy.copy(v) for k, v in vars(m).items() if isinstance(v, (bool, int, float, list))}
        for n, m in model.named_modules()
    }
    opt = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    return tensors, attrs, torch.get_rng_state(), opt


def assert_unchanged(model, before, optimizer=None):
    tensors, attrs, rng, opt = snapshot(model, optimizer)
    old_tensors, old_attrs, old_rng, old_opt = before
    assert tensors.keys() == old_tensors.keys()
    for key, (ref, value) in old_tensors.items():
        now = tensors[key][0]
        assert now is ref, f"{key} is a different tensor"
        assert torch.equal(now, value) and now.dtype == value.dtype, key
    assert attrs == old_attrs
    assert torch.equal(rng, old_rng)
    if optimizer is not None:
        assert opt["param_groups"] == old_opt["param_groups"]
        assert opt["state"].keys() == old_opt["state"].keys()
        for k, entry in old_opt["state"].items():
            assert entry.keys() == opt["state"][k].keys()
            for name, value in entry.items():
                assert torch.equal(torch.as_tensor(opt["state"][k][name]), torch.as_tensor(value))


@pytest.mark.parametrize("layer", ["bn", "iternorm", "dbn", "swbn"])
@pytest.mark.parametrize("optimizer_kind", ["sgd", "adam"])
def test_every_function_leaves_model_and_optimizer_as_they_were(layer, optimizer_kind):
    torch.manual_seed(0)
    net = full_model(layer)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 4, (16,))
    loss_fn = nn.functional.cross_entropy
    if optimizer_kind == "sgd":
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    else:
        optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    loss_fn(net(x), y).backward()  # a real step: running stats, W, momentum, counters
    optimizer.step()
    loss_fn(net(x), y).backward()  # .grad holds values the next step will use
    if layer == "swbn":
        assert not torch.equal(net[1].whitening, torch.eye(4).expand(2, 4, 4))
    before = snapshot(net, optimizer)
    twin = copy.deepcopy(net)
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        q.grad = p.grad.clone()

    D.init_probes(net, (x, y), loss_fn)
    assert_unchanged(net, before, optimizer)
    D.landscape(net, loss_fn, (x, y))
    assert_unchanged(net, before, optimizer)
    D.covariate_shift(net, loss_fn, (x, y), optimizer)
    assert_unchanged(net, before, optimizer)

    # and the user's next step is the step it would have been
    twin_opt = type(optimizer)(twin.parameters(), **optimizer.defaults)
    twin_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for model, opt in ((net, optimizer), (twin, twin_opt)):
        torch.manual_seed(1)  # the same dropout masks
        opt.step()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    for (name, a), b in zip(net.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_restore_keeps_a_rebound_buffer_and_runs_in_training_mode():
    torch.manual_seed(0)
    net = make_cnn("swbn")
    swbn = net[1]
    original = swbn.whitening
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 4, (16,))
    D.landscape(net, nn.functional.cross_entropy, (x, y))
    assert swbn.whitening is original  # SWBN gave its buffer a new tensor in each pass
    assert net.training and swbn.training
    # measured in training mode: the probes see the batch statistics, so the BN output is
    # standardized even though the running statistics are at their initial values
    probes = D.init_probes(make_cnn("bn"), (x * 5 + 3, y), nn.functional.cross_entropy)
    assert probes.layers["0"]["prenorm_std"] > 2
