"""``triagenode model train --task detection``: a lesion detector trained on labelled mammograms, packaged for the node.

* The labels: ``labels.csv`` (``study_uid,label``) and ``lesions.csv`` (per
  lesion and image: the SOP Instance UID, the type and the box in pixels), as
  ``triagenode phantom --kind mammo`` writes them.
* Every image is read once through the node's own selection and input
  (:func:`inference.detection.select_images`, :func:`~inference.detection.image_input`),
  so the model trains on the numbers the node computes; its target is a class
  per output cell (:func:`~inference.detection.lesion_target`).
* Studies are split into training and validation by study, stratified by label.
* The seed's recipe, made for detection: crops of the whole-image input (the
  network is fully convolutional, so it is trained on crops and run on whole
  images), half of them centred near a lesion; flips, small rotations and
  scalings, intensity jitter and noise, applied alike to the image and its
  target; per-cell cross-entropy with the lesion classes weighted up (they
  are a few percent of the cells); SGD with momentum or AdamW, a cosine
  schedule, a checkpoint after every epoch (``--resume``), a JSON line per epoch.
* Each epoch ends with the validation studies through the same decoding as
  the node; the epoch with the best mean FROC sensitivity (0.25 to 4 false
  positives per image) is kept. The operating threshold is the lowest
  certainty at which the validation images have at most ``--target-fp-per-image``
  false positives (:func:`operating_threshold`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from triagenode.inference.architectures import DETECTORS, build_network
from triagenode.inference.detection import (
    ImageSelection,
    batch_inputs,
    class_maps,
    decode_map,
    lesion_target,
    prepare_image,
    select_images,
)
from triagenode.inference.device import resolve_device
from triagenode.inference.froc import Froc, Mark, TrueLesion, froc
from triagenode.inference.input_spec import InputSpec
from triagenode.inference.labelled import LabelledDataError, labelled_index
from triagenode.inference.metrics import roc_auc
from triagenode.inference.model_package import BREAST, LESION, DetectionSpec, Manifest, save_package
from triagenode.inference.outcomes import NotApplicable
from triagenode.inference.phantom import PhantomStudy, read_labels
from triagenode.inference.phantom_mammo import (
    DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION,
    LESIONS_FILE,
    MammoLesion,
    read_lesions,
)
from triagenode.inference.training import (
    TrainingConfig,
    TrainingError,
    keep_if_best,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    seed_everything,
    stratified_split,
    write_epoch_line,
)

MAMMO_INPUT = InputSpec(
    modality="MG",
    normalisation="window",
    window=(0.0, 4095.0),
    pixel_spacing_mm=0.455,
    matrix=512,
    min_slices=1,
    sop_classes=(DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION,),
    excluded_image_types=("LOCALIZER",),
)
"""A mammography detector's input: For Presentation images, on a 12-bit scale, resampled to 0.455 mm per pixel
(a 23 cm field is 512 pixels; the longer side at most 1024): microcalcifications of 0.3 mm and more stay
visible, and every detector's images are seen at one scale."""
LESION_WEIGHT = 5.0
"""Cross-entropy weight of the lesion classes against the background."""


@dataclass
class LabelledImage:
    """One image of a labelled study as the network sees it, with its target."""

    study_uid: str
    sop_instance_uid: str
    inputs: torch.Tensor
    """(1, h, w) float32: the node's very input for the image (validation decodes what the node would)."""
    target: torch.Tensor
    """(h / stride, w / stride) long: each output cell's class."""
    scale: float
    shape: tuple[int, int]
    """The image's own (rows, columns)."""
    centres: list[tuple[int, int]]
    """Input-pixel (row, column) of each lesion's centre, for crops near lesions."""


@dataclass
class LabelledStudyImages:
    study_uid: str
    label: int
    images: list[LabelledImage]
    lesions: list[TrueLesion] = field(default_factory=list)


def lesions_file(labels: Path, lesions: Path | None) -> Path:
    """``--lesions``, or ``lesions.csv`` next to the labels file."""
    return lesions if lesions is not None else labels.parent / LESIONS_FILE


