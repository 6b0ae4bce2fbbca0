"""``triagenode model evaluate`` for a segmentation model: overlap, distance, lesions, volume and the triage call.

Every labelled study goes through the node's own path
(:func:`inference.segmentation.segment_study`: its contrasts by the manifest's
rules, resampled onto the FLAIR grid, the network, the mask on the FLAIR's own
matrix), so each mask is the one the node would send as a DICOM SEG. Against
the study's ground-truth SEG (:func:`inference.segmentation_training.truth_on`):

* per study (:mod:`inference.segmentation_metrics`): Dice, the 95th-percentile
  Hausdorff distance in mm, lesion-wise recall and precision (26-connected
  components), volume error in ml and relative, voxel counts;
* summarised: mean Dice with a 95% bootstrap interval, mean Dice of the studies
  whose lesions are 10 mm and more (0.5 ml, a 10 mm sphere), median HD95,
  pooled lesion recall and precision, voxel accuracy and recall;
* the triage call (lesion volume at or above the manifest's threshold), per
  study against the label: sensitivity, specificity, AUC of the volume as a
  score, as for a classifier;
* ``metrics.json``, ``roc.png``, ``confusion.png`` and overlays of a few cases
  (FLAIR, the true outline and the model's), ``--record`` into the package.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triagenode.inference.evaluation import (
    EvaluationError,
    format_table,
    metrics_report,
    provenance,
    record_evaluation,
    write_metrics,
    write_plots,
)
from triagenode.inference.labelled import LabelledDataError, labelled_index
from triagenode.inference.metrics import compute_metrics, threshold_for_sensitivity
from triagenode.inference.model_package import ModelPackage
from triagenode.inference.outcomes import NotApplicable, StudyResult
from triagenode.inference.phantom_brain import read_brain_labels
from triagenode.inference.segmentation import Grid, segment_study, select_contrasts
from triagenode.inference.segmentation_metrics import StudySegmentation, study_segmentation, summarise
from triagenode.inference.segmentation_training import ground_truth

LARGE_LESION_ML = 0.5
"""A 10 mm sphere is 0.52 ml: the issue's "lesions of 10 mm and more"."""
OVERLAYS = 4


