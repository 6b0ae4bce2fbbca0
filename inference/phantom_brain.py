"""Synthetic brain MRI: the lesion-segmentation model's test and demo data, written as real DICOM.

A brain study is three co-registered axial series, T1-weighted, T2-weighted
and FLAIR (MR Image Storage), on one grid and one Frame of Reference: a head
of scalp, skull, cerebrospinal fluid over the brain and in the interhemispheric
fissure, a folded grey-matter cortex over white matter, deep grey nuclei and
two lateral ventricles. Each contrast gives the tissues the order its sequence
gives them (T1: white > grey > fluid; T2: fluid > grey > white; FLAIR: fluid
suppressed, grey a little over white, lesions bright), under a smooth
multiplicative bias field and Rician noise (the magnitude of a complex signal
with Gaussian noise in both channels).

Positive studies carry either a tumour (an enhancing rim around a necrotic
core, in oedema that is bright on T2 and FLAIR) or several white-matter
hyperintensities, 3-40 mm. The ground truth is one DICOM Segmentation per study
on the FLAIR grid, referencing the FLAIR series, with one segment, ``lesion``:
every abnormal voxel (core, rim, oedema, hyperintensity). It lies in its own
folder, ``truth/``, apart from the images a model reads; a negative study has a
SEG too, with an empty mask. ``labels.csv`` has one row per study:
``study_uid,label,lesion_volume_ml``.

The anatomy lives in patient millimetres, so the matrix only changes the
resolution. Everything is vectorised numpy and deterministic for a seed: the
same seed writes byte-identical files.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from triagenode.inference.phantom import AXIAL_ORIENTATION, LABELS_FILE, dicom_instance

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CONTRASTS: tuple[str, ...] = ("T1", "T2", "FLAIR")
LESION_CLASSES: tuple[str, ...] = ("lesion",)
"""The segments of the ground truth: one, every abnormal tissue (tumour core, rim and oedema, hyperintensities)."""
LABELS_HEADER: tuple[str, ...] = ("study_uid", "label", "lesion_volume_ml")
TRUTH_FOLDER = "truth"
SEG_FILE = "seg.dcm"

FIELD_OF_VIEW_MM = 230.0
SLICE_THICKNESS_MM = 5.0
"""Slices of 5 mm, contiguous (Spacing Between Slices 5 mm)."""
MAX_VALUE = 4095

# Tissue labels of the anatomy volume.
AIR, SCALP, SKULL, CSF, GREY, WHITE, DEEP_GREY, NECROSIS, RIM, OEDEMA, WMH = range(11)
LESION_TISSUES: tuple[int, ...] = (NECROSIS, RIM, OEDEMA, WMH)
"""The labels the ground-truth mask covers."""

SIGNAL: dict[str, np.ndarray] = {
    #                        air scalp skull  CSF  grey white deep necrosis rim oedema WMH
    "T1": np.array([0, 2300, 150, 380, 1150, 1650, 1250, 450, 1350, 950, 1150], dtype=np.float32),
    "T2": np.array([0, 1400, 120, 3200, 1550, 1050, 1350, 2900, 1900, 2450, 2200], dtype=np.float32),
    "FLAIR": np.array([0, 1100, 100, 180, 1450, 1080, 1300, 650, 2350, 2650, 2500], dtype=np.float32),
}
"""Mean signal (arbitrary units) of each tissue label per contrast, before bias field and noise."""


@dataclass(frozen=True)
class _Sequence:
    """What the MR header says of one contrast's acquisition."""

    description: str
    series_number: int
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    echo_time: float
    repetition_time: float
    inversion_time: float | None
    flip_angle: float
    echo_train_length: int
    window: tuple[int, int]


SEQUENCES: dict[str, _Sequence] = {
    "T1": _Sequence("T1 AX", 3, ("SE",), ("SK",), 12.0, 550.0, None, 90.0, 1, (1200, 2400)),
    "T2": _Sequence("T2 AX", 4, ("SE",), ("SK",), 100.0, 4500.0, None, 90.0, 16, (1600, 3200)),
    "FLAIR": _Sequence("FLAIR AX", 5, ("SE", "IR"), ("SK", "MP"), 120.0, 9000.0, 2500.0, 90.0, 24, (1400, 2800)),
}
"""Spin echo T1 and T2 (turbo, for T2) and an inversion-recovery FLAIR, at 1.5 T."""


