"""The networks a model package may name, so a site can bring weights trained elsewhere.

Each entry builds a 2D classifier from ``in_channels`` (the input spec's
channels), ``classes`` and its own parameters; the package's manifest stores
the name and the parameters, and loading refuses a name that is not here.
The simple CNN is the seed's (three conv + pool blocks, dense, softmax; the
Keras example at 128x128); ResNet-18 and DenseNet-121 are MONAI's, the
standard implementations sites train with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
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
}


class UnknownArchitectureError(ValueError):
    """A manifest names a network this node does not have."""


def build_network(name: str, in_channels: int, classes: int = 2, params: dict[str, Any] | None = None) -> nn.Module:
    if name not in ARCHITECTURES:
        raise UnknownArchitectureError(f"architecture {name!r} is not known; this node has {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name](in_channels, classes, **(params or {}))
