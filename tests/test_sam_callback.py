"""NormSAMCallback in a real Trainer, against the plain-PyTorch NormSAM loop on the same data
and seed: SAM-ON/ASAM-ON, epoch bounds, frozen statistics, logging, gradient clipping,
accumulation, bf16 / fp16 with a GradScaler, WhiteningCallback, resume and DDP."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from lightning_helpers import make_data
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

import lightning_whiten as lw


def build_net(norm: str = "bn", width: int = 16) -> nn.Sequential:
    def make_norm():
        return nn.BatchNorm2d(width) if norm == "bn" else nn.GroupNorm(4, width)

    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), make_norm(), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False), make_norm(), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4),
    )  # fmt: skip


class SAMModule(pl.LightningModule):
    """Logs its loss (step and epoch) and a torchmetrics accuracy (epoch), as recipes do."""

    def __init__(self, norm: str = "bn", lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_net(norm)
        self.acc = MulticlassAccuracy(4, average="micro")
        self.losses: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        self.log("train/acc", self.acc, on_step=False, on_epoch=True)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4
        )


class RecordingLogger(Logger):
    name = "recording"
    version = 0

    def __init__(self):
        super().__init__()
        self.metrics: list[dict] = []

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def values(self, key):
        return [m[key] for m in self.metrics if key in m]


def loader(batch_size: int = 16, n: int = 96) -> DataLoader:
    return DataLoader(make_data(n), batch_size=batch_size, shuffle=False)


def fit(model, callbacks, tmp_path, **kwargs) -> Trainer:
    options = {
        "default_root_dir": tmp_path, "accelerator": "cpu", "devices": 1, "max_epochs": 1,
        "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
        "enable_checkpointing": False, "log_every_n_steps": 1, **kwargs,
    }  # fmt: skip
    data = options.pop("data", None) or loader()
    ckpt_path = options.pop("ckpt_path", None)
    trainer = Trainer(callbacks=callbacks, **options)
    if isinstance(data, pl.LightningDataModule):
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    else:
        trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


def plain_loop(
    model, epochs=1, sam_options=None, start_epoch=0, clip=None, data=None, autocast=None
):
    """The plain-PyTorch NormSAM loop the callback must reproduce; returns per-step records."""
    optimizer = model.configure_optimizers()
    sam = lw.NormSAM(model, optimizer, **(sam_options or {}))
    records = []
    for epoch in range(epochs):
        for x, y in data or loader():
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            loss.backward()
            record = {"loss": float(loss.detach()), "correct": int((logits.argmax(1) == y).sum())}
            if epoch >= start_epoch:
                sam.first_step(zero_grad=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
                    perturbed = F.cross_entropy(model(x), y)
                perturbed.backward()
                record["sharpness"] = float(perturbed.detach()) - float(loss.detach())
                record["perturbation_norm"] = float(sam.perturbation_norm)
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                sam.second_step(zero_grad=True)
            else:
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
            records.append(record)
    return records


def assert_same_model(a: nn.Module, b: nn.Module, rtol=1e-5, atol=1e-6) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=name)
        else:
            assert torch.equal(x, y), name


@pytest.mark.parametrize(
    ("options", "start_epoch"),
    [
        ({}, 0),  # SAM-ON with the defaults
        ({"rho": 2.0, "adaptive": True, "normalize_bias": True}, 0),  # ASAM-ON (elementwise)
        ({"rho": 0.05, "params": "all", "freeze_norm_stats": True}, 0),  # full SAM, frozen BN
        ({"rho": 0.1}, 1),  # plain steps in epoch 0 (start_epoch)
    ],
    ids=["sam_on", "asam_on", "sam_all_frozen", "start_epoch"],
)
def test_callback_equals_the_plain_loop(tmp_path, options, start_epoch):
    seed_everything(0)
    model = SAMModule()
    reference = copy.deepcopy(model)
    callback = lw.NormSAMCallback(**options, start_epoch=start_epoch)
    fit(model, [callback], tmp_path, max_epochs=2)
    plain_loop(reference, epochs=2, sam_options=options, start_epoch=start_epoch)
    assert_same_model(model, reference)
    assert callback.sam_steps == 6 * (2 - start_epoch)
    assert "optimizer_step" not in model.__dict__  # the hook is handed back after fit


def test_logs_the_unperturbed_loss_once_and_the_sharpness(tmp_path):
    seed_everything(0)
    model = SAMModule()
    reference = copy.deepcopy(model)
    logger = RecordingLogger()
    fit(model, [lw.NormSAMCallback(rho=0.5, timing_every_n_steps=2)], tmp_path, logger=logger)
    records = plain_loop(reference, sam_options={"rho": 0.5})
    # train/loss: the first pass, at the unperturbed weights; once per step
    assert logger.values("train/loss_step") == pytest.approx([r["loss"] for r in records], rel=1e-5)
    assert logger.values("train/loss_epoch") == pytest.approx(
        [sum(r["loss"] for r in records) / 6], rel=1e-5
    )
    # the accuracy metric saw each batch once (the first pass's predictions)
    assert logger.values("train/acc") == pytest.approx(
        [sum(r["correct"] for r in records) / 96], abs=1e-6
    )
    assert len(model.losses) == 12  # training_step itself ran twice per step
    assert logger.values("sam/sharpness_step") == pytest.approx(
        [r["sharpness"] for r in records], rel=1e-4, abs=1e-6
    )
    assert logger.values("sam/perturbation_norm") == pytest.approx([0.5] * 6, rel=1e-5)
    timing = logger.values("sam/overhead_pct")
    assert len(timing) == 3 and all(t > 0 for t in timing)  # every 2nd step


def test_gradient_clipping_applies_to_the_second_gradient_only(tmp_path):
    seed_everything(0)
    model = SAMModule(lr=0.5)
    reference = copy.deepcopy(model)
    unclipped = copy.deepcopy(model)
    fit(model, [lw.NormSAMCallback(rho=0.5)], tmp_path, gradient_clip_val=0.05)
    plain_loop(reference, sam_options={"rho": 0.5}, clip=0.05)
    assert_same_model(model, reference)
    plain_loop(unclipped, sam_options={"rho": 0.5})
    assert not torch.allclose(model.net[0].weight, unclipped.net[0].weight, rtol=1e-3)


def test_accumulated_micro_batches_are_replayed_at_the_perturbed_point(tmp_path):
    # GroupNorm: the model is batch-independent, so 2 x 8 accumulated equals 16 at once.
    seed_everything(0)
    whole = SAMModule(norm="groupnorm")
    accumulated = copy.deepcopy(whole)
    reference = copy.deepcopy(whole)
    options = {"rho": 2.0, "adaptive": True, "normalize_bias": True}
    logger = RecordingLogger()
    fit(whole, [lw.NormSAMCallback(**options)], tmp_path)
    callback = lw.NormSAMCallback(**options)
    fit(accumulated, [callback], tmp_path, data=loader(batch_size=8), accumulate_grad_batches=2, logger=logger)  # fmt: skip
    records = plain_loop(reference, sam_options=options)
    assert callback.sam_steps == 6
    assert_same_model(accumulated, whole)
    assert_same_model(accumulated, reference)
    # the sharpness is of the whole step: every micro-batch's loss, perturbed minus not
    assert logger.values("sam/sharpness_step") == pytest.approx(
        [r["sharpness"] for r in records], rel=1e-4, abs=1e-6
    )


def test_bf16_mixed_equals_the_autocast_loop(tmp_path):
    seed_everything(0)
    model = SAMModule()
    reference = copy.deepcopy(model)
    fit(model, [lw.NormSAMCallback(rho=0.5)], tmp_path, precision="bf16-mixed")
    plain_loop(reference, sam_options={"rho": 0.5}, autocast=torch.bfloat16)
    assert_same_model(model, reference, rtol=1e-4, atol=1e-5)


def test_fp16_with_a_grad_scaler_uses_unscaled_gradients(tmp_path):
    def run(init_scale):
        seed_everything(0)
        model = SAMModule()
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10_000)
        logger = RecordingLogger()
        fit(model, [lw.NormSAMCallback(rho=0.5)], tmp_path, logger=logger,
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])  # fmt: skip
        return model, logger

    scaled, scaled_log = run(2.0**12)
    unscaled, unscaled_log = run(1.0)
    seed_everything(0)
    full = SAMModule()
    fp32_log = RecordingLogger()
    fit(full, [lw.NormSAMCallback(rho=0.5)], tmp_path, logger=fp32_log)
    # the gradient norm of the ascent is the true one, whatever the loss scale
    grad_norms = scaled_log.values("sam/grad_norm")
    assert grad_norms == pytest.approx(unscaled_log.values("sam/grad_norm"), rel=5e-3)
    assert grad_norms == pytest.approx(fp32_log.values("sam/grad_norm"), rel=1e-2)
    assert scaled_log.values("sam/perturbation_norm") == pytest.approx([0.5] * 6, rel=1e-5)
    # (fp16 rounding: the two scales and fp32 agree to about 3e-4 on weights of size 0.1-1)
    assert_same_model(scaled, unscaled, rtol=1e-2, atol=1e-3)
    assert_same_model(scaled, full, rtol=1e-2, atol=2e-3)


def test_whitening_layers_are_perturbed_with_the_whitening_callback(tmp_path):
    seed_everything(0)
    model = SAMModule()
    reference = copy.deepcopy(model)
    callback = lw.NormSAMCallback(rho=0.5, freeze_norm_stats=True)
    # no recalibration: the plain loop it is compared with keeps the running statistics as is
    whitening = lw.WhiteningCallback(
        "iternorm", layer_options={"group_size": 8}, log_report=False, recalibrate_batches=0
    )
    fit(model, [whitening, callback], tmp_path)
    names = {n for n, _ in callback.sam.named_parameters}
    assert names == {"net.1.weight", "net.1.bias", "net.4.weight", "net.4.bias"}
    assert isinstance(model.net[1], lw.IterNorm)
    lw.convert(reference, "iternorm", group_size=8)
    plain_loop(reference, sam_options={"rho": 0.5, "freeze_norm_stats": True})
    assert_same_model(model, reference)


def test_resume_gives_the_same_losses(tmp_path):
    def run(name, max_epochs, resume=None):
        seed_everything(0)
        model = SAMModule()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1, every_n_epochs=1)
        callbacks = [
            lw.WhiteningCallback("iternorm", layer_options={"group_size": 8}, log_report=False),
            lw.NormSAMCallback(rho=2.0, adaptive=True, normalize_bias=True, start_epoch=1),
            checkpoint,
        ]
        fit(model, callbacks, tmp_path / name, max_epochs=max_epochs, enable_checkpointing=True,
            ckpt_path=resume)  # fmt: skip
        return model

    full = run("full", 3)
    run("first", 1)
    ckpt = sorted((tmp_path / "first").glob("*.ckpt"))[-1]
    resumed = run("resumed", 3, resume=str(ckpt))
    # epoch 0: 6 plain steps (1 pass each); epochs 1-2: 12 SAM steps (2 passes each)
    assert len(full.losses) == 6 + 24 and len(resumed.losses) == 24
    assert resumed.losses == pytest.approx(full.losses[6:], rel=1e-6, abs=1e-7)
    assert_same_model(resumed, full)


class ManualModule(SAMModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


class LBFGSModule(SAMModule):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": 0}, r"NormSAMCallback: rho must be a positive number"),
        ({"params": "norms"}, r"NormSAMCallback: params must be one of"),
        ({"p": 1}, r"NormSAMCallback: p must be 2 or 'inf', got 1"),
        ({"start_epoch": 2, "end_epoch": 2}, r"end_epoch must be None or an integer > start_epoch"),
        ({"start_epoch": -1}, r"start_epoch must be an integer >= 0"),
        ({"timing_every_n_steps": -1}, r"timing_every_n_steps must be an integer >= 0"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lw.NormSAMCallback(**kwargs)


def test_unsupported_setups_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="needs automatic optimization"):
        fit(ManualModule(), [lw.NormSAMCallback()], tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="LBFGS"):
        fit(LBFGSModule(), [lw.NormSAMCallback()], tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="more than one NormSAMCallback"):
        fit(SAMModule(), [lw.NormSAMCallback(), lw.NormSAMCallback()], tmp_path, max_steps=1)


# -- DDP: 2 gloo processes equal one process holding the whole batch -----------------------------
class RankSlices(pl.LightningDataModule):
    """Rank r of w gets samples r, r + w, r + 2w, ... in order: its batch j and the other
    ranks' batch j together are exactly the single process's batch j (Lightning's automatic
    DistributedSampler would shuffle)."""

    def __init__(self, batch_size: int, n: int = 96):
        super().__init__()
        self.batch_size, self.n = batch_size, n

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        subset = torch.utils.data.Subset(make_data(self.n), list(range(rank, self.n, world)))
        return DataLoader(subset, batch_size=self.batch_size, shuffle=False)


class DumpState(pl.Callback):
    def __init__(self, directory: str):
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, f"{self.directory}/rank{trainer.global_rank}.pt")


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_equals_one_process_with_the_whole_batch(tmp_path):
    # IterNorm syncs its statistics across the ranks, so the model sees the global batch; the
    # ascent uses the all-reduced gradient (the full-batch method).
    def callbacks():
        return [
            lw.WhiteningCallback("iternorm", layer_options={"group_size": 8}, log_report=False),
            lw.NormSAMCallback(rho=2.0, adaptive=True, normalize_bias=True),
        ]

    seed_everything(0)
    single = SAMModule()
    distributed = copy.deepcopy(single)
    fit(single, callbacks(), tmp_path, max_steps=4, data=loader(batch_size=16))
    fit(distributed, [*callbacks(), DumpState(str(tmp_path))], tmp_path, max_steps=4,
        data=RankSlices(batch_size=8), devices=2, use_distributed_sampler=False,
        strategy=DDPStrategy(start_method="spawn"))  # fmt: skip
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    for key, value in single.state_dict().items():
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6, msg=key)