@dataclass
class BrainStudy:
    study_uid: str
    label: int
    """1 when the study has lesions."""
    lesion_volume_ml: float
    """Voxels of the ground-truth mask times the voxel's volume (pixel spacing squared times slice spacing)."""
    directory: Path | None = None
    series_uids: dict[str, str] = field(default_factory=dict)
    """Contrast (``T1``, ``T2``, ``FLAIR``) -> Series Instance UID."""
    seg_path: Path | None = None
    """The ground-truth DICOM SEG (on the FLAIR grid)."""


@dataclass(frozen=True)
class BrainVolume:
    """One head on the study's grid: tissue labels (slices, rows, columns), slice 0 the most inferior."""

    labels: np.ndarray
    pixel_mm: float
    z_mm: np.ndarray
    """Each slice's position along the normal (patient z, mm), ascending."""
    kind: str
    """``"none"``, ``"tumour"`` or ``"wmh"``."""

    @property
    def mask(self) -> np.ndarray:
        """The ground truth: every lesion tissue."""
        return np.isin(self.labels, LESION_TISSUES)

    @property
    def voxel_ml(self) -> float:
        return self.pixel_mm * self.pixel_mm * SLICE_THICKNESS_MM / 1000.0


def _uid(seed: int, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["triagenode-brain-phantom", str(seed), *map(str, parts)]))


def _pixel_mm(matrix: int) -> float:
    """Pixel size (mm) of a ``matrix`` over the field of view, rounded to 6 decimals (a DS holds 16 characters)."""
    return round(FIELD_OF_VIEW_MM / matrix, 6)


# --- anatomy ---------------------------------------------------------------------------------------------------


