"""FROC, the hit rule and lesion metrics at a threshold on hand-made cases whose answers are worked out by hand."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from triagenode.inference.froc import (
    FP_RATES,
    HIT_RULE,
    Box,
    Mark,
    TrueLesion,
    froc,
    froc_report,
    hits,
    iou,
    lesion_metrics,
    match,
    write_froc_plot,
)

# Four images: study S1 has views I1 and I2 with lesion 0 boxed on both; study S2 has views I3 (lesion 0) and I4
# (lesion-free). Three lesion-views, two distinct lesions.
ON_I1: Box = (100, 100, 200, 200)
ON_I2: Box = (300, 300, 380, 380)
ON_I3: Box = (50, 50, 90, 90)
LESIONS = [
    TrueLesion("S1", 0, "I1", "mass", ON_I1),
    TrueLesion("S1", 0, "I2", "mass", ON_I2),
    TrueLesion("S2", 0, "I3", "calcification", ON_I3),
]
IMAGES = ["I1", "I2", "I3", "I4"]
STUDY_OF = {"I1": "S1", "I2": "S1", "I3": "S2", "I4": "S2"}
FAR: Box = (600, 600, 650, 650)  # on no lesion


def mark(sop: str, box: Box, certainty: float, kind: str = "mass") -> Mark:
    return Mark(STUDY_OF.get(sop, "S9"), sop, kind, box, certainty)


# Given out of order on purpose; by certainty: hit, FP, duplicate (FP), hit, miss (FP), FP, hit, FP.
MARKS = [
    mark("I2", (320, 320, 360, 360), 0.3),  # finds the lesion on I2
    mark("I1", (110, 110, 190, 190), 0.9),  # finds the lesion on I1
    mark("I4", FAR, 0.8),  # lesion-free image
    mark("I3", (55, 55, 85, 85), 0.6, "mass"),  # finds the calcification on I3 (type need not match)
    mark("I1", (120, 120, 210, 210), 0.7),  # a second mark on the lesion already found on I1
    mark("I2", FAR, 0.5),  # misses
    mark("I3", FAR, 0.4),
    mark("I4", (10, 10, 20, 20), 0.2),
]


def test_froc_curve_and_its_read_outs_by_hand() -> None:
    result = froc(MARKS, LESIONS, images=4)
    assert (result.images, result.lesions) == (4, 3)
    third = 1 / 3
    expected = [
        (math.inf, 0.0, 0.0),
        (0.9, 0.0, third),
        (0.8, 0.25, third),
        (0.7, 0.5, third),
        (0.6, 0.5, 2 * third),
        (0.5, 0.75, 2 * third),
        (0.4, 1.0, 2 * third),
        (0.3, 1.0, 1.0),
        (0.2, 1.25, 1.0),
    ]
    assert len(result.curve) == len(expected)
    for got, want in zip(result.curve, expected, strict=True):
        assert got == pytest.approx(want)
    # At a rate: the lowest threshold whose FP/image is at or under it (0.25 -> threshold 0.8, 0.5 -> 0.6,
    # 1 -> 0.3); the curve ends at 1.25, so 2 and 4 take its last sensitivity.
    assert result.sensitivity_at == pytest.approx({0.25: third, 0.5: 2 * third, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0})
    assert result.mean_sensitivity == pytest.approx((third + 2 * third + 1 + 1 + 1) / 5)
    assert result.undefined == {}


def test_lesion_free_images_dilute_false_positives_per_image() -> None:
    result = froc(MARKS, LESIONS, images=8)  # four more images read, none marked
    assert [point[1] for point in result.curve] == pytest.approx([0, 0, 0.125, 0.25, 0.25, 0.375, 0.5, 0.5, 0.625])
    assert result.sensitivity_at[0.25] == pytest.approx(2 / 3)
    assert result.sensitivity_at[0.5] == pytest.approx(1.0)


def test_froc_refuses_fewer_images_than_the_marks_and_lesions_lie_on() -> None:
    with pytest.raises(ValueError, match="4 distinct images"):
        froc(MARKS, LESIONS, images=3)


def test_report_is_plain_json_with_the_hit_rule() -> None:
    report = froc_report(froc(MARKS, LESIONS, images=4))
    text = json.dumps(report, allow_nan=False)  # no Infinity, no NaN
    back = json.loads(text)
    assert back["hit_rule"] == HIT_RULE and "IoU is at least 0.3" in HIT_RULE and "centre" in HIT_RULE
    assert back["curve"][0] == {"threshold": None, "fp_per_image": 0.0, "sensitivity": 0.0}
    assert back["sensitivity_at"]["0.25"] == pytest.approx(1 / 3)
    assert back["mean_sensitivity"] == pytest.approx(0.8)


LESION_BOX: Box = (0, 0, 10, 10)


@pytest.mark.parametrize(
    ("mark_box", "expected_iou", "hit"),
    [
        ((4, 4, 6, 6), 0.04, True),  # centre inside, IoU small
        ((4, 0, 20, 10), 0.3, True),  # centre (12, 5) outside, IoU exactly 0.3
        ((0, 0, 30, 10), 1 / 3, True),  # centre (15, 5) outside, IoU above 0.3
        ((5, 0, 20, 10), 0.25, False),  # centre (12.5, 5) outside, IoU under 0.3
        ((0, 0, 40, 10), 0.25, False),  # holds the whole lesion, but centre outside and IoU under 0.3
        ((20, 20, 30, 30), 0.0, False),  # elsewhere
        ((4, 0, 16, 2), 12 / 112, True),  # centre (10, 1) on the right edge counts as inside
        ((-6, 8, 6, 10), 12 / 112, True),  # centre (0, 9) on the left edge too
        ((-6, 9, 6, 11), 6 / 118, True),  # centre (0, 10) on the bottom-left corner too
        ((5, 5, 5, 5), 0.0, True),  # a point mark inside the box
    ],
)
def test_hit_rule_both_ways(mark_box: Box, expected_iou: float, hit: bool) -> None:
    assert iou(mark_box, LESION_BOX) == pytest.approx(expected_iou)
    assert iou(LESION_BOX, mark_box) == pytest.approx(expected_iou)
    assert hits(mark_box, LESION_BOX) is hit


def test_iou_of_a_box_with_itself_is_one() -> None:
    assert iou((3, 4, 9, 12), (3, 4, 9, 12)) == pytest.approx(1.0)


def test_a_duplicate_mark_on_a_found_lesion_is_a_false_positive_and_the_most_certain_mark_finds_it() -> None:
    lesion = TrueLesion("S1", 0, "I1", "mass", ON_I1)
    matching = match([mark("I1", ON_I1, 0.3), mark("I1", (105, 105, 195, 195), 0.8)], [lesion])
    assert matching.lesion_scores == {("S1", 0, "I1"): 0.8}
    assert matching.false_positives == [0.3]


def test_a_mark_on_another_image_never_hits() -> None:
    lesion = TrueLesion("S1", 0, "I1", "mass", ON_I1)
    matching = match([mark("I2", ON_I1, 0.9)], [lesion])  # the very box, but on the other view
    assert matching.lesion_scores == {("S1", 0, "I1"): None}
    assert matching.false_positives == [0.9]
    other_study = Mark("S2", "I1", "mass", ON_I1, 0.7)  # same SOP UID under another study: another image
    assert match([other_study], [lesion]).false_positives == [0.7]


def test_marks_of_a_lesion_free_study_are_all_false_positives() -> None:
    clean = [Mark("S3", "I5", "mass", ON_I1, 0.9), Mark("S3", "I6", "calcification", ON_I2, 0.4)]
    matching = match(MARKS + clean, LESIONS)
    alone = match(MARKS, LESIONS)
    assert sorted(matching.false_positives) == sorted(alone.false_positives + [0.9, 0.4])
    assert matching.lesion_scores == alone.lesion_scores
    with_clean = froc(MARKS + clean, LESIONS, images=6)
    assert with_clean.curve[1] == pytest.approx((0.9, 1 / 6, 1 / 3))  # the clean study's 0.9 ties the true mark


def test_each_mark_finds_at_most_one_lesion_the_one_it_overlaps_most() -> None:
    left = TrueLesion("S1", 0, "I1", "mass", (0, 0, 10, 10))
    right = TrueLesion("S1", 1, "I1", "mass", (5, 0, 15, 10))
    first = mark("I1", (0, 0, 10, 10), 0.9)  # hits both; IoU 1 with the left one, 1/3 with the right one
    assert hits(first.box, right.box)
    one = match([first], [right, left])  # the right one listed first: overlap, not order, decides
    assert one.lesion_scores == {("S1", 1, "I1"): None, ("S1", 0, "I1"): 0.9}
    # A second mark that hits both finds the one still unfound, and is no false positive.
    two = match([first, mark("I1", (2, 0, 12, 10), 0.5)], [right, left])
    assert two.lesion_scores == {("S1", 1, "I1"): 0.5, ("S1", 0, "I1"): 0.9}
    assert two.false_positives == []


def test_two_boxes_for_one_lesion_view_are_refused() -> None:
    with pytest.raises(ValueError, match="two boxes"):
        match([], [TrueLesion("S1", 0, "I1", "mass", ON_I1), TrueLesion("S1", 0, "I1", "mass", ON_I2)])


def test_bad_boxes_and_certainties_are_refused() -> None:
    with pytest.raises(ValueError, match="x1 > x0"):
        TrueLesion("S1", 0, "I1", "mass", (10, 0, 10, 5))
    with pytest.raises(ValueError, match="x1 > x0"):
        Mark("S1", "I1", "mass", (10, 0, 5, 5), 0.5)
    with pytest.raises(ValueError, match="not a number"):
        Mark("S1", "I1", "mass", ON_I1, float("nan"))


def test_no_lesions_at_all_gives_none_with_reasons() -> None:
    result = froc([mark("I4", FAR, 0.8)], [], images=4)
    assert result.lesions == 0 and result.curve == []
    assert result.mean_sensitivity is None
    assert result.sensitivity_at == dict.fromkeys(FP_RATES)
    assert "no true lesion" in result.undefined["mean_sensitivity"]
    assert "no true lesion" in result.undefined["sensitivity_at"]
    metrics = lesion_metrics([mark("I4", FAR, 0.8)], [], IMAGES, 0.5)
    assert metrics.recall is None and metrics.lesion_recall_any_view is None
    assert "no true lesion" in metrics.undefined["recall"]
    assert metrics.precision == 0.0 and metrics.f1 == 0.0
    assert metrics.image_level["sensitivity"] is None
    assert "no image holds a lesion" in metrics.image_level["undefined"]["sensitivity"]
    assert metrics.image_level["specificity"] == pytest.approx(3 / 4)


def test_no_marks_leaves_every_lesion_unfound() -> None:
    result = froc([], LESIONS, images=4)
    assert result.curve == [(math.inf, 0.0, 0.0)]
    assert result.sensitivity_at == dict.fromkeys(FP_RATES, 0.0) and result.mean_sensitivity == 0.0
    metrics = lesion_metrics([], LESIONS, IMAGES, 0.5)
    assert metrics.precision is None and "no mark" in metrics.undefined["precision"]
    assert metrics.recall == 0.0 and metrics.f1 == 0.0
    assert (
        metrics.image_level["precision"] is None
        and "no image was marked" in metrics.image_level["undefined"]["precision"]
    )


@pytest.mark.parametrize(
    ("threshold", "counts", "ratios", "image_counts", "image_ratios"),
    # counts: lesions, found, marks, true marks, false marks; ratios: recall, any-view recall, precision, F1,
    # FP/image; image counts: tp, fp, tn, fn; image ratios: accuracy, sensitivity, specificity, precision, F1.
    [
        # Marks >= 0.5: 0.9 finds I1, 0.8 on I4 is false, 0.7 duplicates I1 (false), 0.6 finds I3, 0.5 misses on I2.
        # F1 = 2*2 / (2*2 + 3 false + 1 missed). Images: I1, I2, I3 hold a lesion and a mark (tp), I4 a mark (fp).
        (0.5, (3, 2, 5, 2, 3), (2 / 3, 1.0, 2 / 5, 0.5, 3 / 4), (3, 1, 0, 0), (3 / 4, 1.0, 0.0, 3 / 4, 6 / 7)),
        # Marks >= 0.85: only 0.9, on I1's lesion. One of two lesions found on some view. Images: I1 tp, I2 and I3
        # fn, I4 tn. F1 = 2 / (2 + 0 + 2).
        (0.85, (3, 1, 1, 1, 0), (1 / 3, 1 / 2, 1.0, 0.5, 0.0), (1, 0, 1, 2), (2 / 4, 1 / 3, 1.0, 1.0, 0.5)),
    ],
)
def test_lesion_metrics_at_a_threshold_by_hand(
    threshold: float,
    counts: tuple[int, int, int, int, int],
    ratios: tuple[float, float, float, float, float],
    image_counts: tuple[int, int, int, int],
    image_ratios: tuple[float, float, float, float, float],
) -> None:
    m = lesion_metrics(MARKS, LESIONS, IMAGES, threshold)
    assert m.threshold == threshold
    assert (m.lesions, m.found, m.marks, m.true_marks, m.false_marks) == counts
    got_ratios = (m.recall, m.lesion_recall_any_view, m.precision, m.f1, m.false_positives_per_image)
    assert got_ratios == pytest.approx(ratios)
    image = m.image_level
    assert (image["tp"], image["fp"], image["tn"], image["fn"]) == image_counts
    got = (image["accuracy"], image["sensitivity"], image["specificity"], image["precision"], image["f1"])
    assert got == pytest.approx(image_ratios)
    assert image["undefined"] == {}
    assert "no true-negative lesions" in m.undefined["specificity"]
    assert set(m.undefined) == {"specificity", "accuracy"}


def test_lesion_metrics_agree_with_the_froc_curve_at_every_threshold() -> None:
    result = froc(MARKS, LESIONS, images=4)
    for threshold, fp_per_image, sensitivity in result.curve[1:]:
        m = lesion_metrics(MARKS, LESIONS, IMAGES, threshold)
        assert (m.recall, m.false_positives_per_image) == pytest.approx((sensitivity, fp_per_image))


def test_lesion_metrics_refuses_marks_on_images_not_read() -> None:
    with pytest.raises(ValueError, match="I4"):
        lesion_metrics(MARKS, LESIONS, ["I1", "I2", "I3"], 0.5)


def _reference_froc(marks: list[Mark], lesions: list[TrueLesion], images: int) -> list[tuple[float, float, float]]:
    """A slow, independent FROC: re-match the marks at or above every threshold from scratch, pair by pair."""
    points = [(math.inf, 0.0, 0.0)]
    for threshold in sorted({m.certainty for m in marks}, reverse=True):
        found: set[int] = set()
        false = 0
        used = sorted((m for m in marks if m.certainty >= threshold), key=lambda m: -m.certainty)
        for m in used:
            candidates = [
                (iou(m.box, les.box), i)
                for i, les in enumerate(lesions)
                if i not in found
                and (les.study_uid, les.sop_instance_uid) == (m.study_uid, m.sop_instance_uid)
                and hits(m.box, les.box)
            ]
            if candidates:
                found.add(max(candidates, key=lambda c: (c[0], -c[1]))[1])
            else:
                false += 1
        points.append((threshold, false / images, len(found) / len(lesions)))
    return points


def _random_case(rng: random.Random, images: int, marks_per_image: int) -> tuple[list[Mark], list[TrueLesion]]:
    lesions, marks = [], []
    for image in range(images):
        study, sop = f"S{image // 2}", f"I{image}"
        boxes = []
        for index in range(rng.choice([0, 0, 1, 2])):
            x, y = rng.uniform(0, 900), rng.uniform(0, 900)
            box = (x, y, x + rng.uniform(10, 100), y + rng.uniform(10, 100))
            boxes.append(box)
            lesions.append(TrueLesion(study, index + 10 * (image % 2), sop, "mass", box))
        for _ in range(rng.randint(0, marks_per_image)):
            if boxes and rng.random() < 0.5:
                x0, y0, x1, y1 = rng.choice(boxes)
                dx, dy = rng.uniform(-0.5, 0.5) * (x1 - x0), rng.uniform(-0.5, 0.5) * (y1 - y0)
                box = (x0 + dx, y0 + dy, x1 + dx * rng.uniform(0.5, 2), y1 + dy * rng.uniform(0.5, 2))
            else:
                x, y = rng.uniform(0, 900), rng.uniform(0, 900)
                box = (x, y, x + rng.uniform(5, 100), y + rng.uniform(5, 100))
            marks.append(Mark(study, sop, "mass", box, round(rng.random(), 2)))  # ties on purpose
    return marks, lesions


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_froc_matches_a_slow_reference_on_random_cases(seed: int) -> None:
    marks, lesions = _random_case(random.Random(seed), images=30, marks_per_image=5)
    assert lesions and marks
    result = froc(marks, lesions, images=30)
    reference = _reference_froc(marks, lesions, 30)
    assert len(result.curve) == len(reference)
    for got, want in zip(result.curve, reference, strict=True):
        assert got == pytest.approx(want)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_is_a_png(tmp_path: Path) -> None:
    path = write_froc_plot(tmp_path / "plots" / "froc.png", froc(MARKS, LESIONS, images=4), title="FROC, masses")
    assert path == tmp_path / "plots" / "froc.png"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_plot_without_lesions_is_still_a_png(tmp_path: Path) -> None:
    path = write_froc_plot(tmp_path / "froc.png", froc([], [], images=4))
    assert path.read_bytes()[:8] == PNG_MAGIC
