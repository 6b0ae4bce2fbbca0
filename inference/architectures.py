"""The networks a model package may name, so a site can bring weights trained elsewhere.

Each entry builds a 2D network from ``in_channels`` (the input spec's
channels), ``classes`` and its own parameters; the package's manifest stores
the name and the parameters, and loading refuses a name that is not here.
Classifiers: the simple CNN is the seed's (three conv + pool blocks, dense,
softmax; the Keras example at 128x128); ResNet-18 and DenseNet-121 are
MONAI's, the standard implementations sites train with. Detectors: the
lesion FCN (:class:`LesionFCN`) maps a whole image to a per-class lesion map
at a quarter of its resolution (:mod:`inference.detection` reads the map).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class SimpleCNN(nn.Module):
    """Three conv + pool blocks, a dense layer, two logits (softmax at inference)."""

    def __init__(self, in_channels: int = 1, classes: int = 2, width: int = 16, dense: int = 128, dropout: float = 0.3):
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for factor in (1, 2, 4):
            blocks += [
                nn.Conv2d(channels, width * factor, 3, padding=1),
                nn.BatchNorm2d(width * factor),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width * factor
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveMaxPool2d(4),
            nn.Flatten(),
            nn.Linear(channels * 16, dense),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dense, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class LesionFCN(nn.Module):
    """A fully convolutional lesion detector: image in, one logit map per class out, at 1/4 of the input size.

    The seed's recipe made fully convolutional: convolution and pooling blocks
    down to 1/8 (a strided first convolution, as the whole mammogram is large),
    dilated convolutions there to see a mass's margin and a cluster's spread
    (30 mm at 0.5 mm per pixel is 60 pixels: beyond what three 3x3 layers see),
    then one upsampling step that adds the 1/4 features back, so a 5 mm mass
    still falls on a cell of its own. No dense layer: any image size works, and
    training on crops gives the same network as inference on whole images.
    Output channel 0 is the background, channel i + 1 the manifest's lesion class i.
    """

    output_stride = 4

    def __init__(self, in_channels: int = 1, classes: int = 3, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv(in_channels, w, stride=2), _conv(w, w))  # 1/2
        self.down4 = nn.Sequential(nn.MaxPool2d(2), _conv(w, 2 * w), _conv(2 * w, 2 * w))  # 1/4
        self.down8 = nn.Sequential(
            nn.MaxPool2d(2), _conv(2 * w, 4 * w), _conv(4 * w, 4 * w, dilation=2), _conv(4 * w, 4 * w, dilation=4)
        )  # 1/8, with a receptive field of about 60 input pixels
        self.fuse = _conv(6 * w, 2 * w)
        self.head = nn.Conv2d(2 * w, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quarter = self.down4(self.stem(x))
        eighth = self.down8(quarter)
        up = F.interpolate(eighth, size=quarter.shape[-2:], mode="bilinear", align_corners=False)  # any size
        return self.head(self.fuse(torch.cat([quarter, up], dim=1)))


def _lesionfcn(in_channels: int, classes: int, **params: Any) -> nn.Module:
    return LesionFCN(in_channels, classes, **params)


def _simplecnn(in_channels: int, classes: int, **params: Any) -> nn.Module:
    return SimpleCNN(in_channels, classes, **params)


def _resnet18(in_channels: int, classes: int, **params: Any) -> nn.Module:
    from monai.networks.nets import ResNet

    return ResNet(
        block="basic",
        layers=(2, 2, 2, 2),
        block_inplanes=(64, 128, 256, 512),
        spatial_dims=2,
        n_input_channels=in_channels,
        num_classes=classes,
        **params,
    )


def _densenet121(in_channels: int, classes: int, **params: Any) -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=classes, **params)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "simplecnn": _simplecnn,
    "resnet18": _resnet18,
    "densenet121": _densenet121,
    "lesionfcn": _lesionfcn,
}
CLASSIFIERS = ("simplecnn", "resnet18", "densenet121")
DETECTORS = ("lesionfcn",)
"""Which networks serve which task (``model train --task``)."""


class UnknownArchitectureError(ValueError):
    """A manifest names a network this node does not have."""


def build_network(name: str, in_channels: int, classes: int = 2, params: dict[str, Any] | None = None) -> nn.Module:
    if name not in ARCHITECTURES:
        raise UnknownArchitectureError(f"architecture {name!r} is not known; this node has {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name](in_channels, classes, **(params or {}))