def _grid(slices: int, matrix: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Voxel centres (mm) broadcastable to (slices, matrix, matrix): x to the patient's left, y posterior, z up."""
    pixel = _pixel_mm(matrix)
    coords = (np.arange(matrix, dtype=np.float32) - np.float32(matrix / 2 - 0.5)) * np.float32(pixel)
    z = (np.arange(slices, dtype=np.float32) - np.float32(slices / 2 - 0.5)) * np.float32(SLICE_THICKNESS_MM)
    return coords[None, None, :], coords[None, :, None], z[:, None, None], pixel


def _depth(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: float, b: float, c: float,
           cz: float = 0.0) -> np.ndarray:
    """Approximate depth (mm) under the surface of an ellipsoid of semi-axes a, b, c centred at (0, 0, cz).

    Along the ray from the centre: the radial distance to the surface minus
    the point's, positive inside.
    """
    dz = z - np.float32(cz)
    radial = np.sqrt(x * x + y * y + dz * dz)
    rho = np.sqrt((x / np.float32(a)) ** 2 + (y / np.float32(b)) ** 2 + (dz / np.float32(c)) ** 2)
    return radial / np.maximum(rho, np.float32(1e-6)) - radial


def brain_volume(seed: int, index: int, positive: bool, slices: int = 28, matrix: int = 256) -> BrainVolume:
    """The tissue labels of study ``index``: the anatomy from one random stream, the lesions from another.

    The anatomy's stream does not depend on ``positive``, so a positive and a
    negative study of the same index share their head.
    """
    rng = np.random.default_rng([seed, index, 1])
    x, y, z, pixel = _grid(slices, matrix)
    shape = (slices, matrix, matrix)
    # The head: an ellipsoid centred a little below the middle slice, so the top slices show the vertex.
    a, b = float(rng.uniform(68, 76)), float(rng.uniform(88, 96))
    c, cz = float(rng.uniform(95, 105)), float(rng.uniform(-35, -25))
    scalp_mm, skull_mm, csf_mm = float(rng.uniform(4, 6)), float(rng.uniform(5, 7)), float(rng.uniform(1.5, 3))
    depth = _depth(x, y, z, a, b, c, cz)
    labels = np.full(shape, AIR, dtype=np.uint8)
    labels[depth > 0] = SCALP
    labels[depth > scalp_mm] = SKULL
    brain_surface = scalp_mm + skull_mm
    labels[depth > brain_surface] = CSF
    # Cortex: grey matter whose thickness follows gyri (a few angular harmonics), white matter under it.
    theta = np.arctan2(y, x)
    phi = np.arctan2(z - np.float32(cz), np.sqrt(x * x + y * y))
    folds = np.zeros(np.broadcast_shapes(theta.shape, phi.shape), dtype=np.float32)
    for _ in range(3):
        k, m, p1, p2 = int(rng.integers(5, 11)), int(rng.integers(3, 8)), rng.uniform(0, 6.3), rng.uniform(0, 6.3)
        folds += np.sin(k * theta + np.float32(p1)) * np.cos(m * phi + np.float32(p2))
    cortex_mm = np.float32(3.5) + np.float32(1.6) * folds
    brain_depth = depth - np.float32(brain_surface + csf_mm)
    labels[brain_depth > 0] = GREY
    labels[brain_depth > cortex_mm] = WHITE
    # The interhemispheric fissure above the ventricles: fluid with a grey lining along the midline.
    vz = float(rng.uniform(0, 10))
    above = z > np.float32(vz + 14)
    labels[(np.abs(x) < np.float32(3.5)) & (labels == WHITE) & above] = GREY
    labels[(np.abs(x) < np.float32(1.2)) & (brain_depth > 0) & above] = CSF
    # Deep grey nuclei (thalami and basal ganglia) beside the ventricles.
    for side in (-1.0, 1.0):
        nucleus = ((x - side * 17) / 10) ** 2 + ((y - 5) / 16) ** 2 + ((z - (vz - 12)) / 14) ** 2 <= 1
        labels[nucleus & (labels == WHITE)] = DEEP_GREY
    # Lateral ventricles: two bent ellipsoids either side of the midline, wider in front.
    spread = float(rng.uniform(5, 9))
    for side in (-1.0, 1.0):
        bend = np.float32(0.004) * (y + 10) ** 2
        width = np.float32(spread * 0.7) + np.float32(0.08) * np.clip(-y, 0, None)
        ventricle = ((x - side * (spread + 2)) / width) ** 2 + ((y + 5) / 34) ** 2 + (
            (z - np.float32(vz) + bend) / 11
        ) ** 2 <= 1
        labels[ventricle & (brain_depth > 10)] = CSF
    third = (np.abs(x) < np.float32(2.0)) & (np.abs(y - 5) < np.float32(12)) & (np.abs(z - (vz - 14)) < 8)
    labels[third & (brain_depth > 10)] = CSF
    kind = "none"
    if positive:
        lesion_rng = np.random.default_rng([seed, index, 2])
        kind = "tumour" if lesion_rng.random() < 0.5 else "wmh"
        (_add_tumour if kind == "tumour" else _add_hyperintensities)(lesion_rng, labels, x, y, z, pixel)
    z_mm = z[:, 0, 0].astype(np.float64)
    return BrainVolume(labels, pixel, z_mm, kind)


def _white_voxel(rng: np.random.Generator, labels: np.ndarray, margin_voxels: tuple[int, int, int]) -> tuple[int, ...]:
    """A random white-matter voxel ``margin_voxels`` (slices, rows, columns) or more from the volume's edges."""
    ks, rs, cs = margin_voxels
    inner = labels[ks : labels.shape[0] - ks, rs : labels.shape[1] - rs, cs : labels.shape[2] - cs]
    candidates = np.flatnonzero(inner == WHITE)
    if candidates.size == 0:
        raise ValueError("the volume has no white matter to place a lesion in; use more slices")
    k, r, col = np.unravel_index(candidates[rng.integers(candidates.size)], inner.shape)
    return int(k) + ks, int(r) + rs, int(col) + cs


def _box(centre: tuple[int, ...], reach_mm: float, pixel: float, shape: tuple[int, ...]) -> tuple[slice, ...]:
    k, r, c = centre
    dk, dp = math.ceil(reach_mm / SLICE_THICKNESS_MM) + 1, math.ceil(reach_mm / pixel) + 1
    return (slice(max(k - dk, 0), min(k + dk + 1, shape[0])), slice(max(r - dp, 0), min(r + dp + 1, shape[1])),
            slice(max(c - dp, 0), min(c + dp + 1, shape[2])))


def _add_tumour(rng: np.random.Generator, labels: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray,
                pixel: float) -> None:
    """A tumour in white matter, in place: necrotic core, enhancing rim, and oedema (up to 40 mm across)
    in the brain around it; the outline is lobulated (a few angular harmonics)."""
    radius = float(rng.uniform(6, 14))
    core = radius * float(rng.uniform(0.35, 0.6))
    oedema = min(radius * float(rng.uniform(1.3, 1.7)), 16.0)  # the lobes reach 24 % further: 40 mm across
    centre = _white_voxel(rng, labels, (2, 0, 0))
    where = _box(centre, oedema * 1.2, pixel, labels.shape)
    k, r, c = centre
    dx = x[:, :, where[2]] - x[0, 0, c]
    dy = y[:, where[1], :] - y[0, r, 0]
    dz = z[where[0]] - z[k, 0, 0]
    distance = np.sqrt(dx * dx + dy * dy + dz * dz)
    theta, phi = np.arctan2(dy, dx), np.arctan2(dz, np.sqrt(dx * dx + dy * dy))
    lobes = np.float32(1.0)
    for _ in range(2):
        n, p = int(rng.integers(2, 5)), float(rng.uniform(0, 6.3))
        lobes = lobes + np.float32(0.12) * np.sin(n * theta + np.float32(p)) * np.cos(2 * phi)
    relative = distance / lobes
    box = labels[where]
    brain = np.isin(box, (GREY, WHITE, DEEP_GREY))
    box[(relative <= oedema) & brain & (box != GREY)] = OEDEMA  # oedema spreads through white matter
    box[relative <= radius] = RIM
    box[relative <= core] = NECROSIS


def _add_hyperintensities(rng: np.random.Generator, labels: np.ndarray, x: np.ndarray, y: np.ndarray,
                          z: np.ndarray, pixel: float) -> None:
    """3-10 white-matter hyperintensities of 3-12 mm, in place: ellipsoidal blobs within the white matter."""
    for _ in range(int(rng.integers(3, 11))):
        diameter = float(rng.uniform(3, 12))
        axes = diameter / 2 * rng.uniform(0.75, 1.25, size=3)
        centre = _white_voxel(rng, labels, (1, 0, 0))
        where = _box(centre, float(axes.max()), pixel, labels.shape)
        k, r, c = centre
        dx = (x[:, :, where[2]] - x[0, 0, c]) / np.float32(axes[0])
        dy = (y[:, where[1], :] - y[0, r, 0]) / np.float32(axes[1])
        dz = (z[where[0]] - z[k, 0, 0]) / np.float32(axes[2])
        box = labels[where]
        box[(dx * dx + dy * dy + dz * dz <= 1) & np.isin(box, (WHITE, WMH))] = WMH


def render(volume: BrainVolume, contrast: str, seed: int, index: int) -> np.ndarray:
    """Stored pixel values (uint16, 0-4095) of one contrast: tissue signal, bias field, Rician noise."""
    rng = np.random.default_rng([seed, index, 3, CONTRASTS.index(contrast)])
    signal = SIGNAL[contrast][volume.labels]
    slices, rows, columns = volume.labels.shape
    # A smooth multiplicative bias field: a low-order polynomial in normalised coordinates, within +-15 %.
    u = np.linspace(-1, 1, columns, dtype=np.float32)[None, None, :]
    v = np.linspace(-1, 1, rows, dtype=np.float32)[None, :, None]
    w = np.linspace(-1, 1, slices, dtype=np.float32)[:, None, None]
    cx, cy, cw, cxx, cyy, cxy = (np.float32(value) for value in rng.uniform(-0.06, 0.06, size=6))
    bias = np.float32(1) + cx * u + cy * v + cw * w + cxx * (u * u - np.float32(1 / 3)) \
        + cyy * (v * v - np.float32(1 / 3)) + cxy * u * v
    signal *= bias
    sigma = np.float32(rng.uniform(25, 40))
    real = rng.standard_normal(signal.shape, dtype=np.float32)
    real *= sigma
    real += signal
    imaginary = rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary *= sigma
    magnitude = np.hypot(real, imaginary, out=real)
    np.clip(magnitude, 0, MAX_VALUE, out=magnitude)
    return np.rint(magnitude, out=magnitude).astype(np.uint16)


# --- DICOM -----------------------------------------------------------------------------------------------------


def _slice_dataset(seed: int, index: int, contrast: str, k: int, study_uid: str, series_uid: str,
                   volume: BrainVolume) -> Dataset:
    """Slice ``k`` (0 the most inferior) of one contrast: an MR Image that dciodvfy passes, with the
    acquisition's parameters and the full geometry. Every value derives from the seed, the study, the
    contrast and the slice."""
    sequence = SEQUENCES[contrast]
    slices, rows, columns = volume.labels.shape
    pixel = volume.pixel_mm
    corner = round(-FIELD_OF_VIEW_MM / 2 + pixel / 2, 6)
    z = round(float(volume.z_mm[k]), 3)
    ds = dicom_instance(MR_IMAGE_STORAGE, _uid(seed, index, "sop", contrast, k))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = f"12{sequence.series_number:02d}00"
    ds.AccessionNumber = f"PB{seed % 10000:04d}{index:05d}"
    ds.Modality = "MR"
    ds.Manufacturer = "Triage Node phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "PHANTOM MRI BRAIN"
    ds.SeriesDescription = sequence.description
    ds.PatientName = f"PHANTOM^{index:05d}"
    ds.PatientID = f"PHANTOM-{seed}-{index:05d}"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "BRAIN"
    ds.ScanningSequence = list(sequence.scanning_sequence)
    ds.SequenceVariant = list(sequence.sequence_variant)
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SliceThickness = SLICE_THICKNESS_MM
    ds.RepetitionTime = sequence.repetition_time
    ds.EchoTime = sequence.echo_time
    if sequence.inversion_time is not None:
        ds.InversionTime = sequence.inversion_time
    ds.NumberOfAverages = 1
    ds.ImagingFrequency = 63.87
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = 1
    ds.MagneticFieldStrength = 1.5
    ds.SpacingBetweenSlices = SLICE_THICKNESS_MM
    ds.EchoTrainLength = sequence.echo_train_length
    ds.FlipAngle = sequence.flip_angle
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = str(index)
    ds.SeriesNumber = sequence.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [corner, corner, z]
    ds.ImageOrientationPatient = list(AXIAL_ORIENTATION)
    ds.FrameOfReferenceUID = _uid(seed, index, "for")
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = z
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = [pixel, pixel]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = sequence.window
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    return ds


def _segmentation(seed: int, index: int, sources: list[Dataset], mask: np.ndarray) -> hd.seg.Segmentation:
    """The ground truth as a BINARY SEG on the FLAIR slices (``sources``, ascending), every frame kept (an
    empty mask too), deterministic: UIDs from the seed and fixed dates."""
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=LESION_CLASSES[0],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        tracking_uid=_uid(seed, index, "segment", 1),
        tracking_id="lesion",
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=_uid(seed, index, "seg-series"),
        series_number=90,
        sop_instance_uid=_uid(seed, index, "seg"),
        instance_number=1,
        manufacturer="Triage Node phantom",
        manufacturer_model_name="brain phantom",
        software_versions="1",
        device_serial_number="0",
        omit_empty_frames=False,
        content_label="TRUTH",
        content_description="Phantom lesion ground truth",
        content_creator_name="PHANTOM^TRUTH",
    )
    seg.SeriesDescription = "Ground truth: brain lesions"
    seg.SeriesDate = seg.ContentDate = "20260101"
    seg.SeriesTime = seg.ContentTime = "120900"
    seg.InstanceCreationDate, seg.InstanceCreationTime = "20260101", "120900"
    for item in seg.get("ContributingEquipmentSequence", []):  # highdicom stamps its own contribution with now
        if "ContributionDateTime" in item:
            item.ContributionDateTime = "20260101120900"
    dimension_uid = _uid(seed, index, "seg-dimensions")  # highdicom draws a fresh one
    for item in [*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence]:
        item.DimensionOrganizationUID = dimension_uid
    return seg


