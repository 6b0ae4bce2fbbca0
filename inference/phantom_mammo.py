"""Synthetic screening mammograms: the mammography detector's test and demo data, written as real DICOM.

A screening study is one series of four Digital Mammography X-Ray images (For
Presentation): L CC, L MLO, R CC, R MLO. Each view shows a compressed breast
from the chest wall (column 0 for the left breast, the last column for the
right one, as Patient Orientation says) to the nipple near mid-height, a
darker periphery where the compressed breast thins, a skin line, and
fibroglandular tissue whose texture is power-law (1/f^3) noise, denser near
the chest wall; the MLO views are taller and hold the pectoral muscle as a
bright wedge in the upper chest-wall corner. Positive studies carry 1-3
lesions: masses (round, oval or spiculated, 5-30 mm) and clusters of
microcalcifications. A lesion has a position in the breast (depth from the
chest wall along the nipple axis, a medio-lateral and a supero-inferior
offset), so it shows on both views of its breast where a reader would look
for it: the same depth, the CC's vertical offset medio-lateral, the MLO's
supero-inferior.

``labels.csv`` has one row per study (``study_uid,label``); ``lesions.csv``
one row per lesion per image, with the tight box of what is visible of the
lesion in that image, in the pixel coordinates DICOM's SCOORD uses. The
anatomy lives in millimetres on a fixed texture grid, so ``rows`` only changes
the resolution: the same seed draws the same breasts and lesions at every
matrix. Everything is vectorised numpy and deterministic for a seed: the same
seed writes byte-identical files.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from triagenode.inference.phantom import LABELS_FILE, dicom_instance

DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
DIGITAL_MAMMOGRAPHY_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
FULL_FIELD_ROWS = 3328
FULL_FIELD_COLUMNS = 2560
FULL_FIELD_SPACING_MM = 0.07
"""A full-field detector as a unit ships it: 3328 x 2560 pixels of 0.07 mm (233 x 179 mm)."""
LESIONS_FILE = "lesions.csv"
MAMMO_LESION_TYPES: tuple[str, ...] = ("mass", "calcification")
"""What ``lesions.csv`` marks; the same names as :data:`triagenode.inference.outcomes.LESION_TYPES`."""
LESIONS_HEADER: tuple[str, ...] = ("study_uid", "lesion", "sop_instance_uid", "type", "x0", "y0", "x1", "y1")
LABELS_HEADER: tuple[str, ...] = ("study_uid", "label")

MAX_VALUE = 4095
"""12 bits stored."""
VIEWS: tuple[tuple[str, str], ...] = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
"""(Image Laterality, View Position) of Instance Numbers 1-4."""
PATIENT_ORIENTATION: dict[tuple[str, str], tuple[str, str]] = {
    ("L", "CC"): ("A", "R"),
    ("R", "CC"): ("P", "L"),
    ("L", "MLO"): ("A", "FR"),
    ("R", "MLO"): ("P", "FL"),
}
"""Row and column directions: the chest wall is on the left of a left breast's image, on the right of a right one's."""
VIEW_CODES: dict[str, tuple[str, str]] = {
    "CC": ("399162004", "cranio-caudal"),
    "MLO": ("399368009", "medio-lateral oblique"),
}
"""View Code Sequence (CID 4014) in SNOMED CT."""

_TEXTURE_ROWS = 512
_TEXTURE_COLUMNS = 400
_TEXTURE_SPACING_MM = FULL_FIELD_ROWS * FULL_FIELD_SPACING_MM / _TEXTURE_ROWS
"""The tissue texture is drawn on one grid of 0.455 mm (about what the detector sees), whatever the matrix, and
resampled: one FFT of a fixed small size per view keeps full-field generation fast, and a seed draws the same
tissue at every matrix. 400 columns (a cheap FFT size) cover the detector's 179 mm."""
_TISSUE_ROWS = 1024
"""The finest grid the tissue is drawn on (0.23 mm): below that it has no detail, and a full-field matrix costs
a resampling instead of every step of the tissue at 8.5 million pixels."""
_HEIGHT_MM = FULL_FIELD_ROWS * FULL_FIELD_SPACING_MM
_WIDTH_MM = FULL_FIELD_COLUMNS * FULL_FIELD_SPACING_MM
_AIR = 40.0


@dataclass(frozen=True)
class MammoLesion:
    """One lesion on one image: which, what, and its tight box in that image's pixels.

    ``box`` is (x0, y0, x1, y1) in continuous pixel coordinates as DICOM's
    SCOORD uses them: (0, 0) is the top left corner of the top left pixel,
    pixel (column c, row r) covers [c, c + 1) x [r, r + 1); x runs along the
    row (column index), y down the column (row index). One decimal.
    """

    study_uid: str
    lesion: int
    """1-based index within the study; the same lesion has the same index on both views of its breast."""
    sop_instance_uid: str
    type: str
    """``"mass"`` or ``"calcification"`` (a cluster of microcalcifications)."""
    box: tuple[float, float, float, float]


