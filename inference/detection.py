"""A detection model on a study: the images it reads, each image to the network's input, its map to lesion marks.

Mammography is read image by image: a screening study is four views (L CC,
L MLO, R CC, R MLO), stored as four images of one series, four series of one
image, or more views. So a detection model selects images, not a series
(:func:`select_images`): every image of the model's modality and SOP classes;
an image the model does not read (a For Processing image, whose pixels are
the detector's raw signal, not what a reader sees; a localiser) is skipped
with its reason, which the result carries.

Each image is scaled as a whole to the manifest's pixel spacing (or, without
one, so that its longer side is its ``matrix``; aspect kept: the network is
fully convolutional, so no square crop), MONOCHROME1 inverted and other bit
depths brought to 12 bits, normalised by the manifest's window
(:func:`image_input`). The network
gives one probability map per lesion class at 1/``output_stride`` of the
input (:mod:`inference.architectures`, ``LesionFCN``); :func:`decode_map`
turns each connected region above the candidate threshold into one candidate:
its certainty is the region's highest probability, its box the extent of the
region's core (where the probability is at least half that), mapped back to
the image's own pixels. Of candidates whose boxes overlap (one class or two),
the more certain is kept. A study's candidates above the operating threshold are its
marks; its suspicion is its highest certainty.

The same functions serve the node's workers, ``triagenode infer``, training
(:mod:`inference.detection_training`, which builds its targets with
:func:`lesion_target`) and evaluation, so a model is trained and validated on
the very inputs the node gives it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydicom import Dataset, dcmread

from triagenode.inference.input_spec import FOR_PROCESSING_CLASSES, InputSpec
from triagenode.inference.loader import SliceLoader
from triagenode.inference.model_package import DetectionSpec, ModelPackage
from triagenode.inference.outcomes import Lesion, NotApplicable, StudyResult
from triagenode.inference.preprocessing import modality_values
from triagenode.inference.studies import StudyHeaders

FOR_PROCESSING = "FOR PROCESSING"
SIZE_MULTIPLE = 8
"""Input sides are padded to a multiple of this, so the network's pooling steps divide them evenly."""


@dataclass(frozen=True)
class ViewImage:
    """One image a detection model reads: its file, header and view."""

    path: Path
    header: Dataset
    series_uid: str
    sop_instance_uid: str
    laterality: str
    view: str

    @property
    def label(self) -> str:
        """"L CC", "R MLO": how a reader names the view."""
        return " ".join(part for part in (self.laterality, self.view) if part) or "unknown view"


@dataclass(frozen=True)
class ImageSelection:
    """The images a detection model reads in a study, and the ones it skips with their reasons."""

    images: list[ViewImage]
    skipped: list[str]


def laterality_of(header: Dataset) -> str:
    """Image Laterality (0020,0062), or the series' Laterality (0020,0060): "L", "R", "B" or ""."""
    return str(header.get("ImageLaterality", "") or header.get("Laterality", "") or "").strip().upper()


def view_of(header: Dataset) -> str:
    """View Position (0018,5101): "CC", "MLO", ... or ""."""
    return str(header.get("ViewPosition", "") or "").strip().upper()


def select_images(study: StudyHeaders, spec: InputSpec) -> ImageSelection | NotApplicable:
    """Every image of the study the model reads, in a fixed order; else why none.

    Read: the model's modality, pixel data, an accepted SOP class, Presentation
    Intent not For Processing, no excluded image type. The order (series, then
    laterality, view, SOP Instance UID) does not depend on the order files came in.
    """
    images: list[ViewImage] = []
    skipped: list[str] = []
    others: list[str] = []
    for series in study.series:
        if series.modality != spec.modality:
            others.append(f"{series.modality or 'unknown'} series")
            continue
        for path, header in zip(series.files, series.headers, strict=True):
            image = ViewImage(path, header, series.series_uid, str(header.SOPInstanceUID), laterality_of(header),
                              view_of(header))
            reason = _skip_reason(header, image, spec)
            if reason is None:
                images.append(image)
            else:
                skipped.append(reason)
    if not images:
        found = "; ".join(sorted(set(skipped)) + sorted(set(others))) or "no readable image"
        return NotApplicable(study.study_uid, f"no {spec.modality} image the model can read ({found})", study.headers)
    images.sort(key=lambda i: (i.series_uid, i.laterality, i.view, i.sop_instance_uid))
    return ImageSelection(images, skipped)


