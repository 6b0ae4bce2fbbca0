"""How well a lesion segmentation model (brain MRI) outlines lesions: Dice, HD95, lesion-wise and volume measures.

A segmentation is judged per study, on the whole 3D volume, by several measures
that each answer a different question:

* **Dice** (:func:`dice`): voxel overlap, 2|T∩P| / (|T| + |P|). Undefined when
  truth and prediction are both empty (0/0): a lesion-free study called
  lesion-free has no overlap to measure; the study-level triage result judges it.
* **HD95** (:func:`hausdorff95`): the symmetric 95th percentile Hausdorff
  distance in mm, as MONAI's ``compute_hausdorff_distance(percentile=95)``
  defines it: the surface of a mask is its boundary voxels (the mask minus its
  6-connected erosion, outside the volume counted as background); the distances
  from each predicted surface voxel to the nearest true surface voxel and the
  other way round, in mm (voxel centres scaled by the spacing), give two 95th
  percentiles (linear interpolation); HD95 is the larger. Undefined when either
  mask is empty (no surface to measure from or to).
* **Lesion-wise recall and precision** (:func:`lesion_matches`): lesions are
  26-connected components. A true lesion is found when any predicted component
  overlaps it by a voxel; a predicted component is a true positive when it
  overlaps any true lesion. Small lesions count as much as large ones here,
  which Dice (dominated by the large ones) does not show.
* **Volumes** (:func:`volume_ml`): absolute error (predicted - truth, in ml) and
  relative error (divided by the true volume; undefined with no true lesion).
* **Voxel accuracy and recall**: the voxel confusion counts (tp, fp, fn, tn),
  pooled over studies in :func:`summarise`. Accuracy is near 1 for any model on
  a brain of mostly background; it is kept for comparison with earlier reports.

The study-level triage result (true lesion volume above a threshold, predicted
volume as the score) is :func:`triagenode.inference.metrics.compute_metrics` on
the labels and :func:`triage_scores`.

Spacing is (slice, row, column) in mm, the order of the volume's axes. As in
:mod:`triagenode.inference.metrics`, a value whose denominator is empty is
``None`` with a reason in ``undefined``, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from triagenode.inference.metrics import _ratio

Spacing = tuple[float, float, float]
"""(slice, row, column) spacing in mm."""

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)

WHY_DICE_EMPTY = "no true lesion and no predicted lesion voxel: Dice is 0/0 (the triage result judges this study)"
WHY_HD_BOTH_EMPTY = "no true lesion and no predicted lesion voxel: there is no surface to measure"
WHY_HD_TRUTH_EMPTY = "no true lesion: there is no true surface to measure the predicted one against"
WHY_HD_PRED_EMPTY = "no predicted lesion voxel: there is no predicted surface to measure against the true one"
WHY_RELATIVE_EMPTY = "no true lesion: the relative volume error divides by a true volume of 0"
WHY_LESION_RECALL = "no true lesion (at or above the minimum volume): lesion recall has no denominator"
WHY_LESION_PRECISION = "no predicted lesion (at or above the minimum volume): lesion precision has no denominator"


def _check_spacing(spacing: Spacing) -> tuple[float, float, float]:
    values = tuple(float(v) for v in spacing)
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing is three positive finite mm values (slice, row, column), not {spacing!r}")
    return values  # type: ignore[return-value]


def _masks(truth: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as boolean 3D volumes (any non-zero voxel is lesion) of one shape."""
    t, p = np.asarray(truth) != 0, np.asarray(predicted) != 0
    if t.ndim != 3 or t.shape != p.shape:
        raise ValueError(f"truth and prediction must be 3D volumes of one shape, got {t.shape} and {p.shape}")
    return t, p


def volume_ml(mask: np.ndarray, spacing: Spacing) -> float:
    """The mask's volume in ml (voxels x the voxel's volume in mm³ / 1000)."""
    return float(np.count_nonzero(mask)) * math.prod(_check_spacing(spacing)) / 1000.0


