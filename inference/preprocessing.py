"""From DICOM files to the tensor a model sees: one module for training, evaluation and the node.

A model must never see different pixels in production than in training, so
the three share these functions, driven by the model's :class:`InputSpec`:

1. :func:`read_series` decodes every instance (compressed transfer syntaxes
   through pylibjpeg's plugins), applies the modality LUT (CT: Hounsfield
   units) and orders the slices by Image Position Patient along the slice
   normal, not by file name or Instance Number. Geometry that does not form
   one volume is refused with the reason.
2. :func:`prepare_volume` normalises (window or z-score), optionally
   denoises, resamples to the model's pixel spacing and matrix, and stacks
   neighbouring slices as channels (2.5D). All of it is whole-volume torch
   arithmetic: no per-pixel Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydicom import Dataset, dcmread
from pydicom.pixels import apply_modality_lut

from inference.input_spec import InputSpec

__all__ = ["InputSpec", "SeriesGeometryError", "Volume", "prepare_volume", "read_series", "volume_from_datasets"]


class SeriesGeometryError(ValueError):
    """The instances of a series do not form one volume; the text says why."""


@dataclass
class Volume:
    """A series as one array of modality values (HU for CT), slices ordered along the normal."""

    values: np.ndarray
    """float32, shape (slices, rows, columns)."""
    positions_mm: np.ndarray
    """Position of each slice along the slice normal."""
    pixel_spacing_mm: tuple[float, float]
    slice_spacing_mm: float
    sop_instance_uids: list[str] = field(default_factory=list)


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    row, column = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float)
    return np.cross(row, column)


def read_series(paths: Iterable[Path]) -> Volume:
    """Decode a series into a :class:`Volume`, or raise :class:`SeriesGeometryError`."""
    datasets = [dcmread(path) for path in paths]
    if not datasets:
        raise SeriesGeometryError("the series has no instances")
    return volume_from_datasets(datasets)


def volume_from_datasets(datasets: Sequence[Dataset]) -> Volume:
    first = datasets[0]
    for name in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        missing = [ds.SOPInstanceUID for ds in datasets if name not in ds]
        if missing:
            raise SeriesGeometryError(f"{len(missing)} instance(s) lack {name}, e.g. {missing[0]}")
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    for ds in datasets:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), orientation, atol=1e-3):
            raise SeriesGeometryError(f"instance {ds.SOPInstanceUID} has another Image Orientation (Patient)")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise SeriesGeometryError(
                f"instance {ds.SOPInstanceUID} is {ds.Rows}x{ds.Columns}, not {first.Rows}x{first.Columns}"
            )
    normal = slice_normal(orientation)
    positions = np.array([float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))) for ds in datasets])
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    gaps = np.diff(positions)
    if len(gaps):
        if np.any(gaps < 1e-3):
            raise SeriesGeometryError(
                "two instances share a slice position (duplicates or several stacks in one series)"
            )
        median = float(np.median(gaps))
        if np.any(np.abs(gaps - median) > 0.1 * median + 1e-3):
            raise SeriesGeometryError(
                f"slice spacing varies from {gaps.min():.2f} to {gaps.max():.2f} mm (missing slices or a gantry tilt)"
            )
    slice_spacing = float(np.median(gaps)) if len(gaps) else float(getattr(first, "SliceThickness", 1.0) or 1.0)
    ordered = [datasets[i] for i in order]
    values = np.empty((len(ordered), first.Rows, first.Columns), dtype=np.float32)
    if all("ModalityLUTSequence" not in ds for ds in ordered):
        # Rescale Slope/Intercept only (CT, most MR/PET): one vectorised multiply-add.
        for k, ds in enumerate(ordered):
            values[k] = ds.pixel_array
        slopes = np.array([float(ds.get("RescaleSlope", 1) or 1) for ds in ordered], dtype=np.float32)
        intercepts = np.array([float(ds.get("RescaleIntercept", 0) or 0) for ds in ordered], dtype=np.float32)
        values *= slopes[:, None, None]
        values += intercepts[:, None, None]
    else:
        for k, ds in enumerate(ordered):
            values[k] = apply_modality_lut(ds.pixel_array, ds)
    spacing = tuple(float(v) for v in first.PixelSpacing)
    return Volume(
        values, positions, (spacing[0], spacing[1]), slice_spacing, [str(ds.SOPInstanceUID) for ds in ordered]
    )


def prepare_volume(volume: Volume, spec: InputSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """The model's input for every slice: float32, shape (slices, channels, matrix, matrix)."""
    x = torch.from_numpy(volume.values).to(device=device, dtype=torch.float32)
    if spec.normalisation == "window":
        low, high = spec.window
        x = ((x - low) / (high - low)).clamp_(0.0, 1.0)
    elif spec.normalisation == "zscore":
        x = (x - x.mean()) / x.std().clamp_min(1e-6)
    else:
        raise ValueError(f"unknown normalisation {spec.normalisation!r}")
    x = x.unsqueeze(1)  # (slices, 1, rows, columns)
    x = _denoise(x, spec)
    x = _resample(x, volume.pixel_spacing_mm, spec)
    if spec.slice_context:
        x = _stack_neighbours(x, spec.slice_context)
    return x.contiguous()


def _denoise(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    size = spec.denoise_size
    if spec.denoise == "none":
        return x
    if spec.denoise == "gaussian":
        sigma = size / 3.0
        offsets = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
        kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        x = F.conv2d(F.pad(x, (size // 2,) * 4, mode="replicate"), kernel.view(1, 1, 1, size))
        return F.conv2d(x, kernel.view(1, 1, size, 1))
    if spec.denoise == "median":
        # A few slices at a time: the unfolded patches take size*size times the slices' memory.
        out = torch.empty_like(x)
        for start in range(0, x.shape[0], 8):
            chunk = x[start : start + 8]
            patches = F.unfold(F.pad(chunk, (size // 2,) * 4, mode="replicate"), size)
            out[start : start + 8] = patches.median(dim=1).values.view_as(chunk)
        return out
    raise ValueError(f"unknown denoise {spec.denoise!r}")


def _resample(x: torch.Tensor, spacing: tuple[float, float], spec: InputSpec) -> torch.Tensor:
    rows, columns = x.shape[-2:]
    if spec.pixel_spacing_mm is None:
        size = (spec.matrix, spec.matrix)
    else:
        size = (
            max(1, round(rows * spacing[0] / spec.pixel_spacing_mm)),
            max(1, round(columns * spacing[1] / spec.pixel_spacing_mm)),
        )
    if size != (rows, columns):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=size[0] < rows)
    if spec.pixel_spacing_mm is not None:
        x = _crop_or_pad(x, spec.matrix)
    return x


def _crop_or_pad(x: torch.Tensor, matrix: int) -> torch.Tensor:
    rows, columns = x.shape[-2:]
    pad_r, pad_c = max(0, matrix - rows), max(0, matrix - columns)
    if pad_r or pad_c:
        x = F.pad(x, (pad_c // 2, pad_c - pad_c // 2, pad_r // 2, pad_r - pad_r // 2), value=0.0)
    rows, columns = x.shape[-2:]
    top, left = (rows - matrix) // 2, (columns - matrix) // 2
    return x[..., top : top + matrix, left : left + matrix]


def _stack_neighbours(x: torch.Tensor, context: int) -> torch.Tensor:
    """(slices, 1, H, W) -> (slices, 2*context+1, H, W), repeating the edge slices."""
    n = x.shape[0]
    index = torch.arange(n, device=x.device)[:, None] + torch.arange(-context, context + 1, device=x.device)[None, :]
    return x[index.clamp_(0, n - 1), 0]
