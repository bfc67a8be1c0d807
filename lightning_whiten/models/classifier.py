"""``ImageClassifier``: a LightningModule around a timm, torchvision or CIFAR backbone."""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ..adversarial import AdversarialTraining, InputSpace, RobustEvaluation, robust_predictions
from .cifar import CIFAR_MODELS
from .small import SMALL_MODELS

__all__ = ["ImageClassifier", "create_backbone"]


class _Accuracy(MulticlassAccuracy):
    """``MulticlassAccuracy`` that never reports more than 1: its macro average is a weighted
    sum of per-class rates, and ten weights of 0.1 sum to 1 + 1.2e-7 in float32 (val/acc5
    read 1.0000001 when every sample was in the top 5)."""

    def compute(self) -> Tensor:
        return super().compute().clamp(max=1.0)


def _load_matching(model: nn.Module, path: str) -> None:
    """Load a state dict file into ``model``, keeping only tensors whose shapes fit (so a
    classifier for another number of classes is left freshly initialized)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(kept))
    missing = sorted(set(own) - set(kept))
    if not kept:
        raise ValueError(f"checkpoint {path!r} has no tensor matching the backbone's parameters")
    model.load_state_dict(kept, strict=False)
    if skipped or missing:
        warnings.warn(
            f"loaded {len(kept)} tensors from {path}; left freshly initialized: "
            f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}",
            UserWarning,
            stacklevel=3,
        )


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    **options: Any,
) -> nn.Module:
    """A classification network by name: ``"timm/<model>"``, ``"torchvision/<model>"``,
    ``"cifar/<model>"`` (``wrn28_10``, ``wrn16_4``, ``vgg``, ``resnetv2_56``, ``resnetv2_20``;
    options ``norm``, ``norm_options``) or ``"small/<model>"`` (``mlp``, ``row_rnn``, ``conv_gru``: the online
    and recurrent networks of :mod:`lightning_whiten.models.small`).

    ``checkpoint_path`` loads weights from a local file (timm's ``pretrained_cfg_overlay=
    {"file": ...}`` for timm models); a classifier for another number of classes is
    re-initialized. ``pretrained=True`` without a file downloads weights (needs network).
    """
    library, _, arch = name.partition("/")
    if not arch:
        raise ValueError(
            f"backbone {name!r}: expected 'timm/<model>', 'torchvision/<model>', 'cifar/<model>' "
            "or 'small/<model>'"
        )
    if checkpoint_path is not None and not Path(checkpoint_path).is_file():
        raise FileNotFoundError(
            f"backbone {name!r}: checkpoint_path {str(checkpoint_path)!r} is not a file "
            f"(working directory: {Path.cwd()})"
        )
    try:
        if library == "timm":
            import timm

            kwargs: dict[str, Any] = {"num_classes": num_classes, **options}
            if checkpoint_path is not None:
                kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint_path)}
            return timm.create_model(
                arch, pretrained=pretrained or checkpoint_path is not None, **kwargs
            )
        if library == "torchvision":
            import torchvision

            weights = "DEFAULT" if pretrained and checkpoint_path is None else None
            if weights is not None:
                model = torchvision.models.get_model(arch, weights=weights, **options)
                _replace_head(model, num_classes)
                return model
            model = torchvision.models.get_model(
                arch, weights=None, num_classes=num_classes, **options
            )
        elif library in ("cifar", "small"):
            registry = CIFAR_MODELS if library == "cifar" else SMALL_MODELS
            if arch not in registry:
                raise ValueError(
                    f"unknown {'CIFAR' if library == 'cifar' else library} backbone {arch!r}: "
                    f"choose one of {sorted(registry)}"
                )
            if pretrained and checkpoint_path is None:
                raise ValueError(
                    f"{library} backbones have no downloadable weights: pass checkpoint_path"
                )
            factory = registry[arch]
            accepted = [p for p in inspect.signature(factory).parameters if p != "num_classes"]
            unknown = sorted(set(options) - set(accepted))
            if unknown:
                raise TypeError(
                    f"backbone {name!r} does not take the option(s) {unknown} in backbone_options "
                    f"(it takes: {', '.join(accepted) or 'none'})"
                )
            model = factory(num_classes, **options)
        else:
            raise ValueError(
                f"backbone {name!r}: unknown library {library!r} (timm, torchvision, cifar or small)"
            )
    except (OSError, RuntimeError) as err:
        if pretrained and checkpoint_path is None:
            raise RuntimeError(
                f"could not get pretrained weights for {name!r} ({err}); without network access, "
                "save the weights to a file and pass checkpoint_path"
            ) from err
        raise
    if checkpoint_path is not None:
        _load_matching(model, str(checkpoint_path))
    return model


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Fit a torchvision classifier's last linear layer to ``num_classes``."""
    for name in ("fc", "classifier", "head", "heads"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            if head.out_features != num_classes:
                setattr(model, name, nn.Linear(head.in_features, num_classes))
            return
        if isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear):
            if head[-1].out_features != num_classes:
                head[-1] = nn.Linear(head[-1].in_features, num_classes)
            return
    raise ValueError(f"cannot find the classifier of {type(model).__name__} to resize")