def write_brain_study(
    out_dir: Path, seed: int, index: int, positive: bool, slices: int = 28, matrix: int = 256
) -> BrainStudy:
    """Write one study: ``T1/``, ``T2/`` and ``FLAIR/`` (one file per slice) and ``truth/seg.dcm``."""
    if slices < 16:
        raise ValueError(f"a brain study needs at least 16 slices, not {slices}")
    if matrix < 64:
        raise ValueError(f"a brain study needs a matrix of at least 64, not {matrix}")
    volume = brain_volume(seed, index, positive, slices, matrix)
    study_uid = _uid(seed, index, "study")
    folder = out_dir / f"study_{index:05d}"
    series_uids: dict[str, str] = {}
    flair: list[Dataset] = []
    for contrast in CONTRASTS:
        series_uids[contrast] = _uid(seed, index, "series", contrast)
        pixels = render(volume, contrast, seed, index)
        (folder / contrast).mkdir(parents=True, exist_ok=True)
        for k in range(slices):
            ds = _slice_dataset(seed, index, contrast, k, study_uid, series_uids[contrast], volume)
            ds.PixelData = pixels[k].tobytes()
            ds.save_as(folder / contrast / f"{contrast}{k + 1:04d}.dcm", enforce_file_format=True)
            if contrast == "FLAIR":
                flair.append(ds)
    mask = volume.mask
    seg_path = folder / TRUTH_FOLDER / SEG_FILE
    seg_path.parent.mkdir(parents=True, exist_ok=True)
    _segmentation(seed, index, flair, mask).save_as(seg_path, enforce_file_format=True)
    volume_ml = round(int(np.count_nonzero(mask)) * volume.voxel_ml, 3)
    return BrainStudy(study_uid, int(bool(mask.any())), volume_ml, folder, series_uids, seg_path)


