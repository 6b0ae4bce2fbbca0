"""What a model expects as input: part of its manifest, readable without torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Normalisation = Literal["window", "zscore"]
Denoise = Literal["none", "median", "gaussian"]


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

    @property
    def channels(self) -> int:
        return 2 * self.slice_context + 1

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["window"] = list(self.window)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        values = dict(data)
        if "window" in values:
            values["window"] = tuple(values["window"])
        return cls(**values)
