"""A segmentation model on a study: the contrasts it needs, each resampled onto the reference grid by geometry.

A brain-MRI segmenter reads several co-registered series of one study (T1,
T2, FLAIR) as the channels of one volume. Which series is which contrast is
the manifest's to say (:class:`ContrastRule`: a Series Description pattern and
the sequence parameters that fit the contrast: echo, repetition and inversion
times), because sites name their series in a hundred ways; a study missing
one is not applicable, with the contrast that was missing.

The first contrast of the manifest is the reference (FLAIR): its grid is the
grid the model sees and the one its DICOM SEG is written on. Every other
series is resampled onto it by its own geometry (Image Position/Orientation
and Pixel Spacing), not by its index, so a T1 of another matrix, another
field of view or other slice positions lines up voxel for voxel with the
FLAIR it was acquired with (:func:`resample_onto`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydicom import Dataset

from triagenode.inference.input_spec import ContrastRule
from triagenode.inference.model_package import ModelPackage
from triagenode.inference.outcomes import NotApplicable, Segment, SegmentationMask, StudyResult
from triagenode.inference.preprocessing import SeriesGeometryError, layout_series, read_series, slice_normal
from triagenode.inference.studies import SeriesCandidate, StudyHeaders


def select_contrasts(
    study: StudyHeaders, modality: str, rules: tuple[ContrastRule, ...]
) -> dict[str, SeriesCandidate] | NotApplicable:
    """The series of each contrast, in the rules' order (the first is the reference grid); else what is missing.

    Among several series fitting one contrast, the one with the most instances wins, then the
    lowest Series Instance UID (not the order files came in). A series is one contrast only.
    """
    candidates = sorted(
        (s for s in study.series if s.modality == modality and s.has_pixels and s.headers),
        key=lambda s: (-len(s.files), s.series_uid),
    )
    chosen: dict[str, SeriesCandidate] = {}
    missing = []
    for rule in rules:
        fitting = [s for s in candidates if s not in chosen.values() and rule.refusal(s.headers[0]) is None]
        if fitting:
            chosen[rule.name] = fitting[0]
        else:
            missing.append(rule.name)
    if missing:
        seen = ", ".join(str(s.headers[0].get("SeriesDescription", "") or s.series_uid) for s in candidates) or "none"
        return NotApplicable(
            study.study_uid,
            f"no {' and no '.join(missing)} series among the study's {modality} series ({seen}); "
            f"the model needs {', '.join(rule.name for rule in rules)}",
            study.headers,
        )
    return chosen


@dataclass(frozen=True)
class Grid:
    """Where a series' voxels lie: voxel (k, i, j) is at ``origin + k * slice_step + i * row_step + j * column_step``
    in patient coordinates (mm), k the slice (ordered along the normal), i the row, j the column."""

    origin: np.ndarray
    slice_step: np.ndarray
    row_step: np.ndarray
    column_step: np.ndarray
    shape: tuple[int, int, int]

    @classmethod
    def of(cls, headers: list[Dataset]) -> Grid:
        """The grid of a series from its headers (raises SeriesGeometryError for one that is not one volume)."""
        layout = layout_series(headers)
        first = headers[layout.order[0]]
        orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
        row_direction, column_direction = orientation[:3], orientation[3:]
        row_spacing, column_spacing = layout.pixel_spacing_mm
        normal = slice_normal(orientation)
        spacing = layout.slice_spacing_mm
        return cls(
            origin=np.asarray(first.ImagePositionPatient, dtype=float),
            slice_step=normal * spacing,
            # Moving down a column (row index i) goes along the column direction by the row spacing.
            row_step=column_direction * row_spacing,
            column_step=row_direction * column_spacing,
            shape=(len(headers), layout.rows, layout.columns),
        )

    def points(self) -> np.ndarray:
        """Patient coordinates of every voxel, (slices, rows, columns, 3)."""
        k, i, j = (np.arange(n, dtype=float) for n in self.shape)
        return (self.origin + k[:, None, None, None] * self.slice_step + i[None, :, None, None] * self.row_step
                + j[None, None, :, None] * self.column_step)

    def indices_of(self, points: np.ndarray) -> np.ndarray:
        """Continuous (k, i, j) voxel indices of patient coordinates (..., 3)."""
        axes = np.stack([self.slice_step, self.row_step, self.column_step], axis=1)  # columns: the steps
        return np.linalg.solve(axes, (points - self.origin).reshape(-1, 3).T).T.reshape(points.shape)


def resample_onto(values: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """A volume (slices, rows, columns) on ``source`` resampled onto ``target`` by geometry (trilinear; 0 outside).

    Each target voxel's position in the patient is mapped to the source's voxel indices,
    whatever the two matrices, fields of view, slice positions or orientations.
    """
    pairs = ((source.origin, target.origin), (source.slice_step, target.slice_step),
             (source.row_step, target.row_step), (source.column_step, target.column_step))
    if source.shape == target.shape and all(np.allclose(a, b, atol=1e-3) for a, b in pairs):
        return values.astype(np.float32, copy=False)
    indices = source.indices_of(target.points())  # (S, R, C, 3) as (k, i, j)
    size = np.array(source.shape, dtype=float)
    # grid_sample's normalised coordinates (align_corners=True): -1 is the first voxel, +1 the last; order x, y, z.
    normalised = 2 * indices / np.maximum(size - 1, 1) - 1
    grid = torch.from_numpy(normalised[..., ::-1].copy()).float()[None]  # (1, S, R, C, 3) as (j, i, k)
    volume = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy()


def voxel_volume_ml(grid: Grid) -> float:
    """One voxel's volume in ml (the three steps' lengths multiplied, mm³ / 1000)."""
    return float(np.linalg.norm(grid.slice_step) * np.linalg.norm(grid.row_step)
                 * np.linalg.norm(grid.column_step)) / 1000.0


@dataclass
class StudyVolume:
    """A study's contrasts as one multi-channel volume on the reference grid: the segmenter's input."""

    values: np.ndarray
    """(channels, slices, rows, columns) float32, each channel z-scored over the head (values above 0)."""
    grid: Grid
    reference_headers: list[Dataset]
    """The reference series' headers in slice order: the SEG's source images."""
    series_uids: dict[str, str]
    """Contrast -> the Series Instance UID read for it."""


def study_volume(selected: dict[str, SeriesCandidate]) -> StudyVolume:
    """Read every selected series, resample each onto the first one's grid, z-score each channel.

    Z-scores over the head (voxels above zero on that contrast), not the whole field of view, so that
    air does not decide a contrast's scale; scanners' arbitrary intensity units then cancel out.
    """
    reference = next(iter(selected.values()))
    layout = layout_series(reference.headers)
    grid = Grid.of(reference.headers)
    channels = []
    for series in selected.values():
        volume = read_series([series.files[i] for i in layout_series(series.headers).order])
        values = resample_onto(volume.values, Grid.of(series.headers), grid)
        head = values > 0
        mean = float(values[head].mean()) if head.any() else 0.0
        std = float(values[head].std()) if head.any() else 1.0
        channels.append(((values - mean) / max(std, 1e-6)).astype(np.float32))
    return StudyVolume(
        np.stack(channels), grid, [reference.headers[i] for i in layout.order],
        {name: series.series_uid for name, series in selected.items()},
    )


def network_input(volume: StudyVolume, matrix: int) -> torch.Tensor:
    """(1, slices, channels, matrix, matrix'): in-plane scaled so that the longer side is ``matrix``, padded to 8."""
    x = torch.from_numpy(volume.values).permute(1, 0, 2, 3)  # (slices, channels, rows, columns)
    rows, columns = x.shape[-2:]
    scale = matrix / max(rows, columns)
    size = (max(8, round(rows * scale)), max(8, round(columns * scale)))
    if size != (rows, columns):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    x = F.pad(x, (0, (-size[1]) % 8, 0, (-size[0]) % 8))
    return x[None].contiguous()


@torch.inference_mode()
def segment_volume(
    network: torch.nn.Module, volume: StudyVolume, matrix: int, device: torch.device
) -> np.ndarray:
    """Each class's probability on the reference grid, (classes + 1, slices, rows, columns), background first."""
    network.eval()
    x = network_input(volume, matrix).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = network(x).float()[0]  # (slices, classes + 1, h, w)
    rows, columns = volume.values.shape[-2:]
    scale = matrix / max(rows, columns)
    height, width = max(8, round(rows * scale)), max(8, round(columns * scale))
    logits = F.interpolate(logits[..., :height, :width], size=(rows, columns), mode="bilinear", align_corners=False)
    return torch.softmax(logits, dim=1).permute(1, 0, 2, 3).cpu().numpy()


def segment_study(
    package: ModelPackage, study: StudyHeaders, device: torch.device | str = "cpu"
) -> StudyResult | NotApplicable:
    """A segmentation model's result: its segments with their volumes, the mask for the SEG, the triage verdict.

    A voxel belongs to the most probable class. The study's ``probability`` is the highest lesion
    probability of any voxel (how sure the model is that there is something at all); its
    ``finding`` is whether the outlined volume reaches the manifest's ``volume_threshold_ml``.
    """
    started = time.perf_counter()
    manifest = package.manifest
    spec = manifest.segmentation
    assert spec is not None, "a segmentation model's manifest has a segmentation section"
    selected = select_contrasts(study, manifest.input.modality, spec.contrasts)
    if isinstance(selected, NotApplicable):
        return selected
    try:
        volume = study_volume(selected)
    except SeriesGeometryError as exc:
        raise SeriesGeometryError(f"{exc} (reading the {manifest.input.modality} contrasts)") from None
    read = time.perf_counter()
    device = torch.device(device)
    probabilities = segment_volume(package.network, volume, manifest.input.matrix, device)
    modelled = time.perf_counter()
    labels = probabilities.argmax(axis=0).astype(np.uint8)
    voxel_ml = voxel_volume_ml(volume.grid)
    segments = []
    for index, lesion_class in enumerate(spec.classes, start=1):
        inside = labels == index
        voxels = int(inside.sum())
        certainty = float(probabilities[index][inside].mean()) if voxels else 0.0
        segments.append(Segment(lesion_class.name, voxels * voxel_ml, voxels, certainty))
    total_ml = sum(segment.volume_ml for segment in segments)
    suspicion = float(probabilities[1:].max()) if probabilities.shape[0] > 1 else 0.0
    key = volume.reference_headers[int(np.argmax((labels > 0).sum(axis=(1, 2))))]
    timings = {
        "select": study.read_ms,
        "read": (read - started) * 1000,
        "model": (modelled - read) * 1000,
        "total": (time.perf_counter() - started) * 1000 + study.read_ms,
    }
    return StudyResult(
        study_uid=study.study_uid,
        series_uid=next(iter(volume.series_uids.values())),
        finding=total_ml >= spec.volume_threshold_ml,
        probability=round(suspicion, 6),
        threshold=manifest.threshold,
        model=manifest.name,
        model_version=manifest.version,
        key_instance_uid=str(key.SOPInstanceUID),
        slices=len(volume.reference_headers),
        timings_ms={k: round(v, 1) for k, v in timings.items()},
        evidence=volume.reference_headers,
        segments=segments,
        mask=SegmentationMask(labels, probabilities[1:].astype(np.float32), volume.reference_headers),
    )


__all__ = [
    "ContrastRule",
    "Grid",
    "SeriesGeometryError",
    "StudyVolume",
    "network_input",
    "resample_onto",
    "segment_study",
    "segment_volume",
    "select_contrasts",
    "study_volume",
    "voxel_volume_ml",
]
