"""``triagenode model train --task segmentation``: a lesion segmenter trained on labelled brain MRI, packaged.

* The labels: ``labels.csv`` (``study_uid,label,lesion_volume_ml``, as
  ``triagenode phantom --kind brain-mri`` writes it) and, per study, its ground
  truth as a DICOM SEG in the study (any SEG series of the study whose frames
  reference the reference contrast's images: the phantom's ``truth/seg.dcm``, or
  what a site's annotation tool exports).
* Every study is read through the node's own path (:func:`inference.segmentation.study_volume`:
  the contrasts by the manifest's rules, resampled onto the FLAIR grid, z-scored),
  scaled in-plane as the node scales it; its target is the SEG's mask on the
  same grid (by source instance, not by frame order).
* The seed's recipe for this task: the recurrent U-Net (a ConvGRU across the
  slices), SGD with momentum or AdamW, per-voxel cross-entropy with the lesion
  class weighted up plus a soft Dice loss, on runs of consecutive slices (the
  recurrence sees a slab), with flips and intensity jitter; a checkpoint after
  every epoch, a JSON line per epoch; the epoch with the best validation Dice is kept.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydicom import Dataset

from triagenode.inference.architectures import SEGMENTERS, build_network
from triagenode.inference.device import resolve_device
from triagenode.inference.input_spec import InputSpec
from triagenode.inference.labelled import LabelledDataError, labelled_index
from triagenode.inference.model_package import LESION, CodedConcept, Manifest, SegmentationSpec, save_package
from triagenode.inference.outcomes import NotApplicable
from triagenode.inference.phantom_brain import read_brain_labels
from triagenode.inference.segmentation import network_input, select_contrasts, study_volume
from triagenode.inference.studies import StudyHeaders
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

BRAIN = CodedConcept("12738006", "SCT", "Brain")
BRAIN_INPUT = InputSpec(modality="MR", normalisation="zscore", matrix=128, min_slices=8, sop_classes=(),
                        excluded_image_types=("LOCALIZER",))
"""A brain segmenter's input: the MR contrasts on the FLAIR grid, z-scored per contrast, scaled in-plane so the
longer side is 128 pixels (1.8 mm at a 230 mm field of view); the mask goes back to the FLAIR's own matrix."""
LESION_WEIGHT = 3.0
SLAB = 8
"""Consecutive slices per training sample: enough for the recurrence to carry a lesion across slices."""


@dataclass
class LabelledVolume:
    study_uid: str
    label: int
    inputs: torch.Tensor
    """(slices, channels, h, w) float32: the node's input."""
    target: torch.Tensor
    """(slices, h, w) long: the truth on the same grid."""
    truth: np.ndarray
    """(slices, rows, columns) bool: the truth on the FLAIR's own grid (validation's Dice is computed there)."""


def truth_on(seg: Dataset, reference_headers: Sequence[Dataset]) -> np.ndarray:
    """A ground-truth SEG's mask (any segment) on the reference series' images, in their order: (slices, rows, cols)."""
    import highdicom as hd

    segmentation = seg if isinstance(seg, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(seg)
    uids = [str(ds.SOPInstanceUID) for ds in reference_headers]
    pixels = segmentation.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, ignore_spatial_locations=True
    )
    return pixels > 0


def ground_truth(study: StudyHeaders, reference_headers: Sequence[Dataset]) -> np.ndarray:
    """The study's ground truth from its SEG series (the first whose frames reference the reference images)."""
    from pydicom import dcmread

    reference = {str(ds.SOPInstanceUID) for ds in reference_headers}
    for series in study.series:
        if series.modality != "SEG":
            continue
        for path in series.files:
            seg = dcmread(path)
            referenced = {
                str(item.ReferencedSOPInstanceUID)
                for group in seg.get("ReferencedSeriesSequence", [])
                for item in group.get("ReferencedInstanceSequence", [])
            }
            if referenced & reference:
                return truth_on(seg, reference_headers)
    raise LabelledDataError(
        f"study {study.study_uid} has no SEG whose frames reference its reference series; give its ground truth "
        "as a DICOM SEG on that series in the same study"
    )


