"""Study-level diagnostic metrics, written out so that each one says what it is and when it is undefined.

A metric whose denominator is empty (sensitivity with no positive study, AUC
with one class only) is ``None`` with a reason in :attr:`Metrics.undefined`,
never NaN and never a crash: clinical AI staff must see *why* a number is
missing. Tests check every value against scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int


@dataclass
class Metrics:
    threshold: float
    studies: int
    positives: int
    confusion: Confusion
    accuracy: float | None
    sensitivity: float | None
    specificity: float | None
    ppv: float | None
    npv: float | None
    f1: float | None
    auc: float | None
    auc_ci95: tuple[float, float] | None
    undefined: dict[str, str] = field(default_factory=dict)


def _ratio(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else numerator / denominator


def confusion_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> Confusion:
    """Predicted positive when the score is at or above the threshold."""
    predicted = scores >= threshold
    truth = labels.astype(bool)
    return Confusion(
        tp=int(np.sum(predicted & truth)),
        fp=int(np.sum(predicted & ~truth)),
        tn=int(np.sum(~predicted & ~truth)),
        fn=int(np.sum(~predicted & truth)),
    )


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); None with one class only."""
    labels = np.asarray(labels).astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=float)
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(average, counts)
    u = ranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False positive rates, true positive rates and the thresholds, from (0, 0) to (1, 1)."""
    labels = np.asarray(labels).astype(bool)
    thresholds = np.unique(scores)[::-1]
    tpr = [0.0]
    fpr = [0.0]
    positives, negatives = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
    for threshold in thresholds:
        predicted = scores >= threshold
        tpr.append(float(np.sum(predicted & labels) / positives))
        fpr.append(float(np.sum(predicted & ~labels) / negatives))
    return np.array(fpr), np.array(tpr), np.concatenate([[np.inf], thresholds])


def bootstrap_auc_ci(
    labels: np.ndarray, scores: np.ndarray, resamples: int = 1000, seed: int = 0
) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of the AUC, resampling studies; None when undefined."""
    if roc_auc(labels, scores) is None:
        return None
    rng = np.random.default_rng(seed)
    n = len(labels)
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, n, n)
        value = roc_auc(labels[pick], scores[pick])
        if value is not None:
            values.append(value)
    if not values:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def threshold_for_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float) -> float | None:
    """The highest threshold whose sensitivity reaches ``target`` (fewest false positives); None without positives."""
    labels = np.asarray(labels).astype(bool)
    positive_scores = np.sort(np.asarray(scores)[labels])[::-1]
    if len(positive_scores) == 0:
        return None
    needed = int(np.ceil(target * len(positive_scores) - 1e-9))
    needed = min(max(needed, 1), len(positive_scores))
    return float(positive_scores[needed - 1])


def compute_metrics(
    labels: np.ndarray, scores: np.ndarray, threshold: float, bootstrap: int = 1000, seed: int = 0
) -> Metrics:
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=float)
    c = confusion_at(labels, scores, threshold)
    undefined: dict[str, str] = {}

    def defined(name: str, numerator: int, denominator: int, why_not: str) -> float | None:
        """The ratio, or None with the reason it is undefined on this data (the report says why)."""
        value = _ratio(numerator, denominator)
        if value is None:
            undefined[name] = why_not
        return value

    sensitivity = defined("sensitivity", c.tp, c.tp + c.fn, "no positive study in the data")
    specificity = defined("specificity", c.tn, c.tn + c.fp, "no negative study in the data")
    ppv = defined("ppv", c.tp, c.tp + c.fp, "no study was called positive at this threshold")
    npv = defined("npv", c.tn, c.tn + c.fn, "no study was called negative at this threshold")
    f1 = defined("f1", 2 * c.tp, 2 * c.tp + c.fp + c.fn, "no positive study and none called positive")
    auc = roc_auc(labels, scores)
    if auc is None:
        undefined["auc"] = "the ROC AUC needs positive and negative studies; the data holds only one class"
    return Metrics(
        threshold=threshold,
        studies=len(labels),
        positives=int(labels.sum()),
        confusion=c,
        accuracy=_ratio(c.tp + c.tn, len(labels)),
        sensitivity=sensitivity,
        specificity=specificity,
        ppv=ppv,
        npv=npv,
        f1=f1,
        auc=auc,
        auc_ci95=bootstrap_auc_ci(labels, scores, bootstrap, seed) if bootstrap else None,
        undefined=undefined,
    )