@dataclass
class MammoStudy:
    study_uid: str
    label: int
    """1 when the study has lesions."""
    lesions: list[MammoLesion] = field(default_factory=list)
    """One entry per lesion per image it shows on (two per lesion: its breast's CC and MLO)."""
    directory: Path | None = None


def mammo_columns(rows: int) -> int:
    """Columns of a ``rows`` matrix: the detector's aspect (2560/3328) kept, rounded to an even number."""
    if rows < 16:
        raise ValueError(f"a mammogram needs at least 16 rows, not {rows}")
    return 2 * round(rows * FULL_FIELD_COLUMNS / FULL_FIELD_ROWS / 2)


def mammo_pixel_spacing(rows: int) -> float:
    """Pixel size (mm) of a ``rows`` matrix over the same detector, rounded to 6 decimals (a DS holds 16 characters)."""
    if rows < 16:
        raise ValueError(f"a mammogram needs at least 16 rows, not {rows}")
    return round(FULL_FIELD_SPACING_MM * FULL_FIELD_ROWS / rows, 6)


def _uid(seed: int, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["triagenode-mammo-phantom", str(seed), *map(str, parts)]))


# --- anatomy ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outline:
    """A breast's outline in one view, in mm with the chest wall at x = 0 (the left breast's orientation).

    The nipple axis runs from (0, centre) with slope ``shear`` (an MLO breast
    droops); the outline is a half ellipse of semi-axis ``depth`` along it and
    ``top``/``bottom`` across it (an egg: convex, so a box whose corners lie
    inside lies inside).
    """

    depth: float
    centre: float
    top: float
    bottom: float
    shear: float = 0.0

    def contains(self, x: float, y: float, margin: float) -> bool:
        """Whether (x, y) lies ``margin`` mm or more inside the outline (and in front of the chest wall)."""
        across = y - self.centre - self.shear * x
        half = (self.top if across < 0 else self.bottom) - margin
        return x >= margin and half > 0 and (x / (self.depth - margin)) ** 2 + (across / half) ** 2 <= 1.0


@dataclass(frozen=True)
class _Pectoral:
    """The pectoral muscle on an MLO: the region (x/width)^power + y/height < 1 in the upper chest-wall corner."""

    width: float
    height: float
    power: float
    level: float

    def clear_of(self, x: float, y: float, margin: float) -> bool:
        """Whether a box whose top left corner (nearest the muscle) is (x, y) stays ``margin`` mm clear of it.

        The muscle region shrinks away from the corner, so the box's corner
        nearest the chest wall and the top decides for the whole box.
        """
        return (max(x - margin, 0.0) / self.width) ** self.power + max(y - margin, 0.0) / self.height >= 1.0


@dataclass(frozen=True)
class _Breast:
    """One breast: its outline on both views, its tissue and its muscle."""

    cc: _Outline
    mlo: _Outline
    pectoral: _Pectoral
    fat: float
    gland: float
    density: float
    """Shifts the threshold of fibroglandular tissue: low is fatty, high is dense."""
    falloff_mm: float
    skin_mm: float
    skin_level: float


def _draw_breasts(rng: np.random.Generator) -> dict[str, _Breast]:
    """Both breasts of one woman: similar in size and the same density, each with its own outline."""
    density = float(rng.uniform(-0.6, 1.4))
    fat = float(rng.uniform(950, 1200))
    gland = fat + float(rng.uniform(900, 1250))
    size = float(rng.uniform(0.0, 1.0))
    breasts: dict[str, _Breast] = {}
    for side in ("L", "R"):
        wiggle = float(rng.uniform(-0.08, 0.08))
        depth = _WIDTH_MM * (0.46 + 0.28 * min(max(size + wiggle, 0.0), 1.0))
        half = _HEIGHT_MM * (0.31 + 0.12 * min(max(size + wiggle, 0.0), 1.0))
        cc = _Outline(
            depth=depth,
            centre=_HEIGHT_MM / 2 + float(rng.uniform(-8, 8)),
            top=half * float(rng.uniform(0.92, 1.08)),
            bottom=half * float(rng.uniform(0.92, 1.08)),
        )
        centre = _HEIGHT_MM * float(rng.uniform(0.44, 0.52))
        shear = float(rng.uniform(0.08, 0.22))
        top = centre * float(rng.uniform(1.08, 1.25))  # reaches above the top edge: the axilla
        room = _HEIGHT_MM - centre - 4.0
        bottom = min(half * float(rng.uniform(1.0, 1.15)), math.sqrt(max(room**2 - (shear * depth) ** 2, 1.0)))
        mlo = _Outline(depth=depth, centre=centre, top=top, bottom=bottom, shear=shear)
        # Where the outline crosses the top edge: the muscle's top ends inside the body.
        cross = depth * math.sqrt(max(1.0 - (centre / top) ** 2, 0.04))
        pectoral = _Pectoral(
            width=min(cross * float(rng.uniform(0.7, 1.0)), depth * 0.45),
            height=centre * float(rng.uniform(0.85, 1.3)),
            power=float(rng.uniform(1.0, 1.5)),
            level=float(rng.uniform(2350, 2750)),
        )
        breasts[side] = _Breast(
            cc=cc,
            mlo=mlo,
            pectoral=pectoral,
            fat=fat * float(rng.uniform(0.97, 1.03)),
            gland=gland * float(rng.uniform(0.97, 1.03)),
            density=density + float(rng.uniform(-0.15, 0.15)),
            falloff_mm=float(rng.uniform(8.0, 16.0)),
            skin_mm=float(rng.uniform(1.0, 2.0)),
            skin_level=float(rng.uniform(220, 380)),
        )
    return breasts