def _skip_reason(header: Dataset, image: ViewImage, spec: InputSpec) -> str | None:
    """Why the model does not read this image (said with its view), or None when it does."""
    sop_class = str(header.get("SOPClassUID", ""))
    intent = str(header.get("PresentationIntentType", "") or "").strip().upper()
    image_type = {str(value).upper() for value in (header.get("ImageType") or [])}
    excluded = [value for value in spec.excluded_image_types if value.upper() in image_type]
    if intent == FOR_PROCESSING or sop_class in FOR_PROCESSING_CLASSES:
        return f"{image.label} image {image.sop_instance_uid}: For Processing (raw detector data), not read"
    if spec.sop_classes and sop_class not in spec.sop_classes:
        return f"{image.label} image {image.sop_instance_uid}: SOP class {sop_class} is not one the model reads"
    if excluded:
        return f"{image.label} image {image.sop_instance_uid}: a {excluded[0]} image, not read"
    if "Rows" not in header or "Columns" not in header:
        return f"{image.label} image {image.sop_instance_uid}: no pixel data"
    return None


WINDOW_BITS = 12
"""A detector's window (``InputSpec.window``) is on a 12-bit scale: images of other bit depths are brought to it."""


def input_scale(rows: int, columns: int, spec: InputSpec, spacing_mm: float | None = None) -> float:
    """Input pixels per image pixel.

    With ``spec.pixel_spacing_mm`` and the image's own spacing, every input pixel covers the
    same millimetres whatever the detector (18 x 24 or 24 x 30 cm, 0.05 to 0.1 mm pixels), the
    longer side capped at twice ``spec.matrix``; otherwise (no spacing) the longer side
    becomes ``spec.matrix``.
    """
    longest = max(rows, columns)
    if spec.pixel_spacing_mm and spacing_mm:
        return min(spacing_mm / spec.pixel_spacing_mm, 2 * spec.matrix / longest)
    return spec.matrix / longest


def image_spacing(header: Dataset) -> float | None:
    """An image's pixel spacing in mm (Pixel Spacing, else Imager Pixel Spacing; the row spacing), or None."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = header.get(keyword)
        if value:
            try:
                spacing = float(value[0])
            except (TypeError, ValueError, IndexError):
                continue
            if spacing > 0:
                return spacing
    return None


def presentation_values(header: Dataset, values: np.ndarray) -> np.ndarray:
    """Stored values as a detector's window expects them: brighter is denser, on a 12-bit scale.

    A MONOCHROME1 image (low values bright) is inverted; an image of another Bits Stored
    (10, 14, 16) is brought to :data:`WINDOW_BITS`, so one window serves every vendor's images.
    """
    bits = int(header.get("BitsStored", WINDOW_BITS) or WINDOW_BITS)
    if str(header.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        values = (2**bits - 1) - values
    if bits != WINDOW_BITS:
        values = values * (2**WINDOW_BITS / 2**bits)
    return values.astype(np.float32, copy=False)


def image_input(
    values: np.ndarray | torch.Tensor, spec: InputSpec, spacing_mm: float | None = None
) -> tuple[torch.Tensor, float]:
    """One image's values (rows, columns; see :func:`presentation_values`) as the network's input (1, 1, h, w),
    and its scale (input pixels per image pixel, :func:`input_scale`).

    Normalised by the manifest's window, scaled (antialiased), padded with 0 at the right and
    bottom to a multiple of :data:`SIZE_MULTIPLE`. Input pixel (u, v) is image pixel (u /
    scale, v / scale), to within the rounding of the scaled size (under one image pixel).
    """
    x = torch.as_tensor(values, dtype=torch.float32)
    rows, columns = x.shape[-2:]
    low, high = spec.window
    x = ((x - low) / (high - low)).clamp_(0.0, 1.0).reshape(1, 1, rows, columns)
    scale = input_scale(rows, columns, spec, spacing_mm)
    size = (max(1, round(rows * scale)), max(1, round(columns * scale)))
    if size != (rows, columns):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    pad_rows, pad_columns = (-size[0]) % SIZE_MULTIPLE, (-size[1]) % SIZE_MULTIPLE
    if pad_rows or pad_columns:
        x = F.pad(x, (0, pad_columns, 0, pad_rows), value=0.0)
    return x.contiguous(), scale


def batch_inputs(inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Images of different sizes as one batch: each padded with 0 at the right and bottom to the largest."""
    rows = max(x.shape[-2] for x in inputs)
    columns = max(x.shape[-1] for x in inputs)
    return torch.cat([F.pad(x, (0, columns - x.shape[-1], 0, rows - x.shape[-2])) for x in inputs])


def read_image(path: Path) -> tuple[Dataset, np.ndarray]:
    """An image's data set and its modality values (float32, rows x columns)."""
    ds = dcmread(path)
    values = np.empty((1, int(ds.Rows), int(ds.Columns)), dtype=np.float32)
    modality_values([ds], values)
    return ds, values[0]


