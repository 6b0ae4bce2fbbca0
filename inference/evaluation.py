"""``triagenode model evaluate``: how a model does on a site's own labelled studies, before it goes live.

Scores every labelled study through the node's own per-study pipeline (the
series the node would pick, its decoders and preprocessing, per-slice
probabilities, the manifest's aggregation), so the probability evaluated for a
study is the one the node reports for it; then reports accuracy,
sensitivity, specificity, PPV, NPV, F1 and ROC AUC with a 95% bootstrap
interval at the model's threshold, the confusion matrix, and the threshold
that reaches a chosen sensitivity. Writes ``metrics.json``, ``roc.png`` and
``confusion.png``; ``--record`` also stores the evaluation in the package.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triagenode.config.settings import InferenceSettings
from triagenode.inference.labelled import LabelledDataError, labelled_series
from triagenode.inference.loader import SliceLoader
from triagenode.inference.metrics import Metrics, compute_metrics, roc_curve, threshold_for_sensitivity
from triagenode.inference.model_package import ModelPackage, save_package
from triagenode.inference.outcomes import StudyResult
from triagenode.inference.phantom import read_labels
from triagenode.inference.pipeline import SeriesGeometryError, score_study


class EvaluationError(RuntimeError):
    """Evaluation cannot run on this data; the text says what to change."""


@dataclass
class ScoredStudy:
    """One labelled study as the node would score it: the series it read and the probability it would report."""

    study_uid: str
    label: int
    series_uid: str
    probability: float
    slices: int


def score_studies(
    package: ModelPackage,
    data_dir: Path,
    labels_csv: Path,
    device: torch.device,
    log: Callable[[str], None] = print,
    batch_size: int | None = None,
    decoders: int | None = None,
) -> list[ScoredStudy]:
    """Every labelled study through the node's own per-study pipeline (:func:`score_study`).

    Same series selection, decoders, preprocessing, batching and aggregation as
    a worker, so each probability is the one the node would report for that
    study. ``batch_size`` and ``decoders`` default to the node's own defaults
    (``[inference]``); the batch size is kept because a forward pass's numbers
    may differ in the last bits between batch sizes.
    """
    labels = read_labels(labels_csv)
    if not labels:
        raise EvaluationError(f"{labels_csv} lists no studies")
    studies = labelled_series(data_dir, labels, package.manifest.input)
    node = InferenceSettings()
    package.network.to(device)
    scored = []
    started = time.perf_counter()
    with SliceLoader(node.decoders() if decoders is None else decoders) as loader:
        for labelled in studies:
            try:
                outcome = score_study(package, labelled.study, device, batch_size or node.batch_size, loader)
            except SeriesGeometryError as exc:
                raise LabelledDataError(f"study {labelled.truth.study_uid}: {exc}") from None
            if not isinstance(outcome, StudyResult):  # labelled_series refused those already: the same rules
                raise LabelledDataError(f"study {labelled.truth.study_uid}: {outcome.reason}")
            scored.append(
                ScoredStudy(
                    outcome.study_uid, labelled.truth.label, outcome.series_uid, outcome.probability, outcome.slices
                )
            )
    elapsed = time.perf_counter() - started
    slices = sum(s.slices for s in scored)
    rate = slices / max(elapsed, 1e-9)
    log(f"scored {len(scored)} studies ({slices} slices) in {elapsed:.1f} s, {rate:.0f} slices/s")
    return scored


def metrics_report(metrics: Metrics, target_sensitivity: float, threshold_at_target: float | None) -> dict[str, Any]:
    data = asdict(metrics)
    data["confusion"] = asdict(metrics.confusion)
    data["target_sensitivity"] = target_sensitivity
    data["threshold_at_target_sensitivity"] = threshold_at_target
    return data


def format_table(metrics: Metrics, target_sensitivity: float, threshold_at_target: float | None) -> str:
    def show(value: float | None, key: str) -> str:
        return f"{value:.3f}" if value is not None else f"undefined ({metrics.undefined.get(key, '')})"

    c = metrics.confusion
    ci = f" (95% CI {metrics.auc_ci95[0]:.3f}-{metrics.auc_ci95[1]:.3f})" if metrics.auc_ci95 else ""
    rows = [
        f"studies              {metrics.studies} ({metrics.positives} positive)",
        f"threshold            {metrics.threshold:.4f}",
        f"accuracy             {show(metrics.accuracy, 'accuracy')}",
        f"sensitivity (recall) {show(metrics.sensitivity, 'sensitivity')}",
        f"specificity          {show(metrics.specificity, 'specificity')}",
        f"precision (PPV)      {show(metrics.ppv, 'ppv')}",
        f"NPV                  {show(metrics.npv, 'npv')}",
        f"F1                   {show(metrics.f1, 'f1')}",
        f"ROC AUC              {show(metrics.auc, 'auc')}{ci}",
        "",
        "confusion matrix     predicted +   predicted -",
        f"  actual +           {c.tp:>11}   {c.fn:>11}",
        f"  actual -           {c.fp:>11}   {c.tn:>11}",
        "",
        f"threshold for sensitivity >= {target_sensitivity:g}: "
        + (f"{threshold_at_target:.4f}" if threshold_at_target is not None else "undefined (no positive study)"),
    ]
    return "\n".join(rows)


def write_plots(out_dir: Path, labels: np.ndarray, scores: np.ndarray, metrics: Metrics) -> list[Path]:
    """ROC curve and confusion matrix as PNG (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if metrics.auc is not None:
        fpr, tpr, _ = roc_curve(labels, scores)
        fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
        ax.plot(fpr, tpr, lw=2, label=f"AUC {metrics.auc:.3f}")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title("ROC, study level")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out_dir / "roc.png")
        plt.close(fig)
        written.append(out_dir / "roc.png")
    c = metrics.confusion
    fig, ax = plt.subplots(figsize=(4, 3.6), dpi=120)
    matrix = np.array([[c.tp, c.fn], [c.fp, c.tn]])
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=14)
    ax.set_xticks([0, 1], ["predicted +", "predicted -"])
    ax.set_yticks([0, 1], ["actual +", "actual -"])
    ax.set_title(f"threshold {metrics.threshold:.3f}")
    fig.tight_layout()
    fig.savefig(out_dir / "confusion.png")
    plt.close(fig)
    written.append(out_dir / "confusion.png")
    return written


