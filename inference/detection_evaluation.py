"""``triagenode model evaluate`` for a detection model: what breast-imaging CAD is judged by, on a site's own data.

Every labelled study goes through the node's own path (the images it would
read, its input, its decoding: :func:`inference.detection.study_candidates`),
so each candidate and each study score is what the node would report. Then:

* FROC (:mod:`inference.froc`): lesion sensitivity at 0.25, 0.5, 1, 2 and 4
  false positives per image, their mean, and the curve (``froc.png``), with
  the hit rule written into ``metrics.json``;
* per study (a study's score is its highest certainty, as in the node): ROC
  AUC with a 95% bootstrap interval, and accuracy, sensitivity (recall),
  specificity, precision, NPV and F1 at the model's threshold, the confusion
  matrix (``roc.png``, ``confusion.png``), as for a classifier;
* per lesion and per image at the threshold: recall, precision, F1, false
  positives per image; per image also accuracy and specificity (a lesion has
  no true negative, so those are undefined per lesion, and say why).

``--record`` stores a summary in the package's manifest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triagenode.config.settings import InferenceSettings
from triagenode.inference.detection import select_images, study_candidates
from triagenode.inference.detection_training import lesions_file, read_truth, study_truth
from triagenode.inference.evaluation import (
    EvaluationError,
    format_table,
    metrics_report,
    provenance,
    record_evaluation,
    write_metrics,
    write_plots,
)
from triagenode.inference.froc import HIT_RULE, Mark, TrueLesion, froc, froc_report, lesion_metrics, write_froc_plot
from triagenode.inference.labelled import LabelledDataError, labelled_index
from triagenode.inference.loader import SliceLoader
from triagenode.inference.metrics import compute_metrics, threshold_for_sensitivity
from triagenode.inference.model_package import ModelPackage
from triagenode.inference.outcomes import NotApplicable


@dataclass
class ScoredStudyImages:
    """One labelled study as the node would score it: its images, its candidates, its score."""

    study_uid: str
    label: int
    images: list[str]
    score: float
    marks: int
    """Candidates at or above the model's threshold."""


def evaluate_detector(
    package: ModelPackage,
    data_dir: Path,
    labels_csv: Path,
    out_dir: Path | None,
    target_sensitivity: float = 0.95,
    device: torch.device | None = None,
    record: bool = False,
    log: Callable[[str], None] = print,
    lesions_csv: Path | None = None,
) -> dict[str, Any]:
    """Score every labelled study through the node's path, compute FROC and the study, lesion and image measures."""
    device = device or torch.device("cpu")
    manifest = package.manifest
    boxes_csv = lesions_file(labels_csv, lesions_csv)
    labels, boxes = read_truth(labels_csv, boxes_csv)
    if not labels:
        raise EvaluationError(f"{labels_csv} lists no studies")
    index = labelled_index(data_dir, labels)
    studies = []
    for uid, labelled in labels.items():  # every check before any pixel is decoded
        selection = select_images(index[uid], manifest.input)
        if isinstance(selection, NotApplicable):
            raise LabelledDataError(f"study {uid}: {selection.reason}")
        detection = manifest.detection
        assert detection is not None, "a detection model's manifest has a detection section"
        truth_of_study = study_truth(uid, labelled.label, boxes.get(uid, []), selection, detection, boxes_csv)
        studies.append((uid, labelled.label, selection, truth_of_study))
    package.network.to(device)
    marks: list[Mark] = []
    truth: list[TrueLesion] = []
    scored: list[ScoredStudyImages] = []
    started = time.perf_counter()
    node = InferenceSettings()
    with SliceLoader(node.decoders()) as loader:  # the node's own decoders, as a worker would have them
        for uid, label, selection, truth_of_study in studies:
            found = study_candidates(package, selection, device, node.batch_size, loader)
            marks += [Mark(uid, c.sop_instance_uid, c.type, c.box, c.certainty) for c in found.candidates]
            truth += truth_of_study
            images = [image.sop_instance_uid for image in selection.images]
            score = found.candidates[0].certainty if found.candidates else 0.0
            above = sum(1 for c in found.candidates if c.certainty >= manifest.threshold)
            scored.append(ScoredStudyImages(uid, label, images, round(score, 6), above))
    elapsed = time.perf_counter() - started
    image_uids = [uid for study in scored for uid in study.images]
    log(f"scored {len(scored)} studies ({len(image_uids)} images) in {elapsed:.1f} s, "
        f"{len(image_uids) / max(elapsed, 1e-9):.1f} images/s")

    curve = froc(marks, truth, len(image_uids))
    per_lesion = lesion_metrics(marks, truth, image_uids, manifest.threshold)
    study_labels = np.array([s.label for s in scored])
    study_scores = np.array([s.score for s in scored], dtype=float)
    per_study = compute_metrics(study_labels, study_scores, manifest.threshold)
    at_target = threshold_for_sensitivity(study_labels, study_scores, target_sensitivity)
    report: dict[str, Any] = {
        "task": "detection",
        "hit_rule": HIT_RULE,
        "froc": froc_report(curve),
        "study": metrics_report(per_study, target_sensitivity, at_target),
        "lesion": asdict(per_lesion),
        **provenance(package, data_dir),
    }
    log(_froc_table(report))
    log("per study (score = the highest certainty):")
    log(format_table(per_study, target_sensitivity, at_target))
    if out_dir is not None:
        written = [write_metrics(out_dir, report, [asdict(s) for s in scored])]
        written += [write_froc_plot(out_dir / "froc.png", curve, f"FROC, {manifest.name} {manifest.version}")]
        written += write_plots(out_dir, study_labels, study_scores, per_study)
        log("wrote " + ", ".join(str(p) for p in written))
    if record:
        record_evaluation(package, {
            "studies": per_study.studies,
            "positives": per_study.positives,
            "images": curve.images,
            "lesion_views": curve.lesions,
            "threshold": manifest.threshold,
            "froc_mean_sensitivity": curve.mean_sensitivity,
            "sensitivity_at_fp_per_image": {str(k): v for k, v in curve.sensitivity_at.items()},
            "study_auc": per_study.auc,
            "study_auc_ci95": per_study.auc_ci95,
            "study_sensitivity": per_study.sensitivity,
            "study_specificity": per_study.specificity,
            "lesion_recall": per_lesion.recall,
            "lesion_precision": per_lesion.precision,
            "data": data_dir.name,
            "evaluated_at": report["evaluated_at"],
        }, log)
    return report


def _froc_table(report: dict[str, Any]) -> str:
    froc_data, lesion = report["froc"], report["lesion"]

    def show(value: float | None) -> str:
        return "undefined" if value is None else f"{value:.3f}"

    rows = [f"images               {froc_data['images']} ({froc_data['lesions']} lesion views)"]
    rows += [f"sensitivity at {rate:>4g} FP/image {show(value)}"
             for rate, value in ((float(k), v) for k, v in froc_data["sensitivity_at"].items())]
    rows += [
        f"mean FROC sensitivity {show(froc_data['mean_sensitivity'])}",
        f"at threshold {lesion['threshold']:.4f}: lesion recall {show(lesion['recall'])} "
        f"(any view {show(lesion['lesion_recall_any_view'])}), precision {show(lesion['precision'])}, "
        f"F1 {show(lesion['f1'])}, {show(lesion['false_positives_per_image'])} false positives per image",
        f"hit rule: {report['hit_rule']}",
    ]
    return "\n".join(rows)


__all__ = ["ScoredStudyImages", "evaluate_detector"]