@functools.lru_cache(maxsize=4)
def _power_law_filter(beta: float, stretch: float) -> np.ndarray:
    """The amplitude spectrum of :func:`_power_law_noise` (computed once: it is the same for every view)."""
    fy = np.fft.fftfreq(_TEXTURE_ROWS)[:, None]
    fx = np.fft.rfftfreq(_TEXTURE_COLUMNS)[None, :]
    frequency = np.sqrt((fx / stretch) ** 2 + fy**2)
    lowest = _TEXTURE_SPACING_MM / 60.0
    amplitude = np.maximum(frequency, lowest) ** (-beta / 2)
    amplitude[0, 0] = 0.0
    amplitude = amplitude.astype(np.float32)
    amplitude.flags.writeable = False
    return amplitude


def _power_law_noise(rng: np.random.Generator, beta: float = 3.0, stretch: float = 0.6) -> np.ndarray:
    """Zero-mean unit-variance 1/f^beta noise on the texture grid, features elongated along the nipple axis.

    beta about 3 is what measured mammographic backgrounds show; ``stretch``
    below 1 makes the structures longer along x (ducts and ligaments run
    towards the nipple). Frequencies below 1/60 mm are flattened so that no
    single blob fills the breast.
    """
    amplitude = _power_law_filter(beta, stretch)
    real = rng.standard_normal(amplitude.shape, dtype=np.float32)
    imaginary = rng.standard_normal(amplitude.shape, dtype=np.float32)
    spectrum = np.empty(amplitude.shape, dtype=np.complex64)
    spectrum.real, spectrum.imag = real * amplitude, imaginary * amplitude
    noise = np.fft.irfft2(spectrum, s=(_TEXTURE_ROWS, _TEXTURE_COLUMNS))
    return (noise / noise.std()).astype(np.float32)


def _centres(count: int, spacing: float, first: int = 0) -> np.ndarray:
    """Pixel centres (mm) of ``count`` pixels from index ``first`` along one axis."""
    return (np.arange(first, first + count, dtype=np.float32) + np.float32(0.5)) * np.float32(spacing)