def lesion_target(
    boxes: Sequence[tuple[int, tuple[float, float, float, float]]], shape: tuple[int, int], scale: float, stride: int
) -> torch.Tensor:
    """Training's target for one image: each output cell's class (0 background, i + 1 lesion class i).

    ``boxes``: (class index, image-pixel box) per lesion; ``shape``: the input's (rows,
    columns). A cell belongs to a lesion when its centre lies in the ellipse inscribed in
    the lesion's box (a mass is round, a cluster roughly so), or when it is the cell
    holding the box's centre (a lesion smaller than a cell still has one).
    """
    rows, columns = shape[0] // stride, shape[1] // stride
    target = torch.zeros((rows, columns), dtype=torch.long)
    cell = stride / scale  # image pixels per output cell
    y = (torch.arange(rows, dtype=torch.float32) + 0.5) * cell
    x = (torch.arange(columns, dtype=torch.float32) + 0.5) * cell
    for index, (x0, y0, x1, y1) in sorted(boxes, key=lambda b: -(b[1][2] - b[1][0]) * (b[1][3] - b[1][1])):
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        rx, ry = max((x1 - x0) / 2, cell / 2), max((y1 - y0) / 2, cell / 2)
        inside = ((x[None, :] - cx) / rx) ** 2 + ((y[:, None] - cy) / ry) ** 2 <= 1.0
        target[inside] = index + 1
        target[min(rows - 1, int(cy / cell)), min(columns - 1, int(cx / cell))] = index + 1
    return target


def decode_map(
    probabilities: np.ndarray, spec: DetectionSpec, scale: float, image_shape: tuple[int, int]
) -> list[tuple[str, tuple[float, float, float, float], float]]:
    """One image's class probability maps (classes + 1, h, w) -> candidates (type, box, certainty), most certain first.

    See the module docstring: a connected region per candidate, its peak the
    certainty, its core the box; of candidates whose boxes overlap (intersection over the
    smaller box 0.3 or more, one class or two) the more certain is kept; at most
    ``spec.max_per_image``.
    """
    from scipy import ndimage

    cell = spec.output_stride / scale
    rows, columns = image_shape
    found: list[tuple[str, tuple[float, float, float, float], float]] = []
    for index, lesion_class in enumerate(spec.classes, start=1):
        heat = probabilities[index]
        regions, count = ndimage.label(heat >= spec.candidate_threshold)
        if not count:
            continue
        peaks = np.asarray(ndimage.maximum(heat, regions, index=np.arange(1, count + 1)), dtype=float)
        extents = ndimage.find_objects(regions)
        # The most certain regions only: an untrained or confused map may hold thousands.
        for region in np.argsort(-peaks, kind="stable")[: 3 * spec.max_per_image]:
            peak, (rows_in, columns_in) = float(peaks[region]), extents[region]
            core = (regions[rows_in, columns_in] == region + 1) & (heat[rows_in, columns_in] >= peak / 2)
            ys, xs = np.nonzero(core)
            ys, xs = ys + rows_in.start, xs + columns_in.start
            box = (
                max(0.0, float(xs.min()) * cell),
                max(0.0, float(ys.min()) * cell),
                min(float(columns), float(xs.max() + 1) * cell),
                min(float(rows), float(ys.max() + 1) * cell),
            )
            if box[2] > box[0] and box[3] > box[1]:
                found.append((lesion_class.name, box, peak))
    found.sort(key=lambda candidate: -candidate[2])
    kept: list[tuple[str, tuple[float, float, float, float], float]] = []
    for candidate in found:
        if all(_overlap(candidate[1], other[1]) < 0.3 for other in kept):
            kept.append(candidate)
    return kept[: spec.max_per_image]


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over the smaller box: 1 when one holds the other."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return width * height / smaller


@torch.inference_mode()
def class_maps(network: torch.nn.Module, batch: torch.Tensor, device: torch.device) -> np.ndarray:
    """One forward pass: softmax probabilities (n, classes + 1, h, w) on the CPU; bf16 autocast on CUDA."""
    batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = network(batch)
    return torch.softmax(logits.float(), dim=1).cpu().numpy()


@dataclass
class StudyCandidates:
    """Every candidate of a study above the candidate threshold, with what was read: evaluation's view."""

    selection: ImageSelection
    candidates: list[Lesion]
    timings_ms: dict[str, float]


@dataclass(frozen=True)
class PreparedImage:
    """One image as the network's input, with what maps its output back to the image."""

    inputs: np.ndarray
    """(1, 1, h, w) float32."""
    scale: float
    shape: tuple[int, int]
    """The image's own (rows, columns)."""
    decode_ms: float
    preprocess_ms: float


