"""Models for the recipes: the ImageClassifier LightningModule and CIFAR architectures."""

from .cifar import CIFAR_MODELS, preact_resnet, resnet18, vgg_e, wide_resnet
from .classifier import ImageClassifier, create_backbone

__all__ = [
    "CIFAR_MODELS",
    "ImageClassifier",
    "create_backbone",
    "preact_resnet",
    "resnet18",
    "vgg_e",
    "wide_resnet",
]
