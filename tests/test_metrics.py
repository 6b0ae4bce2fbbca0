"""Every evaluation metric against scikit-learn on fixed inputs, and the edge cases that must not give NaN."""

from __future__ import annotations

import math

import numpy as np
import pytest

from triagenode.inference.metrics import compute_metrics, roc_auc, roc_curve, threshold_for_sensitivity

sklearn_metrics = pytest.importorskip("sklearn.metrics")

LABELS = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0, 1, 0, 0])
SCORES = np.array(
    [0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.55, 0.65, 0.3, 0.05, 0.6, 0.7, 0.45, 0.15, 0.95, 0.5, 0.5, 0.4, 0.25, 0.1]
)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_metrics_match_scikit_learn(threshold: float) -> None:
    m = compute_metrics(LABELS, SCORES, threshold, bootstrap=200)
    predicted = (SCORES >= threshold).astype(int)
    tn, fp, fn, tp = sklearn_metrics.confusion_matrix(LABELS, predicted).ravel()
    assert (m.confusion.tp, m.confusion.fp, m.confusion.tn, m.confusion.fn) == (tp, fp, tn, fn)
    assert m.accuracy == pytest.approx(sklearn_metrics.accuracy_score(LABELS, predicted))
    assert m.sensitivity == pytest.approx(sklearn_metrics.recall_score(LABELS, predicted))
    assert m.specificity == pytest.approx(sklearn_metrics.recall_score(1 - LABELS, 1 - predicted))
    assert m.ppv == pytest.approx(sklearn_metrics.precision_score(LABELS, predicted))
    assert m.npv == pytest.approx(sklearn_metrics.precision_score(1 - LABELS, 1 - predicted))
    assert m.f1 == pytest.approx(sklearn_metrics.f1_score(LABELS, predicted))
    assert m.auc == pytest.approx(sklearn_metrics.roc_auc_score(LABELS, SCORES))
    assert m.auc_ci95 is not None and m.auc_ci95[0] <= m.auc <= m.auc_ci95[1]


def test_roc_curve_matches_scikit_learn() -> None:
    fpr, tpr, _ = roc_curve(LABELS, SCORES)
    sk_fpr, sk_tpr, _ = sklearn_metrics.roc_curve(LABELS, SCORES, drop_intermediate=False)
    assert np.allclose(fpr, sk_fpr) and np.allclose(tpr, sk_tpr)


def test_threshold_for_a_target_sensitivity_reaches_it_with_the_fewest_positives_called() -> None:
    threshold = threshold_for_sensitivity(LABELS, SCORES, 0.85)
    assert threshold is not None
    predicted = (SCORES >= threshold).astype(int)
    assert sklearn_metrics.recall_score(LABELS, predicted) >= 0.85
    higher = SCORES[SCORES > threshold].min()
    assert sklearn_metrics.recall_score(LABELS, (SCORES >= higher).astype(int)) < 0.85


def test_one_class_only_gives_reasons_not_nan() -> None:
    m = compute_metrics(np.ones(6, dtype=int), np.linspace(0.1, 0.9, 6), 0.5)
    assert m.auc is None and m.auc_ci95 is None and m.specificity is None
    assert "only one class" in m.undefined["auc"]
    assert "no negative study" in m.undefined["specificity"]
    assert m.sensitivity == pytest.approx(0.5)
    for value in (m.accuracy, m.sensitivity, m.ppv, m.f1):
        assert value is not None and not math.isnan(value)


def test_all_predictions_equal() -> None:
    m = compute_metrics(LABELS, np.full(len(LABELS), 0.3), 0.5)
    assert (
        m.auc == pytest.approx(0.5) == pytest.approx(sklearn_metrics.roc_auc_score(LABELS, np.full(len(LABELS), 0.3)))
    )
    assert m.ppv is None and "no study was called positive" in m.undefined["ppv"]
    assert m.sensitivity == 0.0 and m.specificity == 1.0
    assert roc_auc(np.array([0, 1]), np.array([0.2, 0.2])) == 0.5