def read_truth(labels_csv: Path, lesions_csv: Path) -> tuple[dict[str, PhantomStudy], dict[str, list[MammoLesion]]]:
    """The labels and the lesion boxes, refusing boxes of studies the labels do not list."""
    labels = read_labels(labels_csv)
    if not lesions_csv.exists():
        raise LabelledDataError(f"{lesions_csv} does not exist; give the lesion boxes with --lesions")
    boxes = read_lesions(lesions_csv)
    unknown = [uid for uid in boxes if uid not in labels]
    if unknown:
        raise LabelledDataError(f"{lesions_csv} has lesions of study {unknown[0]}, which {labels_csv} does not list")
    return labels, boxes


def study_truth(
    uid: str, label: int, boxes: Sequence[MammoLesion], selection: ImageSelection, detection: DetectionSpec,
    lesions_csv: Path,
) -> list[TrueLesion]:
    """A study's true lesions, checked against the images the model reads, before any pixel is decoded.

    Refuses a box on an image the model does not read (not in the study, or skipped: For
    Processing, say), a type the model does not know, and a positive study without boxes (a
    detector learns from the boxes, and FROC would count its lesions as none).
    """
    names = [c.name for c in detection.classes]
    read = {image.sop_instance_uid for image in selection.images}
    truth = [TrueLesion(uid, b.lesion, b.sop_instance_uid, b.type, b.box) for b in boxes]
    for lesion in truth:
        if lesion.sop_instance_uid not in read:
            raise LabelledDataError(
                f"{lesions_csv}: lesion {lesion.lesion} of study {uid} is on image {lesion.sop_instance_uid}, "
                "which the model does not read (not in the study, or skipped: "
                f"{'; '.join(selection.skipped) or 'no image skipped'})"
            )
        if lesion.type not in names:
            raise LabelledDataError(f"{lesions_csv}: lesion type {lesion.type!r} is not one of {', '.join(names)}")
    if label == 1 and not truth:
        raise LabelledDataError(
            f"study {uid} is labelled positive but {lesions_csv} gives none of its lesions; a detector "
            "is trained and judged on the boxes"
        )
    return truth


def load_labelled_images(
    data_dir: Path, labels_csv: Path, lesions_csv: Path, spec: InputSpec, detection: DetectionSpec,
    log: Callable[[str], None],
) -> list[LabelledStudyImages]:
    """Every labelled study's images, read and prepared as the node would; refuses lesions on images not read."""
    labels, boxes = read_truth(labels_csv, lesions_csv)
    names = [c.name for c in detection.classes]
    index = labelled_index(data_dir, labels)
    selections = {}
    for uid, labelled in labels.items():  # every check before any pixel is decoded
        selection = select_images(index[uid], spec)
        if isinstance(selection, NotApplicable):
            raise LabelledDataError(f"study {uid}: {selection.reason}")
        selections[uid] = (selection, study_truth(uid, labelled.label, boxes.get(uid, []), selection, detection,
                                                  lesions_csv))
    started = time.perf_counter()
    out = []
    for uid, (selection, truth) in selections.items():
        images = []
        for image in selection.images:
            prepared = prepare_image(image.path, spec)
            scale = prepared.scale
            x = torch.from_numpy(prepared.inputs)
            on_image = [(names.index(les.type), les.box) for les in truth
                        if les.sop_instance_uid == image.sop_instance_uid]
            target = lesion_target(on_image, (x.shape[-2], x.shape[-1]), scale, detection.output_stride)
            centres = [(round((b[1] + b[3]) / 2 * scale), round((b[0] + b[2]) / 2 * scale)) for _, b in on_image]
            images.append(LabelledImage(uid, image.sop_instance_uid, x[0], target, scale, prepared.shape, centres))
        out.append(LabelledStudyImages(uid, labels[uid].label, images, truth))
    count = sum(len(study.images) for study in out)
    log(f"read {len(out)} studies ({count} images) in {time.perf_counter() - started:.1f} s")
    return out