def evaluate_segmenter(
    package: ModelPackage,
    data_dir: Path,
    labels_csv: Path,
    out_dir: Path | None,
    target_sensitivity: float = 0.95,
    device: torch.device | None = None,
    record: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Segment every labelled study through the node's path and measure it against its ground-truth SEG."""
    device = device or torch.device("cpu")
    manifest = package.manifest
    spec = manifest.segmentation
    assert spec is not None, "a segmentation model's manifest has a segmentation section"
    labels = read_brain_labels(labels_csv)
    if not labels:
        raise EvaluationError(f"{labels_csv} lists no studies")
    index = labelled_index(data_dir, labels)
    for uid in labels:  # every check before any pixel is read
        selected = select_contrasts(index[uid], manifest.input.modality, spec.contrasts)
        if isinstance(selected, NotApplicable):
            raise LabelledDataError(f"study {uid}: {selected.reason}")
    package.network.to(device)
    studies: list[StudySegmentation] = []
    results: dict[str, StudyResult] = {}
    truths: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    for uid in labels:
        result = segment_study(package, index[uid], device)
        assert isinstance(result, StudyResult) and result.mask is not None, "selection was checked above"
        truth = ground_truth(index[uid], result.mask.source_headers)
        grid = Grid.of(result.mask.source_headers)
        spacing = tuple(float(np.linalg.norm(step)) for step in (grid.slice_step, grid.row_step, grid.column_step))
        studies.append(study_segmentation(uid, truth, result.mask.labels > 0, spacing))  # type: ignore[arg-type]
        results[uid], truths[uid] = result, truth
    elapsed = time.perf_counter() - started
    slices = sum(result.slices for result in results.values())
    log(f"segmented {len(studies)} studies ({slices} slices) in {elapsed:.1f} s, {slices / max(elapsed, 1e-9):.1f} "
        "slices/s")
    summary = summarise(studies, large_ml=LARGE_LESION_ML)
    study_labels = np.array([labels[s.study_uid][0] for s in studies])
    volumes = np.array([s.predicted_ml for s in studies], dtype=float)
    triage = compute_metrics(study_labels, volumes, spec.volume_threshold_ml)
    at_target = threshold_for_sensitivity(study_labels, volumes, target_sensitivity)
    report: dict[str, Any] = {
        "task": "segmentation",
        "summary": asdict(summary),
        "triage": {**metrics_report(triage, target_sensitivity, at_target), "score": "outlined lesion volume in ml",
                   "threshold_ml": spec.volume_threshold_ml},
        **provenance(package, data_dir),
    }
    log(_table(summary))
    log("triage (lesion volume at or above the threshold, in ml):")
    log(format_table(triage, target_sensitivity, at_target))
    if out_dir is not None:
        written = [write_metrics(out_dir, report, [asdict(study) for study in studies])]
        written += write_plots(out_dir, study_labels, volumes, triage)
        written += write_overlays(out_dir, results, truths)
        log("wrote " + ", ".join(str(p) for p in written))
    if record:
        record_evaluation(package, {
            "studies": summary.studies,
            "dice_mean": summary.dice_mean,
            "dice_ci95": summary.dice_ci95,
            "dice_mean_lesions_10mm_and_more": summary.dice_mean_large,
            "hausdorff95_median_mm": summary.hausdorff95_median_mm,
            "lesion_recall": summary.lesion_recall,
            "lesion_precision": summary.lesion_precision,
            "triage_sensitivity": triage.sensitivity,
            "triage_specificity": triage.specificity,
            "triage_auc": triage.auc,
            "data": data_dir.name,
            "evaluated_at": report["evaluated_at"],
        }, log)
    return report


def _table(summary: Any) -> str:
    def show(value: float | None, unit: str = "") -> str:
        return "undefined" if value is None else f"{value:.3f}{unit}"

    ci = f" (95% CI {summary.dice_ci95[0]:.3f}-{summary.dice_ci95[1]:.3f})" if summary.dice_ci95 else ""
    return "\n".join([
        f"studies              {summary.studies}",
        f"Dice, mean           {show(summary.dice_mean)}{ci}",
        f"Dice, lesions >= 10 mm ({LARGE_LESION_ML} ml) {show(summary.dice_mean_large)}",
        f"HD95, median         {show(summary.hausdorff95_median_mm, ' mm')}",
        f"lesion recall        {show(summary.lesion_recall)}, precision {show(summary.lesion_precision)}",
        f"volume error         {show(summary.volume_error_ml_mean_abs, ' ml')} mean absolute, "
        f"{show(summary.relative_volume_error_mean_abs)} relative",
        f"voxels               accuracy {show(summary.voxel_accuracy)}, recall {show(summary.voxel_recall)}",
    ])


def write_overlays(out_dir: Path, results: dict[str, StudyResult], truths: dict[str, np.ndarray]) -> list[Path]:
    """A few cases as PNGs: the FLAIR slice with the most lesion, the true outline (green) and the model's (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pydicom import dcmread

    written = []
    cases = [uid for uid, truth in truths.items() if truth.any()][:OVERLAYS]
    for number, uid in enumerate(cases, start=1):
        result, truth = results[uid], truths[uid]
        assert result.mask is not None
        k = int(np.argmax(truth.sum(axis=(1, 2))))
        header = result.mask.source_headers[k]
        path = getattr(header, "filename", None)
        image = dcmread(path).pixel_array if path else np.zeros(truth.shape[1:])
        fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
        ax.imshow(image, cmap="gray")
        ax.contour(truth[k], levels=[0.5], colors="lime", linewidths=1)
        if (result.mask.labels[k] > 0).any():
            ax.contour(result.mask.labels[k] > 0, levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"case {number}: truth green, model red", fontsize=9)
        ax.axis("off")
        fig.tight_layout()
        target = out_dir / f"overlay_{number}.png"
        fig.savefig(target)
        plt.close(fig)
        written.append(target)
    return written


__all__ = ["evaluate_segmenter"]