def load_volumes(
    data_dir: Path, labels_csv: Path, spec: InputSpec, segmentation: SegmentationSpec, log: Callable[[str], None]
) -> list[LabelledVolume]:
    """Every labelled study through the node's path, with its ground truth on the same grid; checks first."""
    labels = read_brain_labels(labels_csv)
    index = labelled_index(data_dir, labels)
    chosen = {}
    for uid in labels:  # every check before any pixel is read
        selected = select_contrasts(index[uid], spec.modality, segmentation.contrasts)
        if isinstance(selected, NotApplicable):
            raise LabelledDataError(f"study {uid}: {selected.reason}")
        chosen[uid] = selected
    started = time.perf_counter()
    out = []
    for uid, selected in chosen.items():
        volume = study_volume(selected)
        truth = ground_truth(index[uid], volume.reference_headers)
        x = network_input(volume, spec.matrix)[0]
        h, w = x.shape[-2:]
        rows, columns = truth.shape[-2:]
        scale = spec.matrix / max(rows, columns)
        size = (max(8, round(rows * scale)), max(8, round(columns * scale)))
        target = F.interpolate(torch.from_numpy(truth[:, None].astype(np.float32)), size=size, mode="nearest")
        target = F.pad(target, (0, w - size[1], 0, h - size[0]))[:, 0].long()
        out.append(LabelledVolume(uid, labels[uid][0], x, target, truth))
    log(f"read {len(out)} studies in {time.perf_counter() - started:.1f} s")
    return out