def write_brain_phantoms(
    out_dir: Path, studies: int, positive_fraction: float = 0.5, seed: int = 0, slices: int = 28, matrix: int = 256
) -> list[BrainStudy]:
    """Write ``studies`` brain studies and ``labels.csv``; the positives are spread evenly."""
    out_dir.mkdir(parents=True, exist_ok=True)
    positives = set(np.random.default_rng(seed).permutation(studies)[: round(studies * positive_fraction)].tolist())
    written = [write_brain_study(out_dir, seed, i, i in positives, slices, matrix) for i in range(studies)]
    with open(out_dir / LABELS_FILE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LABELS_HEADER)
        writer.writerows([study.study_uid, study.label, f"{study.lesion_volume_ml:.3f}"] for study in written)
    return written


def read_brain_labels(path: Path) -> dict[str, tuple[int, float]]:
    """``labels.csv`` -> study UID -> (label, lesion volume in ml); a positive has a volume, a negative none."""
    out: dict[str, tuple[int, float]] = {}
    with open(path, newline="") as handle:
        for row_number, row in enumerate(csv.DictReader(handle), start=2):
            try:
                study_uid = row["study_uid"]
                if not study_uid:
                    raise ValueError("empty UID")
                label = int(row["label"])
                if label not in (0, 1):
                    raise ValueError(f"label {label}")
                volume = float(row["lesion_volume_ml"])
                if not math.isfinite(volume) or volume < 0 or (volume > 0) != (label == 1):
                    raise ValueError(f"label {label} with lesion volume {volume}")
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(
                    f"{path}:{row_number}: expected study_uid,label,lesion_volume_ml with label 0 or 1 and a"
                    f" volume (ml) above 0 exactly when the label is 1 ({exc})"
                ) from None
            out[study_uid] = (label, volume)
    return out


def truth_mask(seg_path: Path) -> np.ndarray:
    """The ground truth of a SEG, (slices, rows, columns) bool, slices ascending along the normal (FLAIR order)."""
    seg = hd.seg.segread(seg_path)
    orientation = np.array(
        seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float
    )
    normal = np.cross(orientation[:3], orientation[3:])
    positions = [
        float(np.dot(normal, np.array(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)))
        for item in seg.PerFrameFunctionalGroupsSequence
    ]
    frames = seg.pixel_array.reshape(len(positions), int(seg.Rows), int(seg.Columns))
    return frames[np.argsort(positions, kind="stable")] > 0
