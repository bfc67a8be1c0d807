"""NormSAM (SAM-ON): one step against a float64 reference of the paper's equations, the
perturbed set, exact restore, frozen buffers, options; the Lightning callback against the
plain-PyTorch loop (precision, clipping, accumulation, logging, resume, DDP)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from reference import sam_perturbation
from torch import nn

import lightning_whiten as lw
from lightning_whiten.sam import is_normalization_layer


# -- a small CNN with BatchNorm and a whitening layer ---------------------------------------------
class SmallCNN(nn.Module):
    """conv-BN-relu, conv-<norm>-relu, pool, linear; plus a normalization layer and a linear
    layer that the forward never uses (their gradients stay None)."""

    def __init__(
        self, second_norm: str = "bn", dtype=torch.float64, first_norm: str = "bn"
    ) -> None:
        super().__init__()
        norms = {
            "bn": lambda: nn.BatchNorm2d(8, dtype=dtype),
            "iternorm": lambda: lw.IterNorm(8, group_size=4, iterations=5, dtype=dtype),
            "swbn": lambda: lw.SWBN(8, group_size=4, whitening_rate=0.1, eps=1e-5, dtype=dtype),
            "groupnorm": lambda: nn.GroupNorm(2, 8, dtype=dtype),
        }
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, dtype=dtype)
        self.bn1 = norms[first_norm]()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False, dtype=dtype)
        self.norm2 = norms[second_norm]()
        self.fc = nn.Linear(8, 4, dtype=dtype)
        self.unused_norm = nn.LayerNorm(4, dtype=dtype)
        self.unused_linear = nn.Linear(4, 4, dtype=dtype)
        with torch.no_grad():  # affine parameters away from 1/0, so T and signs vary
            for norm in (self.bn1, self.norm2):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.norm2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


NORM_PARAMS = {"bn1.weight", "bn1.bias", "norm2.weight", "norm2.bias"}
UNUSED = {"unused_norm.weight", "unused_norm.bias", "unused_linear.weight", "unused_linear.bias"}


def chosen_names(model: nn.Module, params: str) -> set[str]:
    names = {n for n, _ in model.named_parameters()} - UNUSED
    return {"norm": NORM_PARAMS, "all": names, "no_norm": names - NORM_PARAMS}[params]


def batch(seed: int = 0, n: int = 16, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=gen, dtype=dtype) * 1.5 + 0.3
    y = torch.randint(0, 4, (n,), generator=gen)
    return x, y


def loss_fn(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


VARIANTS = [
    # (adaptive, p, layerwise, normalize_bias, params, rho)
    (False, 2, False, False, "norm", 0.3),
    (False, 2, False, False, "all", 0.3),
    (False, 2, False, False, "no_norm", 0.3),
    (False, "inf", False, False, "norm", 0.05),
    (True, 2, False, False, "norm", 2.0),
    (True, 2, False, True, "norm", 2.0),
    (True, 2, False, True, "all", 0.5),
    (True, 2, False, False, "no_norm", 0.5),
    (True, 2, True, False, "norm", 0.5),
    (True, 2, True, True, "norm", 0.5),
    (True, 2, True, True, "all", 0.2),
    (True, "inf", False, False, "norm", 0.05),
    (True, "inf", False, True, "norm", 0.05),
    (True, "inf", True, True, "all", 0.001),
]


def _id(v):
    adaptive, p, layerwise, nb, params, _ = v
    kind = ("ASAM-" + ("layer" if layerwise else "elem")) if adaptive else "SAM"
    return f"{kind}-p{p}-{params}{'-nb' if nb else ''}"


@pytest.mark.parametrize("second_norm", ["bn", "iternorm"])
@pytest.mark.parametrize("variant", VARIANTS, ids=[_id(v) for v in VARIANTS])
def test_one_step_equals_the_float64_reference(variant, second_norm):
    adaptive, p, layerwise, normalize_bias, params, rho = variant
    options = {"rho": rho, "adaptive": adaptive, "eta": 0.01, "p": p, "layerwise": layerwise,
               "normalize_bias": normalize_bias}  # fmt: skip
    torch.manual_seed(0)
    model = SmallCNN(second_norm)
    reference = copy.deepcopy(model)
    x, y = batch()
    lr = 0.1

    # the reference: both passes written out, plain SGD
    ref_params = dict(reference.named_parameters())
    chosen = chosen_names(reference, params)
    grads = dict(zip(ref_params, torch.autograd.grad(loss_fn(reference, x, y), list(ref_params.values()), allow_unused=True), strict=True))  # fmt: skip
    grads_s = {n: g for n, g in grads.items() if n in chosen}
    assert all(g is not None for g in grads_s.values())
    weights = {n: ref_params[n].detach().clone() for n in grads_s}
    eps, operators = sam_perturbation(weights, grads_s, **options)
    with torch.no_grad():
        for n, e in eps.items():
            ref_params[n].add_(e)
    grads2 = torch.autograd.grad(loss_fn(reference, x, y), list(ref_params.values()), allow_unused=True)  # fmt: skip
    with torch.no_grad():
        for n, w in weights.items():
            ref_params[n].copy_(w)
        for q, g in zip(ref_params.values(), grads2, strict=True):
            if g is not None:
                q.sub_(lr * g)

    # NormSAM
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    sam = lw.NormSAM(model, optimizer, params=params, **options)
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    loss_fn(model, x, y).backward()
    sam.first_step(zero_grad=True)
    for n, q in model.named_parameters():
        if n in chosen:  # perturbed by the reference's eps
            torch.testing.assert_close(q - before[n], eps[n], rtol=1e-10, atol=1e-14, msg=n)
            if eps[n].abs().max() > 1e-10:  # (a conv bias before BN has a zero gradient)
                assert not torch.equal(q, before[n]), n
        else:  # untouched: not chosen, or no gradient (the unused layers)
            assert torch.equal(q, before[n]), n
        assert q.grad is None
    # the perturbation has radius rho in the norm of the method
    delta = torch.cat([(dict(model.named_parameters())[n].detach() - before[n]).flatten() / operators[n].flatten() for n in eps])  # fmt: skip
    if p == 2:
        assert float(delta.norm()) == pytest.approx(rho, rel=1e-10)
    else:
        assert float(delta.abs().max()) == pytest.approx(rho, rel=1e-10)
    assert float(sam.perturbation_norm) == pytest.approx(float(torch.cat([e.flatten() for e in eps.values()]).norm()), rel=1e-10)  # fmt: skip
    loss_fn(model, x, y).backward()
    sam.second_step(zero_grad=True)

    for (n, q), (_, r) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(q, r, rtol=1e-10, atol=1e-13, msg=n)
    for (n, b), (_, r) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        torch.testing.assert_close(b, r, rtol=1e-10, atol=1e-13, msg=n)  # updated in both passes


@pytest.mark.parametrize("params", ["norm", "all"])
def test_parameters_are_restored_exactly(params):
    torch.manual_seed(0)
    model = SmallCNN("iternorm")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the step itself changes nothing
    sam = lw.NormSAM(model, optimizer, rho=0.5, adaptive=True, normalize_bias=True, params=params)
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    x, y = batch()
    loss_fn(model, x, y).backward()
    sam.first_step()
    assert any(not torch.equal(q, before[n]) for n, q in model.named_parameters())
    loss_fn(model, x, y).backward()
    sam.second_step()
    for n, q in model.named_parameters():
        assert torch.equal(q, before[n]), n


@pytest.mark.parametrize("second_norm", ["bn", "iternorm", "swbn"])
@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_buffers_are_unchanged_by_the_second_pass(second_norm, freeze):
    torch.manual_seed(0)
    model = SmallCNN(second_norm)
    sam = lw.NormSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), freeze_norm_stats=freeze)
    x, y = batch()
    loss_fn(model, x, y).backward()
    sam.first_step()
    after_first = {n: b.clone() for n, b in model.named_buffers()}
    assert not torch.equal(after_first["bn1.running_mean"], torch.zeros(8))  # pass 1 updated them
    loss_fn(model, x, y).backward()
    sam.second_step()
    changed = {n for n, b in model.named_buffers() if not torch.equal(b, after_first[n])}
    if freeze:
        assert not changed
    else:  # the authors' behaviour: the second pass updates them again
        assert {"bn1.running_mean", "norm2.num_batches_tracked"} <= changed
        if second_norm == "swbn":
            assert "norm2.whitening" in changed
        if second_norm == "iternorm":
            assert "norm2.running_whitening" in changed
    assert model.training


def test_the_closure_form_equals_the_two_step_form():
    torch.manual_seed(0)
    a = SmallCNN("iternorm")
    b = copy.deepcopy(a)
    options = {"rho": 2.0, "adaptive": True, "normalize_bias": True}
    sam_a = lw.NormSAM(a, torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), **options)
    sam_b = lw.NormSAM(b, torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), **options)
    for step in range(3):
        x, y = batch(step)
        loss_fn(a, x, y).backward()
        sam_a.first_step()
        perturbed = loss_fn(a, x, y)
        perturbed.backward()
        sam_a.second_step()
        loss = sam_b.step(lambda x=x, y=y: loss_fn(b, x, y))
        assert loss.grad_fn is None and float(sam_b.perturbed_loss) == pytest.approx(float(perturbed.detach()), rel=1e-12)  # fmt: skip
    for (n, q), r in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, r, rtol=1e-10, atol=1e-13, msg=n)


def test_unscales_the_gradients_of_a_grad_scaler():
    torch.manual_seed(0)
    a = SmallCNN("bn")
    b = copy.deepcopy(a)
    x, y = batch()
    sam_a = lw.NormSAM(a, torch.optim.SGD(a.parameters(), lr=0.1))
    sam_b = lw.NormSAM(b, torch.optim.SGD(b.parameters(), lr=0.1))
    loss_fn(a, x, y).backward()
    sam_a.first_step()
    (loss_fn(b, x, y) * 1024.0).backward()  # what GradScaler.scale(loss).backward() leaves
    sam_b.first_step(grad_scale=torch.tensor(1024.0))
    assert float(sam_b.grad_norm) == pytest.approx(float(sam_a.grad_norm), rel=1e-12)
    for q, r in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, r, rtol=1e-12, atol=1e-15)


def test_a_non_finite_gradient_gives_no_perturbation():
    torch.manual_seed(0)
    model = SmallCNN("bn")
    sam = lw.NormSAM(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = [q.detach().clone() for q in model.parameters()]
    x, y = batch()
    loss_fn(model, x, y).backward()
    model.bn1.weight.grad[0] = float("inf")  # an fp16 overflow
    sam.first_step()
    assert all(torch.equal(q, r) for q, r in zip(model.parameters(), before, strict=True))
    assert not math.isfinite(float(sam.grad_norm))


def test_normalization_layers_are_found_by_type():
    import timm.layers
    import torchvision

    norms = [
        nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.BatchNorm3d(4), nn.SyncBatchNorm(4),
        nn.InstanceNorm2d(4, affine=True), nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.RMSNorm(4),
        nn.LazyBatchNorm2d(),
        timm.layers.BatchNormAct2d(4), timm.layers.GroupNormAct(4, num_groups=2), timm.layers.LayerNorm2d(4),
        timm.layers.RmsNorm(4), timm.layers.norm_act.FrozenBatchNormAct2d(4),
        torchvision.ops.FrozenBatchNorm2d(4),
        lw.IterNorm(4), lw.DBN(4), lw.SWBN(4), lw.IterNormAct(4), lw.SWBNAct(4),
    ]  # fmt: skip
    for m in norms:
        assert is_normalization_layer(m), type(m).__name__
    for m in (nn.Conv2d(4, 4, 1), nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.BatchNorm2d(4))):
        assert not is_normalization_layer(m), type(m).__name__

    # torchvision's downsample BatchNorms ("downsample.1": no "bn"/"norm" in the name) are
    # chosen, and a linear layer called "norm_proj" is not (the authors select by name)
    model = torchvision.models.resnet18(num_classes=4)
    model.norm_proj = nn.Linear(4, 4)
    sam = lw.NormSAM(model, torch.optim.SGD(model.parameters(), lr=0.1))
    names = {n for n, _ in sam.named_parameters}
    assert {"layer2.0.downsample.1.weight", "layer2.0.downsample.1.bias"} <= names
    assert not any(n.startswith(("norm_proj", "fc", "conv")) for n in names)
    assert len(names) == 2 * sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # timm BatchNormAct2d with a PReLU: the activation's weight is not a norm parameter
    layer = timm.layers.BatchNormAct2d(4, act_layer=nn.PReLU)
    sam = lw.NormSAM(nn.Sequential(layer), torch.optim.SGD(layer.parameters(), lr=0.1))
    assert {n for n, _ in sam.named_parameters} == {"0.weight", "0.bias"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": 0.0}, r"NormSAM: rho must be a positive number, got 0.0"),
        ({"rho": -1}, r"rho must be a positive number"),
        ({"rho": float("nan")}, r"rho must be a positive number"),
        ({"rho": float("inf")}, r"rho must be finite"),
        ({"params": "bn"}, r"params must be one of \('norm', 'all', 'no_norm'\), got 'bn'"),
        ({"p": 1}, r"p must be 2 or 'inf', got 1"),
        ({"p": "3"}, r"p must be 2 or 'inf'"),
        ({"eta": -0.1}, r"eta must be a number >= 0"),
        ({"layerwise": True}, r"layerwise=True only applies to ASAM.*adaptive=True"),
        ({"normalize_bias": True}, r"normalize_bias=True only applies to ASAM"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, match):
    model = SmallCNN()
    with pytest.raises(ValueError, match=match):
        lw.NormSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_misuse_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"params='norm' selects no parameter of Sequential.*normalization"):  # fmt: skip
        lw.NormSAM(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model = SmallCNN()
    sam = lw.NormSAM(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="second_step called without first_step"):
        sam.second_step()
    x, y = batch()
    loss_fn(model, x, y).backward()
    sam.first_step()
    with pytest.raises(RuntimeError, match="first_step called twice"):
        sam.first_step()
    sam.restore()

    def closure_with_backward():
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="closure must return the loss without calling backward"):
        sam.step(closure_with_backward)
    with pytest.raises(ValueError, match="the loss has no graph"):
        sam.step(lambda: loss_fn(model, x, y).detach())


def test_p_and_spellings():
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for p, expected in itertools.product((2, "2", 2.0), [2]):
        assert lw.NormSAM(model, opt, p=p).p == expected
    for p in ("inf", "infinity", math.inf):
        assert lw.NormSAM(model, opt, p=p).p == "inf"
    assert "SAM, rho=0.05" in repr(lw.NormSAM(model, opt))


def test_the_norm_guard_is_added_after_the_norm():
    # The official code divides by ||T g|| + 1e-16: visible only for tiny gradients.
    torch.manual_seed(0)
    model = SmallCNN("bn")
    sam = lw.NormSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), rho=1.0)
    x, y = batch()
    (loss_fn(model, x, y) * 1e-17).backward()
    grad_norm = float(torch.cat([q.grad.flatten() for n, q in model.named_parameters() if n in NORM_PARAMS]).norm())  # fmt: skip
    sam.first_step()
    expected = grad_norm / (grad_norm + 1e-16)
    assert 0.01 < expected < 0.9
    assert float(sam.perturbation_norm) == pytest.approx(expected, rel=1e-9)


def _ddp_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        # per-sample normalization: the ranks' halves together are the batch
        single = SmallCNN("groupnorm", first_norm="groupnorm")
        model = copy.deepcopy(single)
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        options = {"rho": 2.0, "adaptive": True, "normalize_bias": True}
        sam = lw.NormSAM(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9), **options)
        reference = lw.NormSAM(single, torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9), **options)  # fmt: skip
        errors = []
        mine = slice(rank * 8, rank * 8 + 8)
        for step in range(4):
            x, y = batch(step, n=16)
            if step % 2 == 0:  # the closure form: first pass without sync, then one all-reduce
                sam.step(lambda x=x, y=y: loss_fn(ddp, x[mine], y[mine]))
            else:  # the two-step form: DDP syncs both backward passes itself
                loss_fn(ddp, x[mine], y[mine]).backward()
                sam.first_step()
                loss_fn(ddp, x[mine], y[mine]).backward()
                sam.second_step()
            reference.step(lambda x=x, y=y: loss_fn(single, x, y))
            for (name, a), b in zip(model.named_parameters(), single.parameters(), strict=True):
                if not torch.allclose(a, b, rtol=1e-10, atol=1e-12):
                    errors.append(f"step {step} {name}: {(a - b).abs().max():.3g}")
        torch.save(errors, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    import tempfile

    import torch.multiprocessing as mp

    init_file = tempfile.mktemp(dir=tmp_path)
    result = str(tmp_path / "result")
    mp.spawn(_ddp_worker, args=(2, init_file, result), nprocs=2, join=True)
    for rank in range(2):
        errors = torch.load(f"{result}.{rank}")
        assert not errors, "\n".join(errors)


def test_the_minimizer_does_not_import_lightning():
    import subprocess
    import sys

    code = (
        "import sys, lightning_whiten as lw; lw.NormSAM; "
        "assert 'lightning' not in sys.modules and 'lightning.pytorch' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
