"""CIFAR-sized architectures used by the whitening papers (normalization is BatchNorm by default,
to be converted by :func:`lightning_whiten.convert` or the callback; ``norm`` builds them with
another layer directly, e.g. ``norm="streaming"`` for online training at batch size 1).

* :func:`wide_resnet` -- Wide ResNet (Zagoruyko & Komodakis 2016), pre-activation blocks;
  WRN-28-10 is the IterNorm paper's CIFAR network.
* :func:`vgg_e` -- the 16-convolution VGG ("E") for 32x32 inputs with one linear layer, as in
  the IterNorm paper's CIFAR experiments.
* :func:`preact_resnet` -- pre-activation ResNet ("ResNetV2") for CIFAR; ResNetV2-56 is the SWBN
  paper's CIFAR network.
* :func:`resnet18` -- the CIFAR ResNet-18 (3x3 stem, no max-pool; the network of the ConvNorm
  paper's robustness experiments), with ``conv="convnorm"`` for ConvNorm convolutions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor, nn

from .norms import NormName, make_norm

__all__ = ["CIFAR_MODELS", "preact_resnet", "resnet18", "vgg_e", "wide_resnet"]


class _PreActBlock(nn.Module):
    """BN-ReLU-conv, BN-ReLU-(dropout)-conv, plus an identity or 1x1 projection shortcut."""

    def __init__(
        self, in_planes: int, planes: int, stride: int, dropout: float = 0.0, norm=nn.BatchNorm2d
    ) -> None:
        super().__init__()
        self.bn1 = norm(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride, bias=False)
            if stride != 1 or in_planes != planes
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(pre)))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class _PreActResNet(nn.Module):
    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int],
        num_classes: int,
        dropout: float,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 and (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 or 6n + 4, got {depth}")
        blocks = (depth - 4) // 6 if (depth - 4) % 6 == 0 else (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        stages = []
        in_planes = widths[0]
        for i, planes in enumerate(widths[1:]):
            layers = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(_PreActBlock(in_planes, planes, stride, dropout, norm))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = norm(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(self.pool(self.relu(self.bn(x))).flatten(1))


def _norm_factory(
    norm: NormName, norm_options: dict[str, Any] | None
) -> Callable[[int], nn.Module]:
    options = dict(norm_options or {})
    make_norm(norm, 1, 2, **options)  # a bad name or option fails here, before any layer
    return lambda channels: make_norm(norm, channels, 2, **options)


def wide_resnet(
    depth: int = 28,
    widen_factor: int = 10,
    num_classes: int = 10,
    dropout: float = 0.0,
    norm: NormName = "batchnorm",
    norm_options: dict[str, Any] | None = None,
) -> nn.Module:
    """WRN-depth-k: widths 16, 16k, 32k, 64k; (depth - 4) / 6 blocks per stage."""
    if (depth - 4) % 6:
        raise ValueError(f"wide_resnet: depth must be 6n + 4, got {depth}")
    k = widen_factor
    return _PreActResNet(
        depth, (16, 16 * k, 32 * k, 64 * k), num_classes, dropout, _norm_factory(norm, norm_options)
    )


def preact_resnet(
    depth: int = 56,
    num_classes: int = 10,
    norm: NormName = "batchnorm",
    norm_options: dict[str, Any] | None = None,
) -> nn.Module:
    """Pre-activation ResNet for CIFAR (ResNetV2): widths 16, 32, 64; (depth - 2) / 6 blocks."""
    if (depth - 2) % 6:
        raise ValueError(f"preact_resnet: depth must be 6n + 2, got {depth}")
    return _PreActResNet(
        depth, (16, 16, 32, 64), num_classes, 0.0, _norm_factory(norm, norm_options)
    )


class _VGG(nn.Module):
    def __init__(
        self,
        config: list[int | str],
        num_classes: int,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [
                    nn.Conv2d(channels, int(v), 3, padding=1, bias=False),
                    norm(int(v)),
                    nn.ReLU(inplace=True),
                ]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        # As the IterNorm authors' CIFAR VGG (huangleiBuaa/IterNorm-pytorch, cifar10/models/
        # vgg.py): convolutions keep PyTorch's default init, the classifier is N(0, 0.01).
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


_VGG_E = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    512,
]


def vgg_e(
    num_classes: int = 10, norm: NormName = "batchnorm", norm_options: dict[str, Any] | None = None
) -> nn.Module:
    """VGG with 16 convolutions (configuration E), BatchNorm after every convolution."""
    return _VGG(_VGG_E, num_classes, _norm_factory(norm, norm_options))


ConvKind = Literal["conv", "convnorm"]


def _conv_factory(conv: ConvKind, options: dict[str, Any] | None) -> Callable[..., nn.Module]:
    if conv == "conv":
        if options:
            raise ValueError(f"resnet18: conv_options need conv='convnorm', got {options}")
        return nn.Conv2d
    if conv == "convnorm":
        from ..layers.convnorm import ConvNorm2d

        def make(*args: Any, **kwargs: Any) -> nn.Module:
            return ConvNorm2d(*args, **kwargs, **(options or {}))

        return make
    raise ValueError(f"resnet18: conv must be 'conv' or 'convnorm', got {conv!r}")


class _BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity or a 1x1 conv-BN projection, then ReLU."""

    def __init__(
        self, in_planes: int, planes: int, stride: int, conv: Callable[..., nn.Module]
    ) -> None:
        super().__init__()
        self.conv1 = conv(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            nn.Sequential(
                conv(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
            if stride != 1 or in_planes != planes
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class _ResNet18(nn.Module):
    def __init__(self, num_classes: int, width: int, conv: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.conv1 = conv(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], width
        for i in range(4):
            planes = width * 2**i
            first = _BasicBlock(in_planes, planes, 1 if i == 0 else 2, conv)
            stages.append(nn.Sequential(first, _BasicBlock(planes, planes, 1, conv)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet18(
    num_classes: int = 10,
    width: int = 64,
    conv: ConvKind = "conv",
    conv_options: dict[str, Any] | None = None,
) -> nn.Module:
    """The CIFAR ResNet-18 of the ConvNorm paper's code (``models/resnet.py``, after K. Liu's
    pytorch-cifar): a 3x3 stride-1 stem without max-pool, stages of 2 basic blocks with widths
    ``width x (1, 2, 4, 8)``, strides 1, 2, 2, 2, 1x1 projection shortcuts, global average
    pooling (their ``avg_pool2d(4)`` for 32x32 inputs) and a linear classifier; PyTorch's
    default initialization (their code sets none).

    ``conv="convnorm"`` makes every convolution (stem, blocks, shortcuts) a
    :class:`lightning_whiten.ConvNorm2d` with ``conv_options`` (e.g. ``running_v``,
    ``affine_init``); the BatchNorm after each stays, which equals the authors' ``PreConv`` with
    its built-in BatchNorm (``bn=True``) and ``norm_layer_type="no"``.
    """
    return _ResNet18(num_classes, width, _conv_factory(conv, conv_options))


def _wrn28_10(num_classes: int = 10, dropout: float = 0.3, norm: NormName = "batchnorm",
              norm_options: dict[str, Any] | None = None) -> nn.Module:  # fmt: skip
    return wide_resnet(28, 10, num_classes, dropout, norm=norm, norm_options=norm_options)


def _wrn16_4(num_classes: int = 10, dropout: float = 0.0, norm: NormName = "batchnorm",
             norm_options: dict[str, Any] | None = None) -> nn.Module:  # fmt: skip
    return wide_resnet(16, 4, num_classes, dropout, norm=norm, norm_options=norm_options)


def _resnetv2_56(num_classes: int = 10, norm: NormName = "batchnorm",
                 norm_options: dict[str, Any] | None = None) -> nn.Module:  # fmt: skip
    return preact_resnet(56, num_classes, norm=norm, norm_options=norm_options)


def _resnetv2_20(num_classes: int = 10, norm: NormName = "batchnorm",
                 norm_options: dict[str, Any] | None = None) -> nn.Module:  # fmt: skip
    return preact_resnet(20, num_classes, norm=norm, norm_options=norm_options)


#: ``"cifar/<name>"`` backbones of :class:`lightning_whiten.ImageClassifier`; each takes
#: ``num_classes`` and the options in its signature (``backbone_options``), nothing else:
#: ``norm``/``norm_options`` (all) and ``dropout`` (the wide ResNets).
CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "wrn28_10": _wrn28_10,
    "wrn16_4": _wrn16_4,
    "vgg": vgg_e,
    "resnetv2_56": _resnetv2_56,
    "resnetv2_20": _resnetv2_20,
    "resnet18": resnet18,
}