def dice(truth: np.ndarray, predicted: np.ndarray) -> float | None:
    """2|T∩P| / (|T| + |P|); None when both are empty (see :data:`WHY_DICE_EMPTY`)."""
    t, p = _masks(truth, predicted)
    total = np.count_nonzero(t) + np.count_nonzero(p)
    if total == 0:
        return None
    return 2.0 * np.count_nonzero(t & p) / total


def _surface_distances(t: np.ndarray, p: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """Distances (mm) from each predicted surface voxel to the true surface, and from each true one to the predicted.

    Erosion is done on the union's bounding box with a margin of one voxel (the
    box's edge sees the same background as the whole volume); the nearest
    surface voxel is found exactly by a k-d tree over the surface voxels' mm
    coordinates, MONAI's own CPU method: a dense distance transform of a whole
    40x256x256 volume takes several times longer.
    """
    union = t | p
    box = []
    for axis in range(3):
        present = np.flatnonzero(np.any(union, axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(int(present[0]) - 1, 0), int(present[-1]) + 2))
    t, p = t[tuple(box)], p[tuple(box)]
    surface_t = t & ~ndimage.binary_erosion(t)
    surface_p = p & ~ndimage.binary_erosion(p)
    scale = np.asarray(spacing, dtype=float)
    points_t, points_p = np.argwhere(surface_t) * scale, np.argwhere(surface_p) * scale
    to_truth = cKDTree(points_t).query(points_p, k=1, workers=-1)[0]
    to_predicted = cKDTree(points_p).query(points_t, k=1, workers=-1)[0]
    return to_truth, to_predicted


def hausdorff95(truth: np.ndarray, predicted: np.ndarray, spacing: Spacing) -> float | None:
    """Symmetric 95th percentile Hausdorff distance in mm between the masks' surfaces; None if either is empty.

    The larger of the two directed 95th percentiles (predicted to true surface,
    true to predicted), as MONAI's ``compute_hausdorff_distance(percentile=95,
    spacing=spacing)``; see the module's docstring.
    """
    t, p = _masks(truth, predicted)
    sampling = _check_spacing(spacing)
    if not t.any() or not p.any():
        return None
    forward, backward = _surface_distances(t, p, sampling)
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


def _hausdorff_reason(t: np.ndarray, p: np.ndarray) -> str:
    if not t.any() and not p.any():
        return WHY_HD_BOTH_EMPTY
    return WHY_HD_TRUTH_EMPTY if not t.any() else WHY_HD_PRED_EMPTY


@dataclass
class LesionCounts:
    """Lesion-wise (connected component) counts of one study, or pooled over studies."""

    true_lesions: int
    found: int  # true lesions overlapped by a predicted component
    predicted_lesions: int
    true_positive_predictions: int  # predicted components overlapping a true lesion
    recall: float | None  # found / true_lesions
    precision: float | None  # true_positive_predictions / predicted_lesions
    undefined: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, true_lesions: int, found: int, predicted_lesions: int, true_positive_predictions: int) -> LesionCounts:
        undefined: dict[str, str] = {}
        recall = _ratio(found, true_lesions)
        if recall is None:
            undefined["recall"] = WHY_LESION_RECALL
        precision = _ratio(true_positive_predictions, predicted_lesions)
        if precision is None:
            undefined["precision"] = WHY_LESION_PRECISION
        return cls(true_lesions, found, predicted_lesions, true_positive_predictions, recall, precision, undefined)


def _components(mask: np.ndarray, min_voxels: float) -> tuple[np.ndarray, int]:
    """26-connected components, those under ``min_voxels`` voxels removed; labels renumbered 1..n."""
    labels, n = ndimage.label(mask, structure=_STRUCTURE_26)
    if n == 0 or min_voxels <= 0:
        return labels, n
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_voxels - 1e-9
    keep[0] = False
    renumber = np.zeros(n + 1, dtype=labels.dtype)
    renumber[keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels.dtype)
    return renumber[labels], int(keep.sum())