def prepare_image(path: Path, spec: InputSpec) -> PreparedImage:
    """Read, decode and prepare one image: what a decoder process does for a detection model."""
    started = time.perf_counter()
    header, values = read_image(path)
    decoded = time.perf_counter()
    x, scale = image_input(presentation_values(header, values), spec, image_spacing(header))
    prepared = time.perf_counter()
    shape = (int(values.shape[0]), int(values.shape[1]))
    return PreparedImage(x.numpy(), scale, shape, (decoded - started) * 1000, (prepared - decoded) * 1000)


def study_candidates(
    package: ModelPackage,
    selection: ImageSelection,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    loader: SliceLoader | None = None,
) -> StudyCandidates:
    """Every image through the network, each map decoded: all candidates, most certain first.

    With a ``loader`` (a worker's decoder processes) every image is read and
    prepared in a decoder at once, and the network takes them in order as they
    come: a full-field image costs more to decode and scale (about 0.15 s on one
    core) than to run (a GPU's few milliseconds).
    """
    manifest = package.manifest
    assert manifest.detection is not None, "a detection model's manifest has a detection section"
    device = torch.device(device)
    package.network.eval()
    timings = {"decode": 0.0, "preprocess": 0.0, "input_wait": 0.0, "model": 0.0, "postprocess": 0.0}
    candidates: list[Lesion] = []
    images = selection.images
    pending = [loader.submit(prepare_image, image.path, manifest.input) for image in images] if loader else []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        prepared = []
        for offset, image in enumerate(chunk):
            mark = time.perf_counter()
            ready = pending[start + offset].result() if pending else prepare_image(image.path, manifest.input)
            if pending:
                timings["input_wait"] += (time.perf_counter() - mark) * 1000
            timings["decode"] += ready.decode_ms
            timings["preprocess"] += ready.preprocess_ms
            prepared.append(ready)
        scales, shapes = [p.scale for p in prepared], [p.shape for p in prepared]
        mark = time.perf_counter()
        maps = class_maps(package.network, batch_inputs([torch.from_numpy(p.inputs) for p in prepared]), device)
        timings["model"] += (time.perf_counter() - mark) * 1000
        mark = time.perf_counter()
        for image, probabilities, scale, shape in zip(chunk, maps, scales, shapes, strict=True):
            for kind, box, certainty in decode_map(probabilities, manifest.detection, scale, shape):
                candidates.append(  # six decimals, as stored and shown: the report's UID follows its content
                    Lesion(image.sop_instance_uid, image.series_uid, kind, box, round(certainty, 6),
                           image.laterality, image.view)
                )
        timings["postprocess"] += (time.perf_counter() - mark) * 1000
    candidates.sort(key=lambda lesion: (-lesion.certainty, lesion.sop_instance_uid, lesion.box))
    return StudyCandidates(selection, candidates, timings)


def detect_study(
    package: ModelPackage,
    study: StudyHeaders,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    loader: SliceLoader | None = None,
) -> StudyResult | NotApplicable:
    """A detection model's result for a study: its marks at or above the threshold, its suspicion, its timings."""
    started = time.perf_counter()
    manifest = package.manifest
    selection = select_images(study, manifest.input)
    if isinstance(selection, NotApplicable):
        return selection
    selected = time.perf_counter()
    found = study_candidates(package, selection, device, batch_size, loader)
    marks = [lesion for lesion in found.candidates if lesion.certainty >= manifest.threshold]
    suspicion = found.candidates[0].certainty if found.candidates else 0.0
    key = found.candidates[0].sop_instance_uid if found.candidates else selection.images[0].sop_instance_uid
    key_series = next(image.series_uid for image in selection.images if image.sop_instance_uid == key)
    timings = {
        "select": (selected - started) * 1000 + study.read_ms,
        **found.timings_ms,
        "total": (time.perf_counter() - started) * 1000 + study.read_ms,
    }
    return StudyResult(
        study_uid=study.study_uid,
        series_uid=key_series,
        finding=suspicion >= manifest.threshold,
        probability=round(suspicion, 6),
        threshold=manifest.threshold,
        model=manifest.name,
        model_version=manifest.version,
        key_instance_uid=key,
        slices=len(selection.images),
        timings_ms={k: round(v, 1) for k, v in timings.items()},
        evidence=[image.header for image in selection.images],
        lesions=marks,
        skipped=selection.skipped,
    )


__all__ = [
    "ImageSelection",
    "PreparedImage",
    "StudyCandidates",
    "ViewImage",
    "batch_inputs",
    "class_maps",
    "decode_map",
    "detect_study",
    "image_input",
    "image_spacing",
    "lesion_target",
    "prepare_image",
    "presentation_values",
    "read_image",
    "select_images",
    "study_candidates",
]
