"""What a model expects as input: part of its manifest, readable without torch.

It says which series of a study the model reads (modality, SOP classes, image
types it refuses, the fewest slices, and the order of preference among the
series that qualify) and how their pixels become the model's input. The node,
``triagenode infer``, training and evaluation all select through
:func:`triagenode.inference.studies.select_series` with these rules, so a
model is validated on the very series it later reads in production.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from pydicom import Dataset

Normalisation = Literal["window", "zscore"]
Denoise = Literal["none", "median", "gaussian"]
SeriesPreference = Literal["thinnest", "thickest", "most_slices", "fewest_slices"]
"""One rule to rank the series that qualify; the manifest lists them in order, the first deciding."""

SERIES_PREFERENCES: tuple[str, ...] = get_args(SeriesPreference)
FOR_PROCESSING_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray Image Storage - For Processing
})
"""The raw-data twins of the DX, MG and IO classes: what the detector measured, before the display processing.
A model trained on For Presentation images never reads them (selection and routing say so)."""


@dataclass(frozen=True)
class InputSpec:
    """What a model expects as input; stored in its manifest."""

    modality: str = "CT"
    normalisation: Normalisation = "window"
    window: tuple[float, float] = (-1350.0, 150.0)
    """Lower and upper value (HU for CT) mapped to 0 and 1 when normalisation is 'window'."""
    pixel_spacing_mm: float | None = None
    """In-plane spacing to resample to before cropping or padding to the matrix; None scales the whole slice."""
    matrix: int = 128
    slice_context: int = 0
    """Neighbouring slices on each side given as extra channels (2.5D): channels = 2 * slice_context + 1."""
    denoise: Denoise = "none"
    denoise_size: int = 3
    min_slices: int = 16
    """Fewer slices than this and the series is not suitable for the model."""
    sop_classes: tuple[str, ...] = ()
    """SOP Class UIDs the model reads (e.g. CT Image Storage); empty: any class whose instances carry an image.

    Empty by default so that packages written before the field existed keep reading what they read."""
    excluded_image_types: tuple[str, ...] = ("LOCALIZER",)
    """A series whose Image Type holds any of these values is never read (scouts, say)."""
    series_preference: tuple[SeriesPreference, ...] = ("thinnest", "most_slices")
    """How to choose among the series that qualify, the first rule deciding, the next breaking its ties.

    The last tie-break is the Series Instance UID, so the choice never depends on the order files arrived in."""

    def __post_init__(self) -> None:
        unknown = [rule for rule in self.series_preference if rule not in SERIES_PREFERENCES]
        if unknown:
            raise ValueError(f"unknown series preference {unknown[0]!r}; use {', '.join(SERIES_PREFERENCES)}")
        if self.min_slices < 1:
            raise ValueError(f"min_slices {self.min_slices} must be at least 1")

    @property
    def channels(self) -> int:
        return 2 * self.slice_context + 1

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("window", "sop_classes", "excluded_image_types", "series_preference"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        values = dict(data)
        for key in ("window", "sop_classes", "excluded_image_types", "series_preference"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


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


    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContrastRule:
        values = dict(data)
        for key in ("echo_time_ms", "repetition_time_ms", "inversion_time_ms"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)