def provenance(package: ModelPackage, data_dir: Path) -> dict[str, Any]:
    """What every ``metrics.json`` says of itself: the model, the data, when."""
    return {
        "model": {"name": package.manifest.name, "version": package.manifest.version},
        "data": str(data_dir),
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_metrics(out_dir: Path, report: dict[str, Any], per_study: list[dict[str, Any]]) -> Path:
    """``metrics.json``: the report and every study's own figures (``studies_scored``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps({**report, "studies_scored": per_study}, indent=2))
    return path


def record_evaluation(package: ModelPackage, summary: dict[str, Any], log: Callable[[str], None]) -> None:
    """Store an evaluation's summary in the package's manifest (``--record``); the weights stay as they are."""
    if package.path is None:
        return
    package.manifest.evaluation = summary
    save_package(package.path, package.manifest, package.network.to("cpu"))
    log(f"recorded the evaluation in {package.path}")


def evaluate(
    package: ModelPackage,
    data_dir: Path,
    labels_csv: Path,
    out_dir: Path | None,
    target_sensitivity: float = 0.95,
    device: torch.device | None = None,
    record: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    device = device or torch.device("cpu")
    scored = score_studies(package, data_dir, labels_csv, device, log)
    labels = np.array([s.label for s in scored])
    scores = np.array([s.probability for s in scored], dtype=float)
    metrics = compute_metrics(labels, scores, package.manifest.threshold)
    at_target = threshold_for_sensitivity(labels, scores, target_sensitivity)
    report = {**metrics_report(metrics, target_sensitivity, at_target), **provenance(package, data_dir)}
    log(format_table(metrics, target_sensitivity, at_target))
    if out_dir is not None:
        written = [write_metrics(out_dir, report, [asdict(s) for s in scored])]
        written += write_plots(out_dir, labels, scores, metrics)
        log("wrote " + ", ".join(str(p) for p in written))
    if record:
        summary = {
            key: report[key]
            for key in ("studies", "positives", "threshold", "accuracy", "sensitivity", "specificity", "ppv", "npv")
        }
        summary.update(
            f1=report["f1"],
            auc=report["auc"],
            auc_ci95=report["auc_ci95"],
            data=data_dir.name,
            evaluated_at=report["evaluated_at"],
        )
        record_evaluation(package, summary, log)
    return report
