"""Which torch device a model runs on: the node's workers, ``infer``, training and evaluation alike.

Its own module because the node's runtime needs it and must not import the
model lifecycle (training) to get it.
"""

from __future__ import annotations

import torch


class DeviceError(RuntimeError):
    """The device asked for is not there; the text says what to use instead."""


def resolve_device(name: str) -> torch.device:
    """``auto`` (a GPU when torch sees one), ``cpu``, ``cuda`` or ``cuda:N`` as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    return device
