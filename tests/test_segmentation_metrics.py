"""Segmentation measures on hand-made volumes whose answers are worked out by hand, and against MONAI's metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from triagenode.inference.metrics import compute_metrics
from triagenode.inference.segmentation_metrics import (
    WHY_DICE_EMPTY,
    WHY_HD_BOTH_EMPTY,
    WHY_HD_PRED_EMPTY,
    WHY_HD_TRUTH_EMPTY,
    WHY_LESION_PRECISION,
    WHY_LESION_RECALL,
    WHY_RELATIVE_EMPTY,
    bootstrap_mean_ci,
    dice,
    hausdorff95,
    lesion_matches,
    study_segmentation,
    summarise,
    triage_scores,
    volume_ml,
)

SHAPE = (12, 24, 24)


def empty(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


def cube(corner: tuple[int, int, int], side: int, shape: tuple[int, int, int] = (20, 30, 30)) -> np.ndarray:
    mask = empty(shape)
    s, r, c = corner
    mask[s : s + side, r : r + side, c : c + side] = True
    return mask


def test_dice_of_two_cubes_offset_by_three_voxels_by_hand() -> None:
    # Two 10-voxel cubes, the second 3 rows further: they share 10 x 7 x 10 = 700 of their 1000 voxels each.
    truth, predicted = cube((2, 2, 2), 10), cube((2, 5, 2), 10)
    assert dice(truth, predicted) == pytest.approx(2 * 700 / 2000)  # 0.7
    assert dice(truth, truth) == 1.0
    assert dice(truth, cube((2, 15, 2), 10)) == 0.0  # disjoint
    # Any non-zero voxel is lesion: a 0/1 integer mask gives the same answer.
    assert dice(truth.astype(np.uint8), predicted.astype(np.int32) * 3) == pytest.approx(0.7)


def test_hausdorff95_of_two_plates_with_anisotropic_spacing_by_hand() -> None:
    # One-slice plates: every voxel is a surface voxel. The prediction is 2 slices (2 x 2.5 mm) higher and one
    # column (0.8 mm) over. 12 of its 16 voxels lie straight over a true voxel (5 mm); the 4 in the column beyond
    # are sqrt(5^2 + 0.8^2) mm from the nearest one, and so are the true voxels of the column it left (the other
    # way). The 95th percentile of 16 sorted distances interpolates between the 15th and 16th: both the far value.
    spacing = (2.5, 0.8, 0.8)
    truth, predicted = empty(), empty()
    truth[2, 2:6, 2:6] = True
    predicted[4, 2:6, 3:7] = True
    assert hausdorff95(truth, predicted, spacing) == pytest.approx(math.sqrt(5.0**2 + 0.8**2))
    assert hausdorff95(predicted, truth, spacing) == pytest.approx(math.sqrt(5.0**2 + 0.8**2))  # symmetric
    # Shifted straight up only: every distance is 2 x 2.5 mm; the spacing's axes are (slice, row, column).
    straight = empty()
    straight[4, 2:6, 2:6] = True
    assert hausdorff95(truth, straight, spacing) == pytest.approx(5.0)
    assert hausdorff95(truth, straight, (1.0, 0.8, 0.8)) == pytest.approx(2.0)
    assert hausdorff95(truth, truth, spacing) == 0.0


def test_hausdorff95_ignores_the_farthest_five_percent_and_uses_the_surface_only() -> None:
    spacing = (3.0, 1.0, 1.0)
    truth = empty()
    truth[1, 2:12, 2:12] = True  # 100 surface voxels
    predicted = truth.copy()
    predicted[10, 20, 20] = True  # one speck 27 mm and more away: 1 of 101 distances, above the 95th percentile
    assert hausdorff95(truth, predicted, spacing) == 0.0
    # Distances run between boundary voxels: a solid cube inside a larger one is 2 voxels from its surface
    # everywhere on the faces (the interior voxels of the larger cube do not count as surface).
    outer, inner = cube((0, 0, 0), 9, SHAPE), cube((2, 2, 2), 5, SHAPE)
    # From every inner surface voxel the nearest outer surface voxel is 2 voxels away along one axis at least;
    # from the outer surface, the nearest inner one is 2 (faces) to 2*sqrt(3) (corners) voxels away.
    result = hausdorff95(outer, inner, (1.0, 1.0, 1.0))
    assert result is not None and 2.0 < result <= 2 * math.sqrt(3) + 1e-9
    assert hausdorff95(inner, outer, (1.0, 1.0, 1.0)) == pytest.approx(result)


def blobs(rng: np.random.Generator, shape: tuple[int, int, int], fraction: float) -> np.ndarray:
    """Smooth random blobs covering about ``fraction`` of the volume, some touching its border."""
    field = ndimage.gaussian_filter(rng.random(shape), sigma=2.0)
    return field > np.quantile(field, 1 - fraction)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notice inside get_mask_edges
def test_dice_and_hausdorff95_agree_with_monai(seed: int) -> None:
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(10, 24)), int(rng.integers(20, 48)), int(rng.integers(20, 48)))
    spacing = (float(rng.uniform(1.0, 5.0)), float(rng.uniform(0.4, 1.2)), float(rng.uniform(0.4, 1.2)))
    truth = blobs(rng, shape, 0.06)
    # A prediction that overlaps the truth in part, plus blobs of its own.
    predicted = (truth & blobs(rng, shape, 0.5)) | blobs(rng, shape, 0.03)

    def one_hot_batch(mask: np.ndarray):  # (batch 1, channel 1, *spatial), the channel being the lesion class
        return torch.as_tensor(mask[None, None], dtype=torch.float32)

    monai_dice = monai_metrics.compute_dice(one_hot_batch(predicted), one_hot_batch(truth), include_background=True)
    monai_hd95 = monai_metrics.compute_hausdorff_distance(
        one_hot_batch(predicted), one_hot_batch(truth), include_background=True, percentile=95, spacing=spacing
    )
    ours_dice, ours_hd95 = dice(truth, predicted), hausdorff95(truth, predicted, spacing)
    assert ours_dice is not None and 0.0 < ours_dice < 1.0
    assert ours_hd95 is not None and ours_hd95 > 0.0
    # MONAI computes in float32.
    assert ours_dice == pytest.approx(float(monai_dice.item()), rel=1e-6)
    assert ours_hd95 == pytest.approx(float(monai_hd95.item()), rel=1e-5)


def test_lesion_matches_three_true_blobs_two_found_one_false_positive() -> None:
    spacing = (1.0, 1.0, 1.0)
    truth, predicted = empty(), empty()
    truth[1:3, 1:4, 1:4] = True  # lesion A: found by a prediction overlapping one voxel
    truth[6:9, 10:14, 10:14] = True  # lesion B: found by two predicted components
    truth[1:3, 18:21, 18:21] = True  # lesion C: missed
    predicted[2:4, 3:6, 3:6] = True  # overlaps A at (2, 3, 3)
    predicted[7, 11:13, 11] = True  # on B
    predicted[7, 11:13, 13] = True  # on B too, a column apart: a separate component
    predicted[9:11, 1:3, 18:21] = True  # on nothing: a false positive
    counts = lesion_matches(truth, predicted, spacing)
    assert (counts.true_lesions, counts.found) == (3, 2)
    assert (counts.predicted_lesions, counts.true_positive_predictions) == (4, 3)
    assert counts.recall == pytest.approx(2 / 3)
    assert counts.precision == pytest.approx(3 / 4)
    assert counts.undefined == {}


def test_lesions_are_26_connected_and_specks_under_the_minimum_volume_are_dropped() -> None:
    spacing = (2.0, 1.0, 1.0)  # 2 mm³ voxels
    truth, predicted = empty(), empty()
    truth[2, 2, 2] = truth[3, 3, 3] = True  # corner to corner: one lesion
    truth[8:10, 10:20, 10:20] = True  # 200 voxels = 0.4 ml
    predicted[2, 2, 2] = True  # finds the small lesion
    predicted[5, 5, 5] = True  # a speck on nothing
    predicted[9, 12:14, 12:14] = True  # finds the large one
    counts = lesion_matches(truth, predicted, spacing)
    assert (counts.true_lesions, counts.found, counts.predicted_lesions, counts.true_positive_predictions) == (
        2,
        2,
        3,
        2,
    )
    # At 0.005 ml (2.5 voxels) the two-voxel lesion and both one-voxel specks go; the 4-voxel prediction stays.
    counts = lesion_matches(truth, predicted, spacing, min_volume_ml=0.005)
    assert (counts.true_lesions, counts.found, counts.predicted_lesions, counts.true_positive_predictions) == (
        1,
        1,
        1,
        1,
    )
    assert (counts.recall, counts.precision) == (1.0, 1.0)
    with pytest.raises(ValueError, match="min_volume_ml"):
        lesion_matches(truth, predicted, spacing, min_volume_ml=-1.0)


def test_volumes_and_volume_errors_by_hand() -> None:
    spacing = (2.0, 0.5, 1.0)  # 1 mm³ voxels
    truth, predicted = empty(), empty()
    truth[0:10, 0:10, 0:10] = True  # 1000 voxels = 1 ml
    predicted[0:10, 0:10, 5:20] = True  # 1500 voxels, 500 shared
    assert volume_ml(truth, spacing) == pytest.approx(1.0)
    study = study_segmentation("S1", truth, predicted, spacing)
    assert (study.truth_ml, study.predicted_ml) == (pytest.approx(1.0), pytest.approx(1.5))
    assert study.volume_error_ml == pytest.approx(0.5)
    assert study.relative_volume_error == pytest.approx(0.5)
    assert study.voxels == {"tp": 500, "fp": 1000, "fn": 500, "tn": truth.size - 2000}
    assert study.dice == pytest.approx(1000 / 2500)
    assert study.undefined == {}
    under = study_segmentation("S2", predicted, truth, spacing)  # an undersegmentation
    assert under.volume_error_ml == pytest.approx(-0.5)
    assert under.relative_volume_error == pytest.approx(-1 / 3)


def test_empty_truth_or_prediction_gives_none_with_a_reason() -> None:
    spacing = (1.0, 1.0, 1.0)
    lesion = empty()
    lesion[3:5, 3:5, 3:5] = True

    both = study_segmentation("none", empty(), empty(), spacing)
    assert both.dice is None and both.hausdorff95_mm is None and both.relative_volume_error is None
    assert both.lesions.recall is None and both.lesions.precision is None
    assert both.undefined == {
        "dice": WHY_DICE_EMPTY,
        "hausdorff95_mm": WHY_HD_BOTH_EMPTY,
        "relative_volume_error": WHY_RELATIVE_EMPTY,
        "lesion_recall": WHY_LESION_RECALL,
        "lesion_precision": WHY_LESION_PRECISION,
    }
    assert both.volume_error_ml == 0.0 and both.voxels["tn"] == lesion.size

    missed = study_segmentation("missed", lesion, empty(), spacing)
    assert missed.dice == 0.0 and missed.hausdorff95_mm is None
    assert missed.lesions.recall == 0.0 and missed.lesions.precision is None
    assert missed.undefined == {"hausdorff95_mm": WHY_HD_PRED_EMPTY, "lesion_precision": WHY_LESION_PRECISION}
    assert missed.relative_volume_error == -1.0

    false_alarm = study_segmentation("false alarm", empty(), lesion, spacing)
    assert false_alarm.dice == 0.0 and false_alarm.hausdorff95_mm is None
    assert false_alarm.lesions.precision == 0.0 and false_alarm.lesions.recall is None
    assert false_alarm.undefined == {
        "hausdorff95_mm": WHY_HD_TRUTH_EMPTY,
        "relative_volume_error": WHY_RELATIVE_EMPTY,
        "lesion_recall": WHY_LESION_RECALL,
    }
    assert false_alarm.volume_error_ml == pytest.approx(0.008)
    # The plain functions agree.
    assert dice(empty(), empty()) is None
    assert hausdorff95(lesion, empty(), spacing) is None and hausdorff95(empty(), lesion, spacing) is None


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="same shape|one shape"):
        dice(empty(), empty((12, 24, 25)))
    with pytest.raises(ValueError, match="3D"):
        dice(np.zeros((4, 4), bool), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="spacing"):
        hausdorff95(empty(), empty(), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        volume_ml(empty(), (1.0, 1.0))  # type: ignore[arg-type]


def test_summary_pools_counts_and_says_what_is_undefined() -> None:
    spacing = (1.0, 1.0, 1.0)
    big_truth, big_predicted = cube((2, 2, 2), 10), cube((2, 5, 2), 10)  # Dice 0.7, 1 ml
    small_truth, small_predicted = cube((2, 2, 2), 4), cube((2, 2, 2), 4)  # Dice 1.0, 0.064 ml
    studies = [
        study_segmentation("big", big_truth, big_predicted, spacing),
        study_segmentation("small", small_truth, small_predicted, spacing),
        study_segmentation("clean", empty((20, 30, 30)), empty((20, 30, 30)), spacing),
    ]
    summary = summarise(studies, large_ml=0.5)
    assert summary.studies == 3
    assert summary.dice_mean == pytest.approx(0.85)  # the clean study has no Dice
    assert summary.dice_mean_large == pytest.approx(0.7)
    assert summary.hausdorff95_median_mm is not None
    assert summary.hausdorff95_median_mm == pytest.approx(np.median([studies[0].hausdorff95_mm, 0.0]))
    assert (summary.lesion_recall, summary.lesion_precision) == (1.0, 1.0)
    assert (summary.lesions.true_lesions, summary.lesions.predicted_lesions) == (2, 2)
    assert summary.volume_error_ml_mean_abs == pytest.approx(0.0)  # equal volumes in every study
    assert summary.relative_volume_error_mean_abs == pytest.approx(0.0)
    voxels = 3 * 20 * 30 * 30
    assert summary.voxels == {"tp": 700 + 64, "fp": 300, "fn": 300, "tn": voxels - 1364}
    assert summary.voxel_accuracy == pytest.approx((voxels - 600) / voxels)
    assert summary.voxel_recall == pytest.approx(764 / 1064)
    assert summary.undefined == {}

    # Undefined values name their reason.
    assert "large_ml" in summarise(studies).undefined["dice_mean_large"]
    assert "at least 5 ml" in summarise(studies, large_ml=5.0).undefined["dice_mean_large"]
    nothing = summarise([studies[2]])
    assert nothing.dice_mean is None and nothing.dice_ci95 is None and nothing.hausdorff95_median_mm is None
    assert nothing.lesion_recall is None and nothing.voxel_recall is None
    assert set(nothing.undefined) == {
        "dice_mean",
        "dice_ci95",
        "dice_mean_large",
        "hausdorff95_median_mm",
        "lesion_recall",
        "lesion_precision",
        "relative_volume_error_mean_abs",
        "voxel_recall",
    }
    assert nothing.voxel_accuracy == 1.0
    none_at_all = summarise([])
    assert none_at_all.studies == 0 and none_at_all.volume_error_ml_mean_abs is None
    assert "voxel_accuracy" in none_at_all.undefined


def test_dice_bootstrap_interval_contains_the_mean_and_is_reproducible() -> None:
    rng = np.random.default_rng(3)
    spacing = (1.0, 1.0, 1.0)
    studies = []
    for index in range(12):
        truth = cube((2, 2, 2), 8)
        shift = int(rng.integers(0, 6))
        studies.append(study_segmentation(f"S{index}", truth, cube((2, 2 + shift, 2), 8), spacing))
    summary = summarise(studies)
    assert summary.dice_ci95 is not None and summary.dice_mean is not None
    low, high = summary.dice_ci95
    assert low < summary.dice_mean < high  # the shifts differ, so the interval has width
    assert summarise(studies).dice_ci95 == summary.dice_ci95  # seed 0: the same interval each run
    values = [s.dice for s in studies if s.dice is not None]
    assert bootstrap_mean_ci(values) == summary.dice_ci95
    assert bootstrap_mean_ci(values, seed=1) != summary.dice_ci95
    assert bootstrap_mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert bootstrap_mean_ci([]) is None


def test_triage_scores_are_predicted_volumes_for_the_study_level_metrics() -> None:
    spacing = (1.0, 1.0, 1.0)
    sizes = [(0, 0), (10, 9), (4, 5), (0, 3)]  # (true, predicted) cube sides
    studies = []
    for index, (true_side, predicted_side) in enumerate(sizes):
        truth = cube((1, 1, 1), true_side) if true_side else empty((20, 30, 30))
        predicted = cube((1, 1, 1), predicted_side) if predicted_side else empty((20, 30, 30))
        studies.append(study_segmentation(f"S{index}", truth, predicted, spacing))
    scores = triage_scores(studies)
    assert scores == pytest.approx([0.0, 0.729, 0.125, 0.027])
    labels = np.array([s.truth_ml >= 0.05 for s in studies], dtype=int)  # lesion volume above 0.05 ml
    metrics = compute_metrics(labels, scores, threshold=0.05, bootstrap=0)
    assert (metrics.sensitivity, metrics.specificity, metrics.auc) == (1.0, 1.0, 1.0)
