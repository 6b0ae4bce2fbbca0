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

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydicom import Dataset

from triagenode.inference.outcomes import NotApplicable
from triagenode.inference.preprocessing import SeriesGeometryError, layout_series, slice_normal
from triagenode.inference.studies import SeriesCandidate, StudyHeaders


@dataclass(frozen=True)
class ContrastRule:
    """How a segmentation model recognises one of the contrasts it needs, from a series' headers.

    Every condition given must hold: the Series Description pattern (searched, case-insensitive)
    and the ranges of the sequence parameters in ms (``None``: either bound open). A rule with
    no condition matches nothing, so a manifest never takes a random series for a contrast.
    """

    name: str
    series_description: str = ""
    echo_time_ms: tuple[float | None, float | None] | None = None
    repetition_time_ms: tuple[float | None, float | None] | None = None
    inversion_time_ms: tuple[float | None, float | None] | None = None

    def refusal(self, header: Dataset) -> str | None:
        """Why a series (its first header) is not this contrast, or None when it is."""
        conditions = 0
        if self.series_description:
            conditions += 1
            description = str(header.get("SeriesDescription", "") or "")
            if not re.search(self.series_description, description, re.IGNORECASE):
                return f"description {description!r} does not match {self.series_description!r}"
        for keyword, bounds in (("EchoTime", self.echo_time_ms), ("RepetitionTime", self.repetition_time_ms),
                                ("InversionTime", self.inversion_time_ms)):
            if bounds is None:
                continue
            conditions += 1
            value = header.get(keyword)
            if value in (None, ""):
                return f"no {keyword}"
            low, high = bounds
            if (low is not None and float(value) < low) or (high is not None and float(value) > high):
                return f"{keyword} {float(value):g} ms is outside {low if low is not None else '-'}" \
                       f"-{high if high is not None else ''} ms"
        return None if conditions else "the rule has no condition"


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


__all__ = ["ContrastRule", "Grid", "SeriesGeometryError", "resample_onto", "select_contrasts", "voxel_volume_ml"]