def _crop(
    image: LabelledImage, size: int, stride: int, near_lesion: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``size`` x ``size`` crop of the input and the matching ``size / stride`` crop of the target.

    The crop's corner is on the stride's grid, so input and target stay aligned;
    images smaller than the crop are padded (background).
    """
    x, target = image.inputs, image.target
    rows, columns = x.shape[-2:]
    pad_rows, pad_columns = max(0, size - rows), max(0, size - columns)
    if pad_rows or pad_columns:
        x = F.pad(x, (0, pad_columns, 0, pad_rows))
        target = F.pad(target, (0, pad_columns // stride, 0, pad_rows // stride))
        rows, columns = x.shape[-2:]

    def corner(centre: int, extent: int) -> int:
        low = centre - size // 2 + int(torch.randint(-size // 3, size // 3 + 1, (1,), generator=generator))
        return max(0, min(extent - size, low)) // stride * stride

    if near_lesion and image.centres:
        row, column = image.centres[int(torch.randint(len(image.centres), (1,), generator=generator))]
        top, left = corner(row, rows), corner(column, columns)
    else:
        top = int(torch.randint(rows - size + 1, (1,), generator=generator)) // stride * stride
        left = int(torch.randint(columns - size + 1, (1,), generator=generator)) // stride * stride
    cell = size // stride
    crop_target = target[top // stride : top // stride + cell, left // stride : left // stride + cell]
    return x[:, top : top + size, left : left + size], crop_target


def augment_pair(
    x: torch.Tensor, target: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips, rotations up to 10 degrees and scalings of 0.9-1.1 applied alike to images and targets;
    intensity jitter and noise on the images. ``x``: (n, 1, h, w); ``target``: (n, h', w')."""
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    angle, zoom = uniform(-math.pi / 18, math.pi / 18), uniform(0.9, 1.1)
    flip_x = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    flip_y = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zero = torch.zeros(n)
    # diag(flip_x, flip_y) @ rotation / zoom: a flip and a rotation, never a shear (a round mass stays round).
    theta = torch.stack(
        [torch.stack([cos * flip_x, -sin * flip_x, zero], 1), torch.stack([sin * flip_y, cos * flip_y, zero], 1)], 1
    )
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), mode="bilinear",
                      padding_mode="zeros", align_corners=False)
    t = target[:, None].float()
    t = F.grid_sample(t, F.affine_grid(theta, list(t.shape), align_corners=False), mode="nearest",
                      padding_mode="zeros", align_corners=False)
    x = x * uniform(0.85, 1.15)[:, None, None, None] + uniform(-0.05, 0.05)[:, None, None, None]
    x = x + torch.randn(x.shape, generator=generator) * 0.01
    return x, t[:, 0].round().long()


def candidates_of(
    network: nn.Module, studies: Sequence[LabelledStudyImages], detection: DetectionSpec, device: torch.device
) -> tuple[list[Mark], np.ndarray, list[str]]:
    """Every candidate of the studies as the node decodes them, each study's score (its highest certainty) and the
    images read."""
    marks: list[Mark] = []
    scores = []
    images: list[str] = []
    for study in studies:
        best = 0.0
        for start in range(0, len(study.images), 4):
            chunk = study.images[start : start + 4]
            maps = class_maps(network, batch_inputs([image.inputs[None] for image in chunk]), device)
            for image, probabilities in zip(chunk, maps, strict=True):
                images.append(image.sop_instance_uid)
                for kind, box, certainty in decode_map(probabilities, detection, image.scale, image.shape):
                    marks.append(Mark(study.study_uid, image.sop_instance_uid, kind, box, certainty))
                    best = max(best, certainty)
        scores.append(best)
    return marks, np.array(scores, dtype=float), images


def _validate(
    network: nn.Module, studies: Sequence[LabelledStudyImages], detection: DetectionSpec, device: torch.device
) -> tuple[Froc, float | None, np.ndarray]:
    network.eval()
    marks, scores, images = candidates_of(network, studies, detection, device)
    lesions = [lesion for study in studies for lesion in study.lesions]
    return froc(marks, lesions, len(images)), roc_auc(np.array([s.label for s in studies]), scores), scores