def _resample(grid: np.ndarray, grid_spacing: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bilinear samples of a field on a grid of ``grid_spacing`` mm at the points ``y`` x ``x`` (mm, 1-D each).

    Separable, columns first (on the smaller array), then rows (whole-row
    copies), in place where it can be: about two passes over the output, cheap
    enough to take a field from a coarse grid to a full-field matrix.
    """

    def axis(position_mm: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        position = np.clip(position_mm / np.float32(grid_spacing) - np.float32(0.5), 0, size - 1)
        low = np.minimum(position.astype(np.int64), size - 2)
        return low, (position - low).astype(np.float32)

    row_low, row_weight = axis(y, grid.shape[0])
    column_low, column_weight = axis(x, grid.shape[1])
    by_columns = grid[:, column_low] * (1 - column_weight)
    by_columns += grid[:, column_low + 1] * column_weight
    out = by_columns[row_low]
    out *= (1 - row_weight)[:, None]
    below = by_columns[row_low + 1]
    below *= row_weight[:, None]
    out += below
    return out


def _outline_distance(outline: _Outline, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rho^2, mm to the skin): the outline's implicit function and its first-order distance, positive inside."""
    across = y - outline.centre - outline.shear * x
    half2 = (across < 0) * np.float32(outline.top**2 - outline.bottom**2) + np.float32(outline.bottom**2)
    depth2 = np.float32(outline.depth**2)
    rho2 = x * x / depth2 + across * across / half2
    gx = 2 * x / depth2 - 2 * outline.shear * across / half2
    gy = 2 * across / half2
    distance = (1 - rho2) / np.maximum(np.sqrt(gx * gx + gy * gy), np.float32(1e-6))
    return rho2, distance


def _tissue(
    rng: np.random.Generator, breast: _Breast, view: str, rows: int, columns: int, spacing: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One view's breast without lesions, chest wall at column 0: (pixel values, inside fraction, texture).

    Fibroglandular tissue is where power-law noise plus an envelope (high
    behind the nipple near the chest wall, nothing in the subcutaneous fat)
    passes a threshold the breast's density sets, through a soft step, so
    dense and fatty regions blend as they do on film; a finer noise adds the
    stroma's texture everywhere. The periphery, where the compressed breast
    thins, is darker; the skin is a thin bright rim.
    """
    outline = breast.cc if view == "CC" else breast.mlo
    y_mm, x_mm = _centres(rows, spacing), _centres(columns, spacing)
    x, y = x_mm[None, :], y_mm[:, None]
    rho2, distance = _outline_distance(outline, x, y)
    edge = np.float32(max(spacing, 0.1))
    inside = np.clip(distance / edge + np.float32(0.5), 0, 1)

    texture = _resample(_power_law_noise(rng), _TEXTURE_SPACING_MM, y_mm, x_mm)
    fine = _resample(_power_law_noise(rng, beta=2.0, stretch=0.5), _TEXTURE_SPACING_MM, y_mm, x_mm)
    subcutaneous = np.clip((distance - np.float32(3.0)) / np.float32(10.0), 0, 1)
    envelope = np.clip(1 - rho2, 0, 1) * subcutaneous
    drive = (texture + np.float32(0.4) * fine + np.float32(3.0) * envelope + np.float32(breast.density - 2.4))
    gland_fraction = 1 / (1 + np.exp(drive * np.float32(-1 / 0.6)))
    contrast = np.float32(breast.gland - breast.fat)
    values = np.float32(breast.fat) + (gland_fraction + np.float32(0.07) * fine) * contrast
    thinning = np.float32(0.5) + np.float32(0.5) * np.sqrt(np.clip(distance / np.float32(breast.falloff_mm), 0, 1))
    if view == "MLO":
        muscle = breast.pectoral
        beyond = (x / np.float32(muscle.width)) ** np.float32(muscle.power) + y / np.float32(muscle.height) - 1
        # The muscle's edge in mm is about -beyond times the region's scale there; one pixel of soft edge.
        scale = np.float32(min(muscle.width, muscle.height) * 0.8)
        in_muscle = np.clip(-beyond * scale / edge + np.float32(0.5), 0, 1)
        muscle_values = np.float32(muscle.level) * (1 + np.float32(0.03) * texture + np.float32(0.02) * fine)
        values += (muscle_values - values) * in_muscle
    values *= thinning
    skin = np.clip((np.float32(breast.skin_mm) - distance) / edge + np.float32(0.5), 0, 1)
    values += np.float32(breast.skin_level) * skin
    values = np.float32(_AIR) + (values - np.float32(_AIR)) * inside
    return values, inside, texture


# --- lesions ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Speck:
    depth: float
    medio_lateral: float
    supero_inferior: float
    radius: float
    amplitude: float


@dataclass(frozen=True)
class _Spicule:
    angle: float
    length: float
    width: float


@dataclass(frozen=True)
class _LesionSpec:
    """A lesion in breast coordinates (mm), with how it looks on each view.

    ``depth`` runs from the chest wall along the nipple axis, ``medio_lateral``
    and ``supero_inferior`` across it: the CC shows (depth, medio_lateral), the
    MLO (depth, supero_inferior). A mass is an ellipse of semi-axes
    ``radius`` and ``radius * ratio`` turned by ``angle[view]``, its radius
    modulated by ``lobes[view]`` (a spiculated mass's core is irregular); a
    cluster is its specks, each offset from the centre in all three directions.
    """

    side: str
    type: str
    depth: float
    medio_lateral: float
    supero_inferior: float
    radius: float = 0.0
    ratio: float = 1.0
    angle: dict[str, float] = field(default_factory=dict)
    lobes: dict[str, tuple[tuple[int, float, float], ...]] = field(default_factory=dict)
    """Per view, (k, amplitude, phase) of the outline's radial modulation 1 + sum(amplitude cos(k phi + phase))."""
    amplitude: float = 0.0
    spicules: dict[str, tuple[_Spicule, ...]] = field(default_factory=dict)
    specks: tuple[_Speck, ...] = ()

    def centre(self, breast: _Breast, view: str) -> tuple[float, float]:
        """The lesion's centre in the view, in mm (chest wall at x = 0)."""
        if view == "CC":
            return self.depth, breast.cc.centre + self.medio_lateral
        return self.depth, breast.mlo.centre + breast.mlo.shear * self.depth + self.supero_inferior

    def box_mm(self, breast: _Breast, view: str, spacing: float) -> tuple[float, float, float, float]:
        """The tight box of what the view shows, mm: a mass's outline (not its spicules), or all specks + 1 mm."""
        cx, cy = self.centre(breast, view)
        if self.type == "mass":
            x, y = self.outline(view)
            return cx + float(x.min()), cy + float(y.min()), cx + float(x.max()), cy + float(y.max())
        points = [_speck_centre(speck, cx, cy, view) + (_speck_radius(speck, spacing),) for speck in self.specks]
        return (
            min(px - r for px, _, r in points) - 1.0,
            min(py - r for _, py, r in points) - 1.0,
            max(px + r for px, _, r in points) + 1.0,
            max(py + r for _, py, r in points) + 1.0,
        )

    def modulation(self, view: str, phi: np.ndarray) -> np.ndarray:
        """The outline's radius at angle ``phi`` (in the ellipse's own frame) relative to the plain ellipse's."""
        radius = np.ones_like(phi)
        for k, amplitude, phase in self.lobes.get(view, ()):
            radius += np.float32(amplitude) * np.cos(k * phi + np.float32(phase))
        return radius

    def outline(self, view: str) -> tuple[np.ndarray, np.ndarray]:
        """A mass's outline in the view, mm from its centre (720 points): its box is the box of these."""
        phi = np.linspace(0, 2 * np.pi, 720, endpoint=False)
        radius = self.modulation(view, phi)
        u, v = self.radius * radius * np.cos(phi), self.radius * self.ratio * radius * np.sin(phi)
        theta = self.angle[view]
        return u * math.cos(theta) - v * math.sin(theta), u * math.sin(theta) + v * math.cos(theta)


def _speck_centre(speck: _Speck, cx: float, cy: float, view: str) -> tuple[float, float]:
    return cx + speck.depth, cy + (speck.medio_lateral if view == "CC" else speck.supero_inferior)


def _speck_radius(speck: _Speck, spacing: float) -> float:
    """A speck's drawn radius: its own, but at least 0.6 pixel, so that it survives a coarse matrix."""
    return max(speck.radius, 0.6 * spacing)


def _lesion_shape(rng: np.random.Generator, side: str) -> _LesionSpec:
    """Kind, size and look of one lesion, before it has a place."""
    if rng.random() < 0.6:
        radius = float(rng.uniform(5.0, 30.0)) / 2
        shape = ("round", "oval", "spiculated")[int(rng.integers(3))]
        ratio = float(rng.uniform(0.55, 0.85)) if shape == "oval" else float(rng.uniform(0.9, 1.0))
        angle = {view: float(rng.uniform(0, math.pi)) for view in ("CC", "MLO")}
        # A circumscribed mass is smooth; a spiculated one's core is irregular as well.
        ks, strength = ((2, 3, 4), 0.02) if shape != "spiculated" else ((3, 4, 5, 6, 7, 9, 11), 0.09)
        lobes = {
            view: tuple((k, strength * float(rng.random()) / k**0.7, float(rng.uniform(0, 2 * math.pi))) for k in ks)
            for view in ("CC", "MLO")
        }
        spicules: dict[str, tuple[_Spicule, ...]] = {}
        if shape == "spiculated":
            count = int(rng.integers(8, 21))
            for view in ("CC", "MLO"):
                spicules[view] = tuple(
                    _Spicule(float(rng.uniform(0, 2 * math.pi)), radius * float(rng.uniform(0.4, 1.0)),
                             float(rng.uniform(0.5, 1.2)))
                    for _ in range(count)
                )
        return _LesionSpec(side, "mass", 0.0, 0.0, 0.0, radius=radius, ratio=ratio, angle=angle,
                           lobes=lobes, amplitude=float(rng.uniform(0.2, 0.45)), spicules=spicules)
    region = float(rng.uniform(5.0, 15.0)) / 2
    count = int(rng.integers(5, 21))
    # Uniform in a ball: the CC and the MLO are two projections of the same specks.
    direction = rng.standard_normal((count, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    offsets = direction * region * rng.random((count, 1)) ** (1 / 3)
    specks = tuple(
        _Speck(float(d), float(m), float(s), float(rng.uniform(0.3, 1.0)) / 2, float(rng.uniform(1700, 2400)))
        for (d, m, s) in offsets
    )
    return _LesionSpec(side, "calcification", 0.0, 0.0, 0.0, radius=region, specks=specks)


def _fits(spec: _LesionSpec, breast: _Breast, placed: list[_LesionSpec]) -> bool:
    """Whether the lesion and a margin around it lie inside the breast on both views, clear of the muscle and of
    the other lesions of that breast: every box then has breast tissue (and nothing else) around it.

    Judged on the lesion's own size (not as a coarse matrix draws it), so that
    a seed places its lesions alike at every matrix.
    """
    for view in ("CC", "MLO"):
        outline = breast.cc if view == "CC" else breast.mlo
        x0, y0, x1, y1 = spec.box_mm(breast, view, 0.0)
        margin = max(5.0, 0.6 * max(x1 - x0, y1 - y0))
        if not all(outline.contains(x, y, 3.0) for x in (x0 - margin, x1 + margin) for y in (y0 - margin, y1 + margin)):
            return False
        if view == "MLO" and not breast.pectoral.clear_of(x0 - margin, y0 - margin, 3.0):
            return False
        for other in placed:
            if other.side != spec.side:
                continue
            ox0, oy0, ox1, oy1 = other.box_mm(breast, view, 0.0)
            if x0 - margin < ox1 + 5 and ox0 - 5 < x1 + margin and y0 - margin < oy1 + 5 and oy0 - 5 < y1 + margin:
                return False
    return True


def _draw_lesions(rng: np.random.Generator, breasts: dict[str, _Breast], count: int) -> list[_LesionSpec]:
    """``count`` lesions, each placed by rejection where it fits on both views of its breast.

    A lesion that does not fit after many tries shrinks and tries again, so
    every positive study gets its lesions.
    """
    placed: list[_LesionSpec] = []
    for _ in range(count):
        side = "L" if rng.random() < 0.5 else "R"
        breast = breasts[side]
        spec = _lesion_shape(rng, side)
        for attempt in range(400):
            if attempt and attempt % 100 == 0:
                spec = _shrunk(spec)
            depth = breast.cc.depth * float(rng.uniform(0.12, 0.85))
            spread = math.sqrt(max(1 - (depth / breast.cc.depth) ** 2, 0.0))
            candidate = dataclasses.replace(
                spec,
                depth=depth,
                medio_lateral=float(rng.uniform(-1, 1)) * spread * min(breast.cc.top, breast.cc.bottom),
                supero_inferior=float(rng.uniform(-1, 1)) * spread * min(breast.mlo.top, breast.mlo.bottom),
            )
            if _fits(candidate, breast, placed):
                placed.append(candidate)
                break
    return placed


def _shrunk(spec: _LesionSpec) -> _LesionSpec:
    """The same lesion at 70 % of its size (masses no smaller than 5 mm)."""
    if spec.type == "mass":
        spicules = {
            view: tuple(dataclasses.replace(spicule, length=spicule.length * 0.7) for spicule in spicules)
            for view, spicules in spec.spicules.items()
        }
        return dataclasses.replace(spec, radius=max(spec.radius * 0.7, 2.5), spicules=spicules)
    specks = tuple(
        dataclasses.replace(s, depth=s.depth * 0.7, medio_lateral=s.medio_lateral * 0.7,
                            supero_inferior=s.supero_inferior * 0.7)
        for s in spec.specks
    )
    return dataclasses.replace(spec, radius=spec.radius * 0.7, specks=specks)


def _add_lesion(
    values: np.ndarray, spec: _LesionSpec, breast: _Breast, view: str, spacing: float, inside: np.ndarray,
    texture: np.ndarray, grid_spacing: float,
) -> None:
    """Draw a lesion into one view (chest wall at column 0), in place, at the image's own resolution.

    ``inside`` and ``texture`` are the tissue's fields on its grid (of
    ``grid_spacing`` mm): a lesion stays within the breast and its interior
    has some of the tissue's texture.
    """
    rows, columns = values.shape
    cx, cy = spec.centre(breast, view)
    reach = spec.radius * 2.1 + 2 * spacing if spec.type == "mass" else spec.radius + 2.0 + 2 * spacing
    c0, c1 = max(int((cx - reach) / spacing), 0), min(int((cx + reach) / spacing) + 2, columns)
    r0, r1 = max(int((cy - reach) / spacing), 0), min(int((cy + reach) / spacing) + 2, rows)
    if c0 >= c1 or r0 >= r1:
        return
    where = (slice(r0, r1), slice(c0, c1))
    x_mm, y_mm = _centres(c1 - c0, spacing, c0), _centres(r1 - r0, spacing, r0)
    dx, dy = (x_mm - np.float32(cx))[None, :], (y_mm - np.float32(cy))[:, None]
    within = _resample(inside, grid_spacing, y_mm, x_mm)
    edge = np.float32(max(spacing, 0.25))
    if spec.type == "mass":
        a, b, theta = spec.radius, spec.radius * spec.ratio, spec.angle[view]
        cos, sin = np.float32(math.cos(theta)), np.float32(math.sin(theta))
        u = (dx * cos + dy * sin) / np.float32(a)
        v = (-dx * sin + dy * cos) / np.float32(b)
        rho = np.sqrt(u * u + v * v) / spec.modulation(view, np.arctan2(v, u))
        radial = np.sqrt(dx * dx + dy * dy)
        # Along the ray from the centre the outline is radial / rho away, and (1 - rho) of that is left to the edge.
        to_edge = np.where(rho > 1e-6, radial * (1 - rho) / np.maximum(rho, np.float32(1e-6)), np.float32(a))
        core = np.clip(to_edge / edge + np.float32(0.5), 0, 1)
        dome = np.float32(0.8) + np.float32(0.2) * np.sqrt(np.clip(1 - rho * rho, 0, 1))
        # Denser than the fibroglandular tissue around it: up to the gland's level where it lies in fat, a bit
        # more everywhere; the tissue's texture shows through faintly.
        local = values[where]
        base = np.float32(0.85) * np.maximum(np.float32(breast.gland) - local, 0) + np.float32(
            spec.amplitude * (breast.gland - breast.fat)
        )
        base *= 1 + np.float32(0.08) * _resample(texture, grid_spacing, y_mm, x_mm)
        added = base * core * dome
        for spicule in spec.spicules.get(view, ()):
            along = dx * np.float32(math.cos(spicule.angle)) + dy * np.float32(math.sin(spicule.angle))
            across = np.abs(-dx * np.float32(math.sin(spicule.angle)) + dy * np.float32(math.cos(spicule.angle)))
            start = np.float32(b * 0.8)
            fraction = np.clip((along - start) / np.float32(spicule.length), 0, 1)
            half_width = np.float32(spicule.width / 2) * (1 - fraction)
            on = np.clip((half_width - across) / edge + np.float32(0.5), 0, 1) * ((along > start) & (fraction < 1))
            added = np.maximum(added, np.float32(0.6) * base * on)
        values[where] += added * within
        return
    brightest = np.zeros((r1 - r0, c1 - c0), dtype=np.float32)
    for speck in spec.specks:
        sx, sy = _speck_centre(speck, 0.0, 0.0, view)
        radius = np.float32(_speck_radius(speck, spacing))
        distance = np.sqrt((dx - np.float32(sx)) ** 2 + (dy - np.float32(sy)) ** 2)
        cover = np.clip((radius - distance) / np.float32(spacing) + np.float32(0.5), 0, 1)
        brightest = np.maximum(brightest, np.float32(speck.amplitude) * cover)
    values[where] += brightest * within


def _box_pixels(box_mm: tuple[float, float, float, float], spacing: float, rows: int, columns: int,
                mirror: bool) -> tuple[float, float, float, float]:
    """A box in mm (chest wall at x = 0) as SCOORD pixels of the stored image, one decimal, rounded outwards."""
    x0, y0, x1, y1 = (value / spacing for value in box_mm)
    x0, x1 = max(math.floor(x0 * 10) / 10, 0.0), min(math.ceil(x1 * 10) / 10, float(columns))
    y0, y1 = max(math.floor(y0 * 10) / 10, 0.0), min(math.ceil(y1 * 10) / 10, float(rows))
    if mirror:
        x0, x1 = columns - x1, columns - x0
    return round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)


def _render_view(
    seed: int, index: int, number: int, breast: _Breast, view: str, lesions: list[_LesionSpec], rows: int,
    spacing: float, mirror: bool,
) -> np.ndarray:
    """Pixel values (uint16, 12 bits) of view ``number`` (1-4) of study ``index``; ``mirror`` for a right breast.

    The tissue is smooth at the scale of a pixel of a full-field matrix, so
    it is drawn on a grid of at most :data:`_TISSUE_ROWS` rows and resampled;
    the lesions (specks of 0.3 mm) and the quantum noise are drawn at the
    matrix's own resolution. The tissue's random stream depends on the study
    and the view only, not on the lesions, so positive and negative studies
    share their tissue statistics.
    """
    columns = mammo_columns(rows)
    rng = np.random.default_rng([seed, index, 3, number])
    grid_rows = min(rows, _TISSUE_ROWS)
    grid_spacing = spacing if grid_rows == rows else mammo_pixel_spacing(grid_rows)
    values, inside, texture = _tissue(rng, breast, view, grid_rows, mammo_columns(grid_rows), grid_spacing)
    if grid_rows != rows:
        values = _resample(values, grid_spacing, _centres(rows, spacing), _centres(columns, spacing))
    for spec in lesions:
        _add_lesion(values, spec, breast, view, spacing, inside, texture, grid_spacing)
    # Quantum noise: per pixel, weaker on bigger pixels (more photons each).
    noise = rng.standard_normal(values.shape, dtype=np.float32)
    noise *= np.float32(24.0 * FULL_FIELD_SPACING_MM / spacing)
    values += noise
    np.clip(values, 0, MAX_VALUE, out=values)
    stored = np.rint(values, out=values).astype(np.uint16)
    return stored[:, ::-1] if mirror else stored


# --- DICOM -----------------------------------------------------------------------------------------------------


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = meaning
    return item


def _image_dataset(
    seed: int, index: int, number: int, laterality: str, view: str, study_uid: str, series_uid: str, rows: int,
    spacing: float,
) -> Dataset:
    """The header of view ``number`` (1-4): a Digital Mammography X-Ray Image (For Presentation) that dciodvfy
    passes, with what a reading workstation hangs by (Image Laterality, View Position and View Code, Patient
    Orientation). Every value derives from the seed, the study and the view, so a seed writes byte-identical files.
    """
    ds = dicom_instance(DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION, _uid(seed, index, "sop", number))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "120000"
    ds.AccessionNumber = f"PM{seed % 10000:04d}{index:05d}"
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "Triage Node phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "PHANTOM SCREENING MAMMOGRAPHY"
    ds.SeriesDescription = "PHANTOM MAMMO"
    ds.PatientName = f"PHANTOM^{index:05d}"
    ds.PatientID = f"PHANTOM-{seed}-{index:05d}"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.BodyPartExamined = "BREAST"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = str(index)
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = number
    ds.PatientOrientation = list(PATIENT_ORIENTATION[laterality, view])
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    code, meaning = VIEW_CODES[view]
    view_code = _code(code, meaning)
    view_code.ViewModifierCodeSequence = DicomSequence([])
    ds.ViewCodeSequence = DicomSequence([view_code])
    ds.AnatomicRegionSequence = DicomSequence([_code("76752008", "Breast")])
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.KVP = 29
    ds.BodyPartThickness = 50
    ds.CompressionForce = 100
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = mammo_columns(rows)
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1  # brighter = more attenuation = less X-ray intensity
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    return ds


def write_mammo_study(
    out_dir: Path, seed: int, index: int, positive: bool, rows: int = FULL_FIELD_ROWS
) -> MammoStudy:
    """Write one screening study (one folder, one file per view) and return it with its lesions' boxes."""
    spacing = mammo_pixel_spacing(rows)
    columns = mammo_columns(rows)
    breasts = _draw_breasts(np.random.default_rng([seed, index, 1]))
    lesion_rng = np.random.default_rng([seed, index, 2])
    specs = _draw_lesions(lesion_rng, breasts, int(lesion_rng.integers(1, 4))) if positive else []
    study_uid = _uid(seed, index, "study")
    series_uid = _uid(seed, index, "series")
    folder = out_dir / f"study_{index:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    found: list[MammoLesion] = []
    for number, (laterality, view) in enumerate(VIEWS, start=1):
        ds = _image_dataset(seed, index, number, laterality, view, study_uid, series_uid, rows, spacing)
        here = [spec for spec in specs if spec.side == laterality]
        pixels = _render_view(seed, index, number, breasts[laterality], view, here, rows, spacing, laterality == "R")
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"MG{number}_{laterality}{view}.dcm", enforce_file_format=True)
        for lesion, spec in enumerate(specs, start=1):
            if spec.side == laterality:
                box = _box_pixels(spec.box_mm(breasts[laterality], view, spacing), spacing, rows, columns,
                                  laterality == "R")
                found.append(MammoLesion(study_uid, lesion, str(ds.SOPInstanceUID), spec.type, box))
    found.sort(key=lambda lesion: lesion.lesion)  # lesion by lesion, each CC then MLO
    return MammoStudy(study_uid, int(bool(specs)), found, folder)


def write_mammo_phantoms(
    out_dir: Path, studies: int, positive_fraction: float = 0.5, seed: int = 0, rows: int = FULL_FIELD_ROWS
) -> list[MammoStudy]:
    """Write ``studies`` screening studies, ``labels.csv`` and ``lesions.csv``; the positives are spread evenly."""
    out_dir.mkdir(parents=True, exist_ok=True)
    positives = set(np.random.default_rng(seed).permutation(studies)[: round(studies * positive_fraction)].tolist())
    written = [write_mammo_study(out_dir, seed, i, i in positives, rows) for i in range(studies)]
    with open(out_dir / LABELS_FILE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LABELS_HEADER)
        writer.writerows([study.study_uid, study.label] for study in written)
    write_lesions(out_dir / LESIONS_FILE, [lesion for study in written for lesion in study.lesions])
    return written


def write_lesions(path: Path, lesions: list[MammoLesion]) -> None:
    """``lesions.csv``: one row per lesion per image, the box as x0 y0 x1 y1 with one decimal."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LESIONS_HEADER)
        for lesion in lesions:
            writer.writerow([lesion.study_uid, lesion.lesion, lesion.sop_instance_uid, lesion.type,
                             *(f"{value:.1f}" for value in lesion.box)])


def read_lesions(path: Path) -> dict[str, list[MammoLesion]]:
    """``lesions.csv`` -> study UID -> its lesions' boxes (studies without lesions are absent)."""
    out: dict[str, list[MammoLesion]] = {}
    with open(path, newline="") as handle:
        for row_number, row in enumerate(csv.DictReader(handle), start=2):
            try:
                study_uid, uid, kind = row["study_uid"], row["sop_instance_uid"], row["type"]
                if not study_uid or not uid:
                    raise ValueError("empty UID")
                lesion = int(row["lesion"])
                if lesion < 1:
                    raise ValueError(f"lesion {lesion}")
                if kind not in MAMMO_LESION_TYPES:
                    raise ValueError(f"type {kind!r}")
                x0, y0, x1, y1 = (float(row[name]) for name in ("x0", "y0", "x1", "y1"))
                if not (0 <= x0 < x1 and 0 <= y0 < y1):
                    raise ValueError(f"box {x0} {y0} {x1} {y1}")
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(
                    f"{path}:{row_number}: expected study_uid,lesion,sop_instance_uid,type,x0,y0,x1,y1 with lesion"
                    f" 1 or more, type one of {', '.join(MAMMO_LESION_TYPES)} and x0 < x1, y0 < y1 ({exc})"
                ) from None
            out.setdefault(study_uid, []).append(MammoLesion(study_uid, lesion, uid, kind, (x0, y0, x1, y1)))
    return out
