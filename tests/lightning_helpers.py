"""Small LightningModules and data for the callback tests (importable by spawned processes)."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(n: int = 96, seed: int = 0, size: int = 8) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(4, 3, size, size, generator=gen)
    labels = torch.randint(0, 4, (n,), generator=gen)
    images = prototypes[labels] + 0.5 * torch.randn(n, 3, size, size, generator=gen)
    return TensorDataset(images, labels)


def loader(batch_size: int = 16, n: int = 96, seed: int = 0) -> DataLoader:
    # no shuffling: resumed and uninterrupted runs must see the same batches
    return DataLoader(make_data(n, seed), batch_size=batch_size, shuffle=False)


def build_net(width: int = 32, num_classes: int = 4) -> nn.Sequential:
    """Two conv-BN-ReLU blocks, pooled, and a linear classifier (3-channel input)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )  # fmt: skip


class TinyClassifier(pl.LightningModule):
    """A small CNN; ``build_in="configure_model"`` builds the network lazily (idempotently)."""

    def __init__(
        self, lr: float = 0.05, build_in: str = "init", step_lr: bool = False, width: int = 32
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net: nn.Module | None = build_net(width) if build_in == "init" else None
        # an auxiliary head that training does not use (for the sync_batchnorm test)
        self.aux = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.losses: list[float] = []
        self.seen: list[dict] = []

    def configure_model(self) -> None:
        if self.net is None:
            self.net = build_net(self.hparams.width)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        layer = next((m for m in self.modules() if hasattr(m, "group_size")), None)
        if layer is not None:
            self.seen.append(
                {
                    k: getattr(layer, k)
                    for k in ("iterations", "whitening_rate", "momentum")
                    if hasattr(layer, k)
                }
            )
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        if not self.hparams.step_lr:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class BufferDump(pl.Callback):
    """Writes each rank's whitening buffers at the end of fit (DDP tests)."""

    def __init__(self, directory: str):
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        from lightning_whiten.layers import WhiteningNorm

        buffers = {
            f"{name}.{b}": t.detach().cpu().clone()
            for name, m in pl_module.named_modules()
            if isinstance(m, WhiteningNorm)
            for b, t in m.named_buffers(recurse=False)
            if t is not None
        }
        types = {name: type(m).__name__ for name, m in pl_module.named_modules() if name}
        monitors = [c for c in trainer.callbacks if type(c).__name__ == "WhiteningMonitor"]
        sampled = len(monitors[0].step_ms) if monitors else None
        torch.save(
            {"buffers": buffers, "types": types, "monitor_sampled": sampled},
            os.path.join(self.directory, f"rank{trainer.global_rank}.pt"),
        )


def fit_readme_yaml(example: str, tmp_path, backbone: str = "cifar/resnetv2_20",
                    image_size: int = 16, **trainer):  # fmt: skip
    """Run ``lightning-whiten fit`` on a README YAML snippet (its ``trainer`` section), with a
    tiny model and synthetic data filled in; returns the CLI object."""
    import yaml

    from lightning_whiten.cli import run

    config = yaml.safe_load(example)
    config["trainer"].update(
        {"logger": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path),
         "accelerator": "cpu", **trainer}
    )  # fmt: skip
    config["model"] = {
        "class_path": "lightning_whiten.ImageClassifier",
        "init_args": {"backbone": backbone, "num_classes": 4},
    }
    config["data"] = {
        "class_path": "lightning_whiten.data.SyntheticImages",
        "init_args": {"num_classes": 4, "image_size": image_size, "num_train": 16, "num_val": 8,
                      "batch_size": 8},
    }  # fmt: skip
    config["seed_everything"] = 0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return run(["fit", "--config", str(path)])


class StateDump(pl.Callback):
    """Writes each rank's full state dict (DTensors gathered) and module types at the end of fit."""

    def __init__(self, directory: str):
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        state = {}
        for key, value in pl_module.state_dict().items():
            if hasattr(value, "full_tensor"):  # FSDP2: the whole tensor, on every rank
                value = value.full_tensor()
            state[key] = value.detach().cpu().clone()
        types = {name: type(m).__name__ for name, m in pl_module.named_modules() if name}
        sharded = sorted(
            name
            for name, p in pl_module.named_parameters()
            if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor"
        )
        torch.save(
            {"state": state, "types": types, "sharded": sharded},
            os.path.join(self.directory, f"rank{trainer.global_rank}.pt"),
        )


class ShardedClassifier(TinyClassifier):
    """FSDP2 in ``configure_model`` (ModelParallelStrategy): ``fully_shard`` per convolution and
    on the network. ``build_in="configure_model"`` builds the network there too, converting it
    first with ``lw.convert_in_configure_model`` when ``convert_first``."""

    def __init__(self, build_in: str = "init", convert_first: bool = True, **kwargs):
        super().__init__(build_in=build_in, **kwargs)
        self.convert_first = convert_first
        self._sharded = False

    def configure_model(self) -> None:
        if self._sharded:  # idempotent, as Lightning asks
            return
        from torch.distributed.fsdp import fully_shard

        import lightning_whiten as lw

        if self.net is None:
            self.net = build_net(self.hparams.width)
            if self.convert_first:
                lw.convert_in_configure_model(self)
        mesh = self.device_mesh["data_parallel"]
        for module in self.net:
            if isinstance(module, nn.Conv2d):
                fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)
        self._sharded = True


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    """A quiet one-epoch CPU Trainer writing under ``tmp_path`` (``kwargs`` override)."""
    options = {
        "default_root_dir": tmp_path,
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        **kwargs,
    }
    return pl.Trainer(callbacks=callbacks, **options)