def augment(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-right flips (alike for image and target), intensity scale and shift per contrast, noise."""
    if torch.rand(1, generator=generator) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    channels = x.shape[-3]
    scale = 1 + (torch.rand(channels, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(channels, generator=generator) - 0.5) * 0.2
    x = x * scale[:, None, None] + shift[:, None, None]
    return x + torch.randn(x.shape, generator=generator) * 0.05, y


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice of the lesion classes (all but the background), over the whole batch."""
    probabilities = torch.softmax(logits, dim=-3)[..., 1:, :, :]
    one_hot = F.one_hot(target, logits.shape[-3]).movedim(-1, -3)[..., 1:, :, :].float()
    overlap = (probabilities * one_hot).sum()
    return 1 - (2 * overlap + 1) / (probabilities.sum() + one_hot.sum() + 1)


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(a.sum() + b.sum())
    return None if total == 0 else 2 * float((a & b).sum()) / total


@torch.inference_mode()
def _validate(
    network: torch.nn.Module, volumes: Sequence[LabelledVolume], matrix: int, device: torch.device
) -> float:
    """Mean Dice over the validation studies that have a lesion (truth or prediction), on the FLAIR grid,
    the network's map brought back as :func:`inference.segmentation.segment_volume` brings it."""
    network.eval()
    scores = []
    for volume in volumes:
        logits = network(volume.inputs[None].to(device)).float()[0]
        rows, columns = volume.truth.shape[-2:]
        scale = matrix / max(rows, columns)
        height, width = max(8, round(rows * scale)), max(8, round(columns * scale))
        logits = F.interpolate(logits[..., :height, :width], size=(rows, columns), mode="bilinear",
                               align_corners=False)
        predicted = (logits.argmax(dim=1) > 0).cpu().numpy()
        score = _dice(volume.truth, predicted)
        if score is not None:
            scores.append(score)
    return float(np.mean(scores)) if scores else 0.0


def train_segmenter(config: TrainingConfig, log: Callable[[str], None] = print) -> Manifest:
    """Train a lesion segmenter, keep the best epoch by validation Dice, write the model package."""
    if config.arch not in SEGMENTERS:
        raise TrainingError(f"--arch {config.arch!r} is not a segmenter; use one of {', '.join(SEGMENTERS)}")
    device = resolve_device(config.device)
    generator = seed_everything(config.seed, device)
    segmentation = SegmentationSpec()
    spec = config.input
    volumes = load_volumes(config.data_dir, config.labels, spec, segmentation, log)
    train_idx, val_idx = stratified_split(volumes, config.val_fraction, config.seed)
    training, validation = [volumes[i] for i in train_idx], [volumes[i] for i in val_idx]
    log(f"{len(training)} training and {len(validation)} validation studies; slabs of {SLAB} slices; device {device}")
    classes = len(segmentation.classes) + 1
    params = {"width": 8, **config.arch_params}  # written into the manifest: a later default never changes it
    network = build_network(config.arch, len(segmentation.contrasts), classes, params).to(device)
    optimizer, scheduler = make_optimizer(config, network)
    weights = torch.tensor([1.0] + [LESION_WEIGHT] * (classes - 1), device=device)
    checkpoint_path = config.out.with_suffix(".ckpt")
    config.out.parent.mkdir(parents=True, exist_ok=True)
    state = {"epoch": 0, "best_dice": -1.0, "best_epoch": 0, "stale": 0, "best_weights": None}
    if config.resume:
        state = load_checkpoint(config.resume, network, optimizer, scheduler, generator)
    positives = [v for v in training if v.target.any()]
    with open(config.out.with_suffix(".log.jsonl"), "a") as log_handle:
        for epoch in range(state["epoch"] + 1, config.epochs + 1):
            network.train()
            started = time.perf_counter()
            losses = []
            steps = max(1, config.crops_per_epoch // config.batch_size)
            for step in range(1, steps + 1):
                xs, ys = [], []
                for _ in range(config.batch_size):
                    source = positives if positives and torch.rand(1, generator=generator) < 0.7 else training
                    volume = source[int(torch.randint(len(source), (1,), generator=generator))]
                    slices = volume.inputs.shape[0]
                    if volume.target.any() and source is positives:  # a slab through the lesion
                        lesion = torch.nonzero(volume.target.flatten(1).any(1)).flatten()
                        centre = int(lesion[int(torch.randint(len(lesion), (1,), generator=generator))])
                        first = max(0, min(slices - SLAB, centre - SLAB // 2))
                    else:
                        first = int(torch.randint(max(1, slices - SLAB + 1), (1,), generator=generator))
                    x, y = augment(volume.inputs[first : first + SLAB], volume.target[first : first + SLAB],
                                   generator)
                    xs.append(x)
                    ys.append(y)
                x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
                logits = network(x).float()
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(0, 1), weight=weights)
                loss = loss + soft_dice_loss(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                if sys.stderr.isatty():
                    print(f"\repoch {epoch}/{config.epochs} [{step}/{steps}] loss {np.mean(losses):.4f}", end="",
                          file=sys.stderr)
            scheduler.step()
            dice = _validate(network, validation, spec.matrix, device)
            elapsed = time.perf_counter() - started
            improved = keep_if_best(state, "best_dice", dice, epoch, network)
            write_epoch_line(log_handle, {
                "epoch": epoch, "train_loss": round(float(np.mean(losses)), 5), "val_dice": round(dice, 4),
                "lr": optimizer.param_groups[0]["lr"], "seconds": round(elapsed, 2), "best_epoch": state["best_epoch"],
            })
            log(f"epoch {epoch}/{config.epochs}: loss {np.mean(losses):.4f}, validation Dice {dice:.3f}"
                f"{' (best)' if improved else ''}, {elapsed:.1f} s")
            save_checkpoint(checkpoint_path, network, optimizer, scheduler, generator, state)
            if state["stale"] >= config.patience:
                log(f"early stop: no better validation Dice for {config.patience} epochs")
                break
    if state["best_weights"] is not None:
        network.load_state_dict(state["best_weights"])
    network = network.to("cpu")
    manifest = Manifest(
        name=config.name,
        version=config.version,
        architecture=config.arch,
        architecture_params=params,
        task="segmentation",
        input=spec,
        labels=["background", *(c.name for c in segmentation.classes)],
        finding=LESION,
        finding_site=BRAIN,
        threshold=0.5,
        aggregation="max",
        training={
            "data": config.data_dir.name,
            "studies": len(volumes),
            "positives": sum(v.label for v in volumes),
            "training_studies": len(training),
            "validation_studies": len(validation),
            "validation_dice": round(float(state["best_dice"]), 4),
            "epochs_run": state["epoch"],
            "best_epoch": state["best_epoch"],
            "optimizer": config.optimizer,
            "learning_rate": config.lr,
            "batch_size": config.batch_size,
            "slab": SLAB,
            "seed": config.seed,
            "loss": f"cross-entropy (lesion weight {LESION_WEIGHT}) + soft Dice",
        },
        intended_use=config.intended_use,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        segmentation=segmentation,
    )
    save_package(config.out, manifest, network)
    log(f"wrote {config.out} (best epoch {state['best_epoch']}, validation Dice {state['best_dice']:.3f})")
    return manifest
