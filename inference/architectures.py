"""The networks a model package may name, so a site can bring weights trained elsewhere.

Each entry builds a 2D network from ``in_channels`` (the input spec's
channels), ``classes`` and its own parameters; the package's manifest stores
the name and the parameters, and loading refuses a name that is not here.
Classifiers: the simple CNN is the seed's (three conv + pool blocks, dense,
softmax; the Keras example at 128x128); ResNet-18 and DenseNet-121 are
MONAI's, the standard implementations sites train with. Detectors: the
lesion FCN (:class:`LesionFCN`) maps a whole image to a per-class lesion map
at a quarter of its resolution (:mod:`inference.detection` reads the map).
Segmenters: the recurrent U-Net (:class:`RecurrentUNet`) outlines lesions slice
by slice with a bidirectional ConvGRU across the slices.
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


class ConvGRUCell(nn.Module):
    """A convolutional GRU cell: the gates and the candidate state are 3x3 convolutions of input and state."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.gates = nn.Conv2d(channels + hidden, 2 * hidden, 3, padding=1)
        self.candidate = nn.Conv2d(channels + hidden, hidden, 3, padding=1)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        update, reset = torch.sigmoid(self.gates(torch.cat([x, state], dim=1))).chunk(2, dim=1)
        candidate = torch.tanh(self.candidate(torch.cat([x, reset * state], dim=1)))
        return (1 - update) * state + update * candidate


class BidirectionalConvGRU(nn.Module):
    """A ConvGRU run along the slice axis both ways: each slice's output has seen every slice before and after it.

    Input and output are (batch, slices, channels, height, width); the output has ``2 * hidden``
    channels, the forward pass's state and the backward pass's, side by side.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.forward_cell = ConvGRUCell(channels, hidden)
        self.backward_cell = ConvGRUCell(channels, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, slices, _, height, width = x.shape
        outputs: list[list[torch.Tensor]] = [[], []]
        for direction, cell in enumerate((self.forward_cell, self.backward_cell)):
            state = x.new_zeros((batch, cell.hidden, height, width))
            order = range(slices) if direction == 0 else range(slices - 1, -1, -1)
            for index in order:
                state = cell(x[:, index], state)
                outputs[direction].append(state)
        backward = outputs[1][::-1]
        return torch.stack([torch.cat([f, b], dim=1) for f, b in zip(outputs[0], backward, strict=True)], dim=1)


class RecurrentUNet(nn.Module):
    """A 2D U-Net on each slice with a bidirectional ConvGRU across the slices at its bottleneck.

    The seed's recipe for segmentation, a CNN with a recurrent layer: the encoder and decoder
    see one slice at a time (the contrasts as channels), the recurrent layer carries what the
    neighbouring slices show, so a lesion that is faint on this slice but clear on the next is
    still outlined here. Input (batch, slices, channels, height, width) with height and width
    multiples of 8; output (batch, slices, classes, height, width) logits, class 0 the background.
    """

    def __init__(self, in_channels: int = 3, classes: int = 2, width: int = 8) -> None:
        super().__init__()
        w = width  # 8: a training step of 16 slices of 128 x 128 takes 0.4 s on two CPU cores (16: 1 s)
        self.encoders = nn.ModuleList([
            nn.Sequential(_conv(in_channels, w), _conv(w, w)),
            nn.Sequential(nn.MaxPool2d(2), _conv(w, 2 * w), _conv(2 * w, 2 * w)),
            nn.Sequential(nn.MaxPool2d(2), _conv(2 * w, 4 * w), _conv(4 * w, 4 * w)),
            nn.Sequential(nn.MaxPool2d(2), _conv(4 * w, 8 * w)),
        ])
        self.recurrent = BidirectionalConvGRU(8 * w, 4 * w)
        self.decoders = nn.ModuleList([
            _conv(8 * w + 4 * w, 4 * w),
            _conv(4 * w + 2 * w, 2 * w),
            _conv(2 * w + w, w),
        ])
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, slices = x.shape[:2]
        y = x.flatten(0, 1)  # every slice through the 2D encoder at once
        skips = []
        for encoder in self.encoders:
            y = encoder(y)
            skips.append(y)
        bottom = self.recurrent(y.unflatten(0, (batch, slices))).flatten(0, 1)
        for decoder, skip in zip(self.decoders, reversed(skips[:-1]), strict=True):
            bottom = F.interpolate(bottom, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            bottom = decoder(torch.cat([bottom, skip], dim=1))
        return self.head(bottom).unflatten(0, (batch, slices))


def _recurrentunet(in_channels: int, classes: int, **params: Any) -> nn.Module:
    return RecurrentUNet(in_channels, classes, **params)


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
    "recurrentunet": _recurrentunet,
}
CLASSIFIERS = ("simplecnn", "resnet18", "densenet121")
DETECTORS = ("lesionfcn",)
SEGMENTERS = ("recurrentunet",)
"""Which networks serve which task (``model train --task``)."""


class UnknownArchitectureError(ValueError):
    """A manifest names a network this node does not have."""


def build_network(name: str, in_channels: int, classes: int = 2, params: dict[str, Any] | None = None) -> nn.Module:
    if name not in ARCHITECTURES:
        raise UnknownArchitectureError(f"architecture {name!r} is not known; this node has {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name](in_channels, classes, **(params or {}))