class ImageClassifier(pl.LightningModule):
    """Image classification with a backbone from timm, torchvision or the CIFAR models.

    Training batches of one sample (online learning) need a network whose normalization layers
    do not use batch statistics (:class:`StreamingNorm`, LayerNorm, none): with BatchNorm,
    LpNorm or a whitening layer in training mode the first such batch raises an error naming
    the layer.

    Args:
        backbone: ``"timm/resnet18"``, ``"torchvision/resnet18"``, ``"cifar/wrn28_10"``,
            ``"small/mlp"``, ...
        num_classes: output classes (the CLI links it from the datamodule).
        pretrained: download pretrained weights (needs network; see ``checkpoint_path``).
        checkpoint_path: load backbone weights from a local file.
        backbone_options: extra keyword arguments of the backbone constructor.
        optimizer: ``"sgd"`` (with ``momentum``, ``nesterov``) or ``"adamw"``.
        lr, weight_decay: optimizer settings.
        lr_schedule: ``"cosine"`` (to 0 over the run), ``"step"`` (times ``gamma`` at each
            epoch in ``milestones``) or ``"constant"``; all with ``warmup_epochs`` of linear
            warmup, applied per optimizer step.
        label_smoothing: of the cross-entropy loss.
        channels_last: run the backbone in channels_last memory format.
        adversarial: adversarial training options (:class:`lightning_whiten.adversarial.
            AdversarialTraining`), e.g. ``{method: fgsm_rs, epsilon: 8/255}`` or the ConvNorm
            paper's ``{method: free, epsilon: 8/255, step_size: 8/255, replays: 4}``
            (``"free"`` uses manual optimization: one optimizer step per replay, so
            ``global_step`` counts replays; the learning-rate schedule still advances once per
            batch). The attack loss is plain cross-entropy; training uses ``label_smoothing``.
        robust_eval: robust accuracy at validation/test (:class:`lightning_whiten.adversarial.
            RobustEvaluation`), e.g. ``{epsilon: 8/255, pgd_steps: 20, pgd_step_size: 2/255}``;
            logs ``val/acc_pgd20`` and ``val/acc_fgsm`` (``test/...`` in test).
        pixel_mean, pixel_std: the normalization of the inputs (pixels in [0, 1] -> ``(p - mean)
            / std``), for the attacks' epsilon in pixel units; ``None``: the datamodule's
            ``input_space``.
    """

    def __init__(
        self,
        backbone: str = "cifar/resnetv2_20",
        num_classes: int = 10,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        backbone_options: dict[str, Any] | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        lr_schedule: Literal["cosine", "step", "constant"] = "cosine",
        warmup_epochs: float = 0.0,
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        adversarial: dict[str, Any] | None = None,
        robust_eval: dict[str, Any] | None = None,
        pixel_mean: list[float] | None = None,
        pixel_std: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(
                f"ImageClassifier: optimizer must be 'sgd' or 'adamw', got {optimizer!r}"
            )
        if lr_schedule not in ("cosine", "step", "constant"):
            raise ValueError(
                f"ImageClassifier: lr_schedule must be 'cosine', 'step' or 'constant', got {lr_schedule!r}"
            )
        checks = {  # option: (value, valid, requirement)
            "lr": (lr, lr > 0, "> 0"),
            "momentum": (momentum, 0 <= momentum < 1, "in [0, 1)"),
            "weight_decay": (weight_decay, weight_decay >= 0, ">= 0"),
            "warmup_epochs": (warmup_epochs, warmup_epochs >= 0, ">= 0"),
            "gamma": (gamma, gamma > 0, "> 0"),
            "label_smoothing": (label_smoothing, 0 <= label_smoothing < 1, "in [0, 1)"),
        }
        for option, (value, valid, requirement) in checks.items():
            if not valid:
                raise ValueError(f"ImageClassifier: {option} must be {requirement}, got {value!r}")
        if lr_schedule == "step" and not milestones:
            raise ValueError("ImageClassifier: lr_schedule='step' needs milestones (epochs)")
        self.net = create_backbone(
            backbone, num_classes, pretrained, checkpoint_path, **(backbone_options or {})
        )
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.train_acc = _Accuracy(num_classes, top_k=1)
        self.val_acc1 = _Accuracy(num_classes, top_k=1)
        self.val_acc5 = _Accuracy(num_classes, top_k=min(5, num_classes))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.adversarial = AdversarialTraining.from_config(adversarial) if adversarial else None
        self.robust_eval = RobustEvaluation.from_config(robust_eval) if robust_eval else None
        if (pixel_mean is None) != (pixel_std is None):
            raise ValueError("ImageClassifier: give both pixel_mean and pixel_std, or neither")
        self.input_space: InputSpace | None = (
            InputSpace(tuple(pixel_mean), tuple(pixel_std)) if pixel_mean is not None else None  # type: ignore[arg-type]
        )
        if self.robust_eval is not None:
            self.robust_acc = nn.ModuleDict(
                {name: _Accuracy(num_classes, top_k=1) for name in self.robust_eval.metric_names}
            )
        if self.adversarial is not None and self.adversarial.method == "free":
            # Free adversarial training steps the optimizer once per replay of a batch.
            self.automatic_optimization = False

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        size = getattr(datamodule, "image_size", None)
        if self.example_input_array is None and isinstance(size, int) and size > 0:
            # One image of the data's size: Lightning's model summary runs it to count FLOPs
            # and sizes (without it the summary printed "Total FLOPs: 0"). Set after the
            # callbacks' setup, so WhiteningCallback's trace is unchanged.
            self.example_input_array = torch.zeros(1, 3, size, size)
        if (self.adversarial or self.robust_eval) and self.input_space is None:
            space = getattr(datamodule, "input_space", None)
            if space is None:
                raise ValueError(
                    "ImageClassifier: adversarial training and robust_eval bound perturbations in "
                    "pixel units and need the input normalization: set pixel_mean and pixel_std, "
                    "or use a datamodule with an input_space (the ones in lightning_whiten.data)"
                )
            self.input_space = space

    def forward(self, x: Tensor) -> Tensor:
        if self.hparams.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        if x.shape[0] == 1 and not self._online_checked:
            self._check_online_training()
        adversarial = self.adversarial
        if adversarial is not None and adversarial.method == "free":
            return self._free_adversarial_step(x, y)
        if adversarial is not None:
            x = adversarial.example(self, x, y, self.input_space)  # type: ignore[arg-type]
        logits = self(x)
        loss = self.criterion(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    _online_checked = False

    def _check_online_training(self) -> None:
        """A batch of one sample: refuse layers that normalize with batch statistics."""
        from ..layers import PerChannelNorm, WhiteningNorm

        for name, module in self.named_modules():
            batch_stats = isinstance(module, (nn.modules.batchnorm._BatchNorm, WhiteningNorm)) or (
                isinstance(module, PerChannelNorm) and module.uses_batch_statistics
            )
            if batch_stats and module.training:
                raise ValueError(
                    f"ImageClassifier: training batches of one sample (batch_size=1), but "
                    f"'{name}' ({type(module).__name__}) normalizes with batch statistics, which "
                    "need more than one sample; use a larger batch_size or a normalizer that "
                    "trains online, e.g. backbone_options: {norm: streaming} (StreamingNorm)"
                )
        self._online_checked = True

    def _free_adversarial_step(self, x: Tensor, y: Tensor) -> Tensor:
        """Shafahi et al.'s free adversarial training: ``replays`` optimizer steps on the batch,
        the perturbation updated from each step's input gradient (reset for every batch, as in
        the ConvNorm authors' code)."""
        adversarial, space = self.adversarial, self.input_space
        assert adversarial is not None and space is not None
        optimizer = self.optimizers()
        delta = torch.zeros_like(x)
        losses = []
        for _ in range(adversarial.replays):
            delta.requires_grad_(True)
            logits = self(space.perturb(x, delta))
            loss = self.criterion(logits, y)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            grad = delta.grad
            delta = space.project(
                x, delta.detach() + adversarial.step_size * grad.sign(), adversarial.epsilon
            )  # type: ignore[operator]
            losses.append(loss.detach())
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()  # type: ignore[union-attr]
        loss = torch.stack(losses).mean()
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: Any, stage: str, batch_idx: int = 0) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc1(logits, y)
        self.val_acc5(logits, y)
        # sync_dist: under DDP every rank evaluates a shard; the logged loss is their mean.
        self.log(f"{stage}/loss", self.criterion(logits, y), prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc1", self.val_acc1, prog_bar=True)
        self.log(f"{stage}/acc5", self.val_acc5)
        if self._robust_eval_due(stage, batch_idx):
            predictions = robust_predictions(
                self,
                x,
                y,
                self.robust_eval,
                self.input_space,
                seed_offset=batch_idx,  # type: ignore[arg-type]
            )
            for name, predicted in predictions.items():
                metric = self.robust_acc[name]
                metric(predicted, y)
                self.log(f"{stage}/{name}", metric, prog_bar=name.startswith("acc_pgd"))

    def _robust_eval_due(self, stage: str, batch_idx: int) -> bool:
        evaluation = self.robust_eval
        if evaluation is None:
            return False
        if evaluation.max_batches is not None and batch_idx >= evaluation.max_batches:
            return False
        trainer = self._trainer
        if trainer is None or stage != "val" or trainer.state.fn != "fit":
            return True
        if trainer.sanity_checking:
            return False
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return last or epoch % evaluation.every_n_epochs == 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(-1)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before the weights are loaded: a converted checkpoint resumed into the plain
        # model fails here with the cause instead of a list of missing keys.
        from ..checkpoint import check_resume
        from ..registry import family_of

        if not any(family_of(m) is not None for m in self.modules()):
            check_resume(checkpoint, None)

    def configure_optimizers(self):
        h = self.hparams
        if h.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, nesterov=h.nesterov,
                                  weight_decay=h.weight_decay)  # fmt: skip
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        total = self.trainer.estimated_stepping_batches
        epochs = (
            self.trainer.max_epochs
            if self.trainer.max_epochs and self.trainer.max_epochs > 0
            else None
        )
        if not math.isfinite(total) or total <= 0:
            return opt
        per_epoch = total / epochs if epochs else total
        warmup = h.warmup_epochs * per_epoch
        milestones = sorted(h.milestones or [])

        def factor(step: int) -> float:
            ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
            if h.lr_schedule == "cosine":
                progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
                return ramp * 0.5 * (1.0 + math.cos(math.pi * progress))
            if h.lr_schedule == "step":
                epoch = step / per_epoch
                return ramp * h.gamma ** sum(epoch >= m for m in milestones)
            return ramp

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