def lesion_matches(
    truth: np.ndarray, predicted: np.ndarray, spacing: Spacing, min_volume_ml: float = 0.0
) -> LesionCounts:
    """Count lesions as 26-connected components and match them by overlap (one voxel suffices).

    A true lesion is found when any predicted component overlaps it; a predicted
    component is a true positive when it overlaps any true lesion (one component
    spanning two lesions finds both; two components on one lesion are both true).
    Components, true and predicted alike, under ``min_volume_ml`` are removed
    first (noise specks); a predicted component overlapping only a removed true
    speck is then a false positive.
    """
    t, p = _masks(truth, predicted)
    if min_volume_ml < 0 or not math.isfinite(min_volume_ml):
        raise ValueError(f"min_volume_ml must be a finite value >= 0, not {min_volume_ml!r}")
    min_voxels = min_volume_ml * 1000.0 / math.prod(_check_spacing(spacing))
    true_labels, n_true = _components(t, min_voxels)
    predicted_labels, n_predicted = _components(p, min_voxels)
    both = (true_labels > 0) & (predicted_labels > 0)
    found = len(np.unique(true_labels[both]))
    true_positive = len(np.unique(predicted_labels[both]))
    return LesionCounts.of(n_true, found, n_predicted, true_positive)


@dataclass
class StudySegmentation:
    """Every segmentation measure of one study; ``undefined`` says why a None is None."""

    study_uid: str
    dice: float | None
    hausdorff95_mm: float | None
    truth_ml: float
    predicted_ml: float
    volume_error_ml: float  # predicted - truth
    relative_volume_error: float | None  # (predicted - truth) / truth; None with no true lesion
    lesions: LesionCounts
    voxels: dict[str, int]  # tp, fp, fn, tn
    undefined: dict[str, str] = field(default_factory=dict)


def study_segmentation(
    study_uid: str, truth: np.ndarray, predicted: np.ndarray, spacing: Spacing, min_lesion_ml: float = 0.0
) -> StudySegmentation:
    """All measures of one study (``min_lesion_ml`` is :func:`lesion_matches`' ``min_volume_ml``)."""
    t, p = _masks(truth, predicted)
    sampling = _check_spacing(spacing)
    undefined: dict[str, str] = {}
    tp = int(np.count_nonzero(t & p))
    n_t, n_p = int(np.count_nonzero(t)), int(np.count_nonzero(p))
    voxels = {"tp": tp, "fp": n_p - tp, "fn": n_t - tp, "tn": t.size - n_t - n_p + tp}
    dice_value = None if n_t + n_p == 0 else 2.0 * tp / (n_t + n_p)
    if dice_value is None:
        undefined["dice"] = WHY_DICE_EMPTY
    hd = hausdorff95(t, p, sampling)
    if hd is None:
        undefined["hausdorff95_mm"] = _hausdorff_reason(t, p)
    voxel_ml = math.prod(sampling) / 1000.0
    truth_ml, predicted_ml = n_t * voxel_ml, n_p * voxel_ml
    error = predicted_ml - truth_ml
    relative = None if n_t == 0 else (n_p - n_t) / n_t
    if relative is None:
        undefined["relative_volume_error"] = WHY_RELATIVE_EMPTY
    lesions = lesion_matches(t, p, sampling, min_lesion_ml)
    undefined.update({f"lesion_{name}": why for name, why in lesions.undefined.items()})
    return StudySegmentation(
        study_uid=study_uid,
        dice=dice_value,
        hausdorff95_mm=hd,
        truth_ml=truth_ml,
        predicted_ml=predicted_ml,
        volume_error_ml=error,
        relative_volume_error=relative,
        lesions=lesions,
        voxels=voxels,
        undefined=undefined,
    )


