"""Synthetic chest CT studies: the project's test and demo data, written as real DICOM.

An elliptic torso of soft tissue with a subcutaneous fat layer, a spine, two
lungs near -850 HU that taper towards apex and base, a trachea and main
bronchi, vessels as thin tubes through the lungs, and CT-like noise. Positive
studies carry 1-3 nodules of 4-25 mm, spherical or lobulated, inside a lung.
Everything is vectorised numpy and deterministic for a seed: the same seed
writes the same pixels and the same UIDs.

``labels.csv`` has one row per study: ``study_uid,label,nodules`` where
``nodules`` lists ``x y z diameter`` in patient millimetres, ``;`` between
nodules, so training can tell which slices pass through a nodule.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

FIELD_OF_VIEW_MM = 350.0
SLICE_THICKNESS_MM = 2.5
LABELS_FILE = "labels.csv"


@dataclass(frozen=True)
class Nodule:
    """A nodule's centre in patient coordinates (mm) and its diameter (mm)."""

    x: float
    y: float
    z: float
    diameter: float

    def as_text(self) -> str:
        return f"{self.x:.1f} {self.y:.1f} {self.z:.1f} {self.diameter:.1f}"

    @classmethod
    def from_text(cls, text: str) -> Nodule:
        x, y, z, d = (float(part) for part in text.split())
        return cls(x, y, z, d)


@dataclass
class PhantomStudy:
    study_uid: str
    label: int
    nodules: list[Nodule] = field(default_factory=list)
    directory: Path | None = None


def _uid(seed: int, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["triagenode-phantom", str(seed), *map(str, parts)]))