def operating_threshold(result: Froc, target_fp_per_image: float, detection: DetectionSpec) -> float:
    """The lowest certainty at which the validation images have at most ``target_fp_per_image`` false positives.

    A CAD system is operated at a false-positive rate, not at a study sensitivity: on a
    validation set the model separates perfectly, "the highest threshold still reaching
    95% of positive studies" sits just below the weakest positive's certainty (0.999 on the
    phantoms) and drops a third of the marks on held-out data. The FROC curve gives, for each
    threshold, the false positives per image; the lowest threshold within the budget keeps
    the most lesions it allows. Never below the candidate threshold.
    """
    within = [threshold for threshold, fp, _ in result.curve if fp <= target_fp_per_image + 1e-9 and
              math.isfinite(threshold)]
    if within:
        return max(min(within), detection.candidate_threshold)
    # Even the most certain validation mark is a false positive beyond the budget: just above it.
    top = next((threshold for threshold, _, _ in result.curve if math.isfinite(threshold)), None)
    return min(1.0, math.nextafter(top, math.inf)) if top is not None else 0.5


def _sensitivity_at(result: Froc, threshold: float) -> float | None:
    """The validation lesion sensitivity at ``threshold`` (from the FROC curve)."""
    reached = [sensitivity for t, _, sensitivity in result.curve if t >= threshold]
    return round(reached[-1], 4) if reached else None


