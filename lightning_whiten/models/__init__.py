"""Models for the recipes: the ImageClassifier LightningModule, CIFAR architectures and the small
online/recurrent networks."""

from .cifar import CIFAR_MODELS, preact_resnet, resnet18, vgg_e, wide_resnet
from .classifier import ImageClassifier, create_backbone
from .norms import NORMS, make_norm
from .small import MLP, SMALL_MODELS, RowRNN

__all__ = [
    "CIFAR_MODELS",
    "MLP",
    "NORMS",
    "SMALL_MODELS",
    "ImageClassifier",
    "RowRNN",
    "create_backbone",
    "make_norm",
    "preact_resnet",
    "resnet18",
    "vgg_e",
    "wide_resnet",
]