def chest_volume(
    rng: np.random.Generator, slices: int, matrix: int, nodules: int
) -> tuple[np.ndarray, list[Nodule], float]:
    """One chest in HU, shape (slices, matrix, matrix), with its nodules; returns (hu, nodules, pixel mm)."""
    pixel = FIELD_OF_VIEW_MM / matrix
    coords = (np.arange(matrix, dtype=np.float32) - matrix / 2 + 0.5) * pixel
    y, x = np.meshgrid(coords, coords, indexing="ij")  # mm, y grows posterior
    z = (np.arange(slices, dtype=np.float32) - slices / 2 + 0.5) * SLICE_THICKNESS_MM
    zz = z[:, None, None]
    height = slices * SLICE_THICKNESS_MM / 2

    width, depth = rng.uniform(150, 170), rng.uniform(105, 120)
    torso = (x / width) ** 2 + (y / depth) ** 2
    hu = np.full((slices, matrix, matrix), -1000.0, dtype=np.float32)
    body = np.broadcast_to(torso <= 1.0, hu.shape)
    hu[body] = -90.0  # fat
    muscle = np.broadcast_to(torso <= 0.85, hu.shape)
    hu[muscle] = 45.0
    spine = (x / 18) ** 2 + ((y - depth * 0.72) / 16) ** 2 <= 1.0
    hu[np.broadcast_to(spine, hu.shape)] = 650.0

    # Lungs: two ellipses whose size follows a dome from apex to base.
    taper = np.clip(1.0 - (zz / (height * 1.15)) ** 2, 0.15, 1.0)
    lung_mask = np.zeros(hu.shape, dtype=bool)
    for side in (-1.0, 1.0):
        cx, cy = side * width * 0.45, -depth * 0.05
        ax, ay = width * 0.33 * np.sqrt(taper), depth * 0.62 * np.sqrt(taper)
        lung_mask |= ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0
    hu[lung_mask] = rng.uniform(-880, -820)

    # Vessels: thin tubes through the lungs, in random directions (computed on lung voxels only).
    lung_index = np.nonzero(lung_mask)
    lx, ly, lz = x[lung_index[1], lung_index[2]], y[lung_index[1], lung_index[2]], z[lung_index[0]]
    lung_hu = hu[lung_index]
    for _ in range(18):
        sx, sy = rng.uniform(-width * 0.7, width * 0.7), rng.uniform(-depth * 0.5, depth * 0.5)
        sz = rng.uniform(-height, height)
        ux, uy, uz = rng.normal(size=3)
        norm = np.sqrt(ux * ux + uy * uy + uz * uz)
        ux, uy, uz = ux / norm, uy / norm, uz / norm
        dx, dy, dz = lx - sx, ly - sy, lz - sz
        along = dx * ux + dy * uy + dz * uz
        vessel = dx * dx + dy * dy + dz * dz - along * along <= rng.uniform(1.0, 3.0) ** 2
        lung_hu[vessel] = rng.uniform(20, 60)
    hu[lung_index] = lung_hu

    # Trachea and main bronchi: air tubes with a soft wall.
    trachea = ((x / 9) ** 2 + ((y + depth * 0.25) / 9) ** 2 <= 1.0) & (zz > height * 0.2)
    hu[np.broadcast_to(trachea, hu.shape)] = -1000.0
    for side in (-1.0, 1.0):
        bronchus = (((x - side * (zz - height * 0.2) * -0.9) / 5) ** 2 + ((y + depth * 0.25) / 5) ** 2 <= 1.0) & (
            (zz <= height * 0.2) & (zz > -height * 0.3)
        )
        hu[bronchus & lung_mask] = -1000.0

    found: list[Nodule] = []
    lung_voxels = np.argwhere(lung_mask[2:-2] if slices > 8 else lung_mask)
    for _ in range(nodules):
        diameter = float(rng.uniform(4.0, 25.0))
        radius = diameter / 2
        for _attempt in range(50):
            k, i, j = lung_voxels[rng.integers(len(lung_voxels))]
            k += 2 if slices > 8 else 0
            cx, cy, cz = float(x[i, j]), float(y[i, j]), float(z[k])
            if lung_mask[k, i, j]:
                break
        # Work in a box around the nodule only.
        reach = radius * 1.3 + 2 * pixel
        ks = slice(
            max(0, int((cz - reach - z[0]) // SLICE_THICKNESS_MM)), int((cz + reach - z[0]) // SLICE_THICKNESS_MM) + 2
        )
        is_ = slice(max(0, int((cy - reach - coords[0]) // pixel)), int((cy + reach - coords[0]) // pixel) + 2)
        js = slice(max(0, int((cx - reach - coords[0]) // pixel)), int((cx + reach - coords[0]) // pixel) + 2)
        rel_x, rel_y, rel_z = x[None, is_, js] - cx, y[None, is_, js] - cy, zz[ks] - cz
        r = np.sqrt(rel_x**2 + rel_y**2 + rel_z**2)
        if rng.random() < 0.5:  # lobulated: the radius varies with direction
            theta = np.arctan2(rel_y, rel_x)
            phi = np.arctan2(rel_z, np.sqrt(rel_x**2 + rel_y**2))
            lobes = rng.integers(3, 7)
            bumps = 1.0 + 0.22 * np.sin(lobes * theta + rng.uniform(0, 6.3)) * np.cos(2 * phi)
            edge = radius * bumps
        else:
            edge = radius
        inside = np.clip((edge - r) / max(pixel, 0.6) + 0.5, 0.0, 1.0)  # a soft edge one pixel wide
        box = hu[ks, is_, js]
        hu[ks, is_, js] = box * (1 - inside) + rng.uniform(10, 60) * inside
        found.append(Nodule(round(cx, 1), round(cy, 1), round(cz, 1), round(diameter, 1)))

    # Quantum noise, stronger in the body than in air, slightly correlated like a real kernel.
    noise = rng.normal(0.0, 18.0, size=hu.shape).astype(np.float32)
    noise = (noise + np.roll(noise, 1, axis=2) + np.roll(noise, 1, axis=1)) / np.sqrt(3)
    hu += noise * np.where(hu > -950, 1.0, 0.4)
    return hu, found, pixel


AXIAL_ORIENTATION = (1, 0, 0, 0, 1, 0)
"""Image Orientation (Patient) of an axial slice: rows along +x, columns along +y."""
HU_RESCALE_INTERCEPT = -1024
"""Stored value = HU + 1024, the usual scanner convention: air (-1000 HU) and anything denser store non-negative."""


def dicom_instance(
    sop_class_uid: str, sop_instance_uid: str, *, transfer_syntax_uid: str = ExplicitVRLittleEndian
) -> Dataset:
    """An empty instance whose file meta and SOP Common UIDs agree, ready for ``save_as``.

    The SOP class and instance UIDs stand twice in a DICOM file (file meta and
    data set); setting both in one place keeps a writer from storing a file
    whose meta names another instance than its body.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax_uid
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    return ds


def ct_image_header(
    *,
    sop_instance_uid: str,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    series_number: int,
    instance_number: int,
    position: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_thickness: float,
    rows: int,
    columns: int,
) -> Dataset:
    """The header of one axial CT Image Storage slice, 16-bit signed MONOCHROME2 with HU rescale, no pixels.

    The phantom generator and the tests' small instances both need a CT slice
    that the node's series selection and preprocessing accept: the geometry
    (position, orientation, spacing, thickness), the image pixel module and
    the rescale to HU. Written once here, the two cannot drift apart, so a test
    instance is read the same way as a phantom. The caller adds what differs
    (patient, study and series descriptions, dates) and ``PixelData``:
    ``rows * columns`` little-endian int16 values, stored = HU + 1024.

    ``position`` is Image Position (Patient) in mm; ``pixel_spacing`` is
    (row spacing, column spacing) in mm. Values are written as given: a DS
    value holds at most 16 characters, so the caller rounds them itself.
    """
    ds = dicom_instance(CTImageStorage, sop_instance_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "CT"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [round(value, 6) for value in position]  # a DS holds 16 characters at most
    ds.ImageOrientationPatient = list(AXIAL_ORIENTATION)
    ds.PixelSpacing = list(pixel_spacing)
    ds.SliceThickness = slice_thickness
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = HU_RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    return ds


def _slice_dataset(
    seed: int, index: int, study_uid: str, series_uid: str, k: int, z: float, pixel: float, matrix: int
) -> Dataset:
    """Slice ``k`` of phantom study ``index``: the common CT header plus what makes it a plausible chest CT.

    Every value derives from the seed, the study and the slice, so a seed
    writes byte-identical files; the attribute set passes dciodvfy.
    """
    corner = -FIELD_OF_VIEW_MM / 2 + pixel / 2
    ds = ct_image_header(
        sop_instance_uid=_uid(seed, index, "sop", k),
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=_uid(seed, index, "for"),
        series_number=2,
        instance_number=k + 1,
        position=[corner, corner, round(z, 3)],
        pixel_spacing=[round(pixel, 6), round(pixel, 6)],
        slice_thickness=SLICE_THICKNESS_MM,
        rows=matrix,
        columns=matrix,
    )
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = f"PH{seed % 10000:04d}{index:05d}"
    ds.Manufacturer = "Triage Node phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "PHANTOM CHEST CT"
    ds.SeriesDescription = "PHANTOM AXIAL 2.5MM"
    ds.PatientName = f"PHANTOM^{index:05d}"
    ds.PatientID = f"PHANTOM-{seed}-{index:05d}"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.KVP = 120
    ds.PatientPosition = "FFS"
    ds.StudyID = str(index)
    ds.AcquisitionNumber = 1  # Type 2 in the CT Image module: one acquisition per phantom series
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = round(z, 3)
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    ds.RescaleType = "HU"
    return ds


def write_phantom_study(
    out_dir: Path, seed: int, index: int, positive: bool, slices: int = 64, matrix: int = 256
) -> PhantomStudy:
    """Write one study (one folder, one file per slice) and return what it holds."""
    rng = np.random.default_rng([seed, index])
    count = int(rng.integers(1, 4)) if positive else 0
    hu, nodules, pixel = chest_volume(rng, slices, matrix, count)
    study_uid = _uid(seed, index, "study")
    series_uid = _uid(seed, index, "series")
    folder = out_dir / f"study_{index:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    stored = np.clip(np.rint(hu) + 1024, -32768, 32767).astype(np.int16)
    for k in range(slices):
        z = (k - slices / 2 + 0.5) * SLICE_THICKNESS_MM
        ds = _slice_dataset(seed, index, study_uid, series_uid, k, z, pixel, matrix)
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"CT{k + 1:04d}.dcm", enforce_file_format=True)
    return PhantomStudy(study_uid, int(positive), nodules, folder)


def write_phantoms(
    out_dir: Path,
    studies: int,
    positive_fraction: float = 0.5,
    seed: int = 0,
    slices: int = 64,
    matrix: int = 256,
) -> list[PhantomStudy]:
    """Write ``studies`` phantom studies and ``labels.csv``; the positives are spread evenly."""
    out_dir.mkdir(parents=True, exist_ok=True)
    positives = set(np.random.default_rng(seed).permutation(studies)[: round(studies * positive_fraction)].tolist())
    written = [write_phantom_study(out_dir, seed, i, i in positives, slices, matrix) for i in range(studies)]
    write_labels(out_dir / LABELS_FILE, written)
    return written


def write_labels(path: Path, studies: list[PhantomStudy]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_uid", "label", "nodules"])
        for study in studies:
            writer.writerow([study.study_uid, study.label, ";".join(n.as_text() for n in study.nodules)])


def read_labels(path: Path) -> dict[str, PhantomStudy]:
    """``labels.csv`` -> study UID -> label and nodules; ``nodules`` may be absent (site data)."""
    out: dict[str, PhantomStudy] = {}
    with open(path, newline="") as handle:
        for row_number, row in enumerate(csv.DictReader(handle), start=2):
            try:
                label = int(row["label"])
                if label not in (0, 1):
                    raise ValueError(label)
                nodules = [Nodule.from_text(t) for t in (row.get("nodules") or "").split(";") if t.strip()]
            except (KeyError, ValueError) as exc:
                raise ValueError(
                    f"{path}:{row_number}: expected study_uid,label[,nodules] with label 0 or 1 ({exc})"
                ) from None
            out[row["study_uid"]] = PhantomStudy(row["study_uid"], label, nodules)
    return out