def train_detector(config: TrainingConfig, log: Callable[[str], None] = print) -> Manifest:
    """Train a lesion detector, keep the best epoch by validation FROC, write the package; returns its manifest."""
    if config.arch not in DETECTORS:
        raise TrainingError(f"--arch {config.arch!r} is a classifier; a detector is one of {', '.join(DETECTORS)}")
    device = resolve_device(config.device)
    generator = seed_everything(config.seed, device)
    detection = DetectionSpec()
    spec = config.input
    studies = load_labelled_images(
        config.data_dir, config.labels, lesions_file(config.labels, config.lesions), spec, detection, log
    )
    train_idx, val_idx = stratified_split(studies, config.val_fraction, config.seed)
    train_studies, val_studies = [studies[i] for i in train_idx], [studies[i] for i in val_idx]
    pool = [image for study in train_studies for image in study.images]
    with_lesions = [image for image in pool if image.centres]
    if not with_lesions:
        raise TrainingError("no training image holds a lesion; label some positive studies with their boxes")
    log(
        f"{len(train_studies)} training and {len(val_studies)} validation studies "
        f"({sum(s.label for s in train_studies)} and {sum(s.label for s in val_studies)} positive); "
        f"{len(pool)} training images, {len(with_lesions)} with lesions; crops of {config.crop}; device {device}"
    )
    classes = len(detection.classes) + 1
    network = build_network(config.arch, spec.channels, classes, config.arch_params).to(device)
    network = network.to(memory_format=torch.channels_last)
    optimizer, scheduler = make_optimizer(config, network)
    weights = torch.tensor([1.0] + [LESION_WEIGHT] * (classes - 1), device=device)
    checkpoint_path = config.out.with_suffix(".ckpt")
    log_path = config.out.with_suffix(".log.jsonl")
    config.out.parent.mkdir(parents=True, exist_ok=True)
    state = {"epoch": 0, "best_score": -1.0, "best_epoch": 0, "stale": 0, "best_weights": None}
    if config.resume:
        state = load_checkpoint(config.resume, network, optimizer, scheduler, generator)
        log(f"resumed from {config.resume} after epoch {state['epoch']}")
    use_amp = device.type == "cuda"
    stride = detection.output_stride
    with open(log_path, "a") as log_handle:
        for epoch in range(state["epoch"] + 1, config.epochs + 1):
            network.train()
            started = time.perf_counter()
            losses = []
            steps = max(1, config.crops_per_epoch // config.batch_size)
            for step in range(1, steps + 1):
                crops = []
                for _ in range(config.batch_size):
                    near = bool(torch.rand(1, generator=generator) < 0.5)
                    source = with_lesions if near else pool
                    image = source[int(torch.randint(len(source), (1,), generator=generator))]
                    crops.append(_crop(image, config.crop, stride, near, generator))
                x = torch.stack([c[0] for c in crops])
                y = torch.stack([c[1] for c in crops])
                x, y = augment_pair(x, y, generator)
                x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = network(x).float()
                loss = F.cross_entropy(logits, y.to(device), weight=weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                if sys.stderr.isatty():
                    print(f"\repoch {epoch}/{config.epochs} [{step}/{steps}] loss {np.mean(losses):.4f}", end="",
                          file=sys.stderr)
            scheduler.step()
            result, auc, _ = _validate(network, val_studies, detection, device)
            score = result.mean_sensitivity if result.mean_sensitivity is not None else 0.0
            elapsed = time.perf_counter() - started
            improved = keep_if_best(state, "best_score", score, epoch, network)
            record = {
                "epoch": epoch,
                "train_loss": round(float(np.mean(losses)), 5),
                "val_froc_mean": round(score, 4),
                "val_sensitivity_at_1fp": result.sensitivity_at.get(1.0),
                "val_auc": None if auc is None else round(auc, 4),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(elapsed, 2),
                "crops_per_s": round(steps * config.batch_size / elapsed, 1),
                "best_epoch": state["best_epoch"],
            }
            write_epoch_line(log_handle, record)
            log(
                f"epoch {epoch}/{config.epochs}: loss {record['train_loss']:.4f}, validation mean FROC sensitivity "
                f"{score:.3f}, AUC {'-' if auc is None else f'{auc:.3f}'}{' (best)' if improved else ''}, "
                f"{elapsed:.1f} s"
            )
            save_checkpoint(checkpoint_path, network, optimizer, scheduler, generator, state)
            if state["stale"] >= config.patience:
                log(f"early stop: no better validation FROC for {config.patience} epochs")
                break
    if state["best_weights"] is not None:
        network.load_state_dict(state["best_weights"])
    network = network.to("cpu").to(memory_format=torch.contiguous_format)
    result, auc, scores = _validate(network, val_studies, detection, torch.device("cpu"))
    threshold = operating_threshold(result, config.target_fp_per_image, detection)
    manifest = Manifest(
        name=config.name,
        version=config.version,
        architecture=config.arch,
        architecture_params=config.arch_params,
        task="detection",
        input=spec,
        labels=["background", *(c.name for c in detection.classes)],
        finding=LESION,
        finding_site=BREAST,
        threshold=round(threshold, 6),
        aggregation="max",
        training={
            "data": config.data_dir.name,
            "studies": len(studies),
            "positives": sum(s.label for s in studies),
            "lesion_views": sum(len(s.lesions) for s in studies),
            "training_studies": len(train_studies),
            "validation_studies": len(val_studies),
            "validation_froc_mean_sensitivity": result.mean_sensitivity,
            "validation_sensitivity_at_fp_per_image": {str(k): v for k, v in result.sensitivity_at.items()},
            "validation_auc": None if auc is None else round(auc, 4),
            "epochs_run": state["epoch"],
            "best_epoch": state["best_epoch"],
            "optimizer": config.optimizer,
            "learning_rate": config.lr,
            "batch_size": config.batch_size,
            "crop": config.crop,
            "crops_per_epoch": config.crops_per_epoch,
            "seed": config.seed,
            "threshold_rule": f"lowest certainty with at most {config.target_fp_per_image:g} validation false "
                              "positives per image",
            "validation_sensitivity_at_threshold": _sensitivity_at(result, threshold),
        },
        intended_use=config.intended_use,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        detection=detection,
    )
    save_package(config.out, manifest, network)
    log(f"wrote {config.out} (best epoch {state['best_epoch']}, validation mean FROC sensitivity "
        f"{result.mean_sensitivity}, AUC {manifest.training['validation_auc']})")
    return manifest
