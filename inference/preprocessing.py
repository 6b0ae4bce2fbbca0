"""From DICOM files to the tensor a model sees: one module for training, evaluation and the node.

A model must never see different pixels in production than in training, so
the three share these functions, driven by the model's :class:`InputSpec`:

1. :func:`layout_series` orders the slices by Image Position Patient along
   the slice normal, not by file name or Instance Number, from the headers
   alone; geometry that does not form one volume is refused with the reason.
   :func:`modality_values` decodes pixels (compressed transfer syntaxes
   through pylibjpeg's plugins) and applies the modality LUT (CT: Hounsfield
   units). :func:`read_series` does both for a folder of files.
2. :func:`prepare_slices` normalises (window or z-score), optionally
   denoises and resamples to the model's pixel spacing and matrix;
   :func:`stack_neighbours` stacks neighbouring slices as channels (2.5D);
   :func:`prepare_volume` does both for a whole volume. All of it is torch
   arithmetic on many slices at once: no per-pixel Python.

The node's workers run the same functions on runs of slices in decoder
processes (:mod:`inference.loader`), so the model sees the same numbers there
as in training and evaluation; a test holds them equal.
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

from triagenode.inference.input_spec import InputSpec

__all__ = [
    "InputSpec",
    "SeriesGeometryError",
    "SeriesLayout",
    "Volume",
    "layout_series",
    "modality_values",
    "prepare_slices",
    "prepare_volume",
    "read_series",
    "stack_neighbours",
    "volume_from_datasets",
]


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


@dataclass(frozen=True)
class SeriesLayout:
    """A series' geometry from its headers alone: the order of its slices and their spacing.

    Worked out before any pixel is decoded, so that decoding can be split over
    processes, each writing its slices straight to their place in the volume.
    """

    order: list[int]
    """Index into the given headers of each slice, ordered along the slice normal."""
    positions_mm: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    slice_spacing_mm: float
    rows: int
    columns: int
    sop_instance_uids: list[str]


def layout_series(headers: Sequence[Dataset]) -> SeriesLayout:
    """Order a series' instances along the slice normal, or raise :class:`SeriesGeometryError`."""
    if not headers:
        raise SeriesGeometryError("the series has no instances")
    first = headers[0]
    for name in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        missing = [ds.SOPInstanceUID for ds in headers if name not in ds]
        if missing:
            raise SeriesGeometryError(f"{len(missing)} instance(s) lack {name}, e.g. {missing[0]}")
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    for ds in headers:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), orientation, atol=1e-3):
            raise SeriesGeometryError(f"instance {ds.SOPInstanceUID} has another Image Orientation (Patient)")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise SeriesGeometryError(
                f"instance {ds.SOPInstanceUID} is {ds.Rows}x{ds.Columns}, not {first.Rows}x{first.Columns}"
            )
    normal = slice_normal(orientation)
    positions = np.array([float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))) for ds in headers])
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
    spacing = tuple(float(v) for v in first.PixelSpacing)
    return SeriesLayout(
        order=[int(i) for i in order],
        positions_mm=positions,
        pixel_spacing_mm=(spacing[0], spacing[1]),
        slice_spacing_mm=slice_spacing,
        rows=int(first.Rows),
        columns=int(first.Columns),
        sop_instance_uids=[str(headers[i].SOPInstanceUID) for i in order],
    )


def modality_values(datasets: Sequence[Dataset], out: np.ndarray) -> None:
    """Decode ``datasets`` into ``out`` (float32, one slice each) as modality values (HU for CT)."""
    if all("ModalityLUTSequence" not in ds for ds in datasets):
        # Rescale Slope/Intercept only (CT, most MR/PET): one vectorised multiply-add.
        for k, ds in enumerate(datasets):
            out[k] = ds.pixel_array
        slopes = np.array([float(ds.get("RescaleSlope", 1) or 1) for ds in datasets], dtype=np.float32)
        intercepts = np.array([float(ds.get("RescaleIntercept", 0) or 0) for ds in datasets], dtype=np.float32)
        out *= slopes[:, None, None]
        out += intercepts[:, None, None]
    else:
        for k, ds in enumerate(datasets):
            out[k] = apply_modality_lut(ds.pixel_array, ds)


def volume_from_datasets(datasets: Sequence[Dataset]) -> Volume:
    layout = layout_series(datasets)
    values = np.empty((len(datasets), layout.rows, layout.columns), dtype=np.float32)
    modality_values([datasets[i] for i in layout.order], values)
    return Volume(
        values, layout.positions_mm, layout.pixel_spacing_mm, layout.slice_spacing_mm, layout.sop_instance_uids
    )


def prepare_volume(volume: Volume, spec: InputSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """The model's input for every slice: float32, shape (slices, channels, matrix, matrix)."""
    x = torch.from_numpy(volume.values).to(device=device, dtype=torch.float32)
    return stack_neighbours(prepare_slices(x, volume.pixel_spacing_mm, spec), spec.slice_context)


def prepare_slices(values: torch.Tensor, pixel_spacing_mm: tuple[float, float], spec: InputSpec) -> torch.Tensor:
    """Normalise, denoise and resample slices of modality values: (n, rows, columns) -> (n, 1, matrix, matrix).

    Slice by slice, except z-score normalisation, which takes its mean and
    deviation from all the slices given: give it the whole volume.
    """
    x = values.to(torch.float32)
    if spec.normalisation == "window":
        low, high = spec.window
        x = ((x - low) / (high - low)).clamp_(0.0, 1.0)
    elif spec.normalisation == "zscore":
        x = (x - x.mean()) / x.std().clamp_min(1e-6)
    else:
        raise ValueError(f"unknown normalisation {spec.normalisation!r}")
    x = x.unsqueeze(1)  # (slices, 1, rows, columns)
    x = _denoise(x, spec)
    return _resample(x, pixel_spacing_mm, spec).contiguous()


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


def stack_neighbours(x: torch.Tensor, context: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """(slices, 1, H, W) -> slices ``start:stop`` as (n, 2*context+1, H, W), repeating the edge slices.

    A batch needs only its own slices and ``context`` on each side, so the
    model can start on the first slices while later ones are still decoded.
    """
    n = x.shape[0]
    stop = n if stop is None else stop
    if not context:
        return x[start:stop]
    index = torch.arange(start, stop, device=x.device)[:, None] + torch.arange(-context, context + 1, device=x.device)
    return x[index.clamp_(0, n - 1), 0]