def bootstrap_mean_ci(
    values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of the mean, resampling the values; None without values."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, (resamples, data.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


@dataclass
class SegmentationSummary:
    """The measures over a set of studies; ``undefined`` says why a None is None."""

    studies: int
    dice_mean: float | None  # over studies with a defined Dice
    dice_ci95: tuple[float, float] | None  # bootstrap over those studies (seed 0, 1000 resamples)
    dice_mean_large: float | None  # studies whose true lesion volume >= large_ml
    hausdorff95_median_mm: float | None  # over studies with a defined HD95
    lesion_recall: float | None  # pooled counts
    lesion_precision: float | None  # pooled counts
    lesions: LesionCounts  # the pooled counts
    volume_error_ml_mean_abs: float | None
    relative_volume_error_mean_abs: float | None  # over studies with a true lesion
    voxel_accuracy: float | None  # pooled voxel counts
    voxel_recall: float | None  # pooled voxel counts
    voxels: dict[str, int]  # pooled tp, fp, fn, tn
    large_ml: float | None = None
    undefined: dict[str, str] = field(default_factory=dict)


def summarise(studies: Sequence[StudySegmentation], large_ml: float | None = None) -> SegmentationSummary:
    """Means, medians and pooled counts over ``studies``; each undefined value with its reason."""
    undefined: dict[str, str] = {}
    dices = [s.dice for s in studies if s.dice is not None]
    if dices:
        dice_mean: float | None = float(np.mean(dices))
        dice_ci95 = bootstrap_mean_ci(dices)
    else:
        dice_mean = dice_ci95 = None
        undefined["dice_mean"] = undefined["dice_ci95"] = (
            "no study has a defined Dice (each is empty in truth and prediction, or there is none)"
        )
    if large_ml is None:
        dice_mean_large = None
        undefined["dice_mean_large"] = "no large-lesion volume (large_ml) was given"
    else:
        large = [s.dice for s in studies if s.dice is not None and s.truth_ml >= large_ml]
        dice_mean_large = float(np.mean(large)) if large else None
        if not large:
            undefined["dice_mean_large"] = f"no study has a true lesion volume of at least {large_ml:g} ml"
    distances = [s.hausdorff95_mm for s in studies if s.hausdorff95_mm is not None]
    hd_median = float(np.median(distances)) if distances else None
    if hd_median is None:
        undefined["hausdorff95_median_mm"] = "no study has both a true and a predicted lesion"
    pooled = LesionCounts.of(
        sum(s.lesions.true_lesions for s in studies),
        sum(s.lesions.found for s in studies),
        sum(s.lesions.predicted_lesions for s in studies),
        sum(s.lesions.true_positive_predictions for s in studies),
    )
    undefined.update({f"lesion_{name}": why for name, why in pooled.undefined.items()})
    volume_error = float(np.mean([abs(s.volume_error_ml) for s in studies])) if studies else None
    if volume_error is None:
        undefined["volume_error_ml_mean_abs"] = "no study"
    relative = [abs(s.relative_volume_error) for s in studies if s.relative_volume_error is not None]
    relative_mean = float(np.mean(relative)) if relative else None
    if relative_mean is None:
        undefined["relative_volume_error_mean_abs"] = "no study has a true lesion"
    voxels = {key: sum(s.voxels[key] for s in studies) for key in ("tp", "fp", "fn", "tn")}
    accuracy = _ratio(voxels["tp"] + voxels["tn"], sum(voxels.values()))
    if accuracy is None:
        undefined["voxel_accuracy"] = "no voxel"
    recall = _ratio(voxels["tp"], voxels["tp"] + voxels["fn"])
    if recall is None:
        undefined["voxel_recall"] = "no true lesion voxel"
    return SegmentationSummary(
        studies=len(studies),
        dice_mean=dice_mean,
        dice_ci95=dice_ci95,
        dice_mean_large=dice_mean_large,
        hausdorff95_median_mm=hd_median,
        lesion_recall=pooled.recall,
        lesion_precision=pooled.precision,
        lesions=pooled,
        volume_error_ml_mean_abs=volume_error,
        relative_volume_error_mean_abs=relative_mean,
        voxel_accuracy=accuracy,
        voxel_recall=recall,
        voxels=voxels,
        large_ml=large_ml,
        undefined=undefined,
    )


def triage_scores(studies: Sequence[StudySegmentation]) -> np.ndarray:
    """Each study's predicted lesion volume (ml): the score of the study-level triage result.

    With labels "true lesion volume >= threshold", pass these to
    :func:`triagenode.inference.metrics.compute_metrics` (threshold in ml).
    """
    return np.array([s.predicted_ml for s in studies], dtype=float)
