"""How well a lesion detector (screening mammography CAD) finds lesions: FROC, lesion and image metrics.

A study-level ROC says whether a detector calls the right *studies*; it does not
say whether the marks it draws are on the lesions. Breast-imaging CAD is judged
by the free-response ROC (FROC): lesion sensitivity (lesions found / lesions)
against the number of false marks per image, as the threshold on the marks'
certainty is lowered. A reader tolerates a few false marks per image, so the
curve is read at 0.25, 0.5, 1, 2 and 4 false positives per image
(:data:`FP_RATES`) and summarised by the mean sensitivity over those rates.

Counting needs a written hit rule (:data:`HIT_RULE`, also written into
``metrics.json``): a mark hits a true lesion on the same image when the mark's
centre lies inside the true box (edges included) or their IoU is at least 0.3.
The centre rule keeps a small, well-placed mark on a large mass a hit; the IoU
rule keeps a mark slightly larger than a calcification cluster a hit. Lesion
type need not match (this is localisation, not classification). Scoring is
JAFROC-style: marks are matched most certain first, each mark finds at most one
lesion, a lesion is found once (by its most certain hitting mark) and every other
mark, duplicates on a found lesion included, is a false positive (a non-lesion
localisation). Counting duplicates as true would let a detector raise its
sensitivity by stacking marks; counting them as false punishes exactly that.

Because matching goes most certain first, the matching of the marks at or above a
threshold is the full matching restricted to them, so one matching gives the whole
curve (:func:`froc`) and agrees with :func:`lesion_metrics` at every threshold.

A lesion is counted once per image it is boxed on (a *lesion-view*: the same
lesion on CC and MLO is two); :func:`lesion_metrics` also gives the share of
lesions found on at least one of their views, what a radiologist recalling the
woman needs. Per-type FROC (masses, calcifications) is :func:`froc` on the marks
and lesions of one type.

As in :mod:`triagenode.inference.metrics`, a value whose denominator is empty is
``None`` with a reason in ``undefined``, never NaN.
"""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from triagenode.inference.metrics import _ratio, confusion_at

Box = tuple[float, float, float, float]
"""x0, y0, x1, y1 in pixels (x = column, y = row), x1 > x0, y1 > y0."""

IOU_HIT = 0.3
FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0)
HIT_RULE = (
    "A mark hits a true lesion on the same image when the mark's centre lies inside the true box (edges included) "
    f"or their IoU is at least {IOU_HIT:g}; the lesion type is not required to match (localisation). Each mark hits "
    "at most one lesion (the not yet found lesion it overlaps most); marks are matched most certain first; a lesion "
    "is found once, by its most certain hitting mark; every other mark, duplicates on a found lesion included, is a "
    "false positive (non-lesion localisation), as in JAFROC scoring. Lesions are counted per image (lesion-views)."
)

_EPS = 1e-9  # for comparisons of ratios that are equal in exact arithmetic (IoU 0.3, FP per image 0.25)


def _check_box(box: Box, what: str, *, allow_empty: bool) -> None:
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ValueError(f"{what}: a box is four finite numbers x0, y0, x1, y1, not {box!r}")
    x0, y0, x1, y1 = box
    if allow_empty and (x1 < x0 or y1 < y0) or not allow_empty and (x1 <= x0 or y1 <= y0):
        raise ValueError(f"{what}: box {box!r} needs x1 > x0 and y1 > y0")


@dataclass(frozen=True)
class TrueLesion:
    """One lesion as boxed on one image (a lesion-view)."""

    study_uid: str
    lesion: int  # the lesion's index within its study: the same lesion on two views has the same index
    sop_instance_uid: str  # the image (view) this box is on
    type: str  # "mass" or "calcification"
    box: Box

    def __post_init__(self) -> None:
        _check_box(self.box, f"lesion {self.lesion} of study {self.study_uid}", allow_empty=False)


@dataclass(frozen=True)
class Mark:
    """One mark a detector put on one image, with its certainty (higher is surer).

    A mark's box may be empty (a point mark, x1 == x0): its centre can still hit.
    """

    study_uid: str
    sop_instance_uid: str
    type: str
    box: Box
    certainty: float

    def __post_init__(self) -> None:
        _check_box(self.box, f"mark on image {self.sop_instance_uid}", allow_empty=True)
        if not math.isfinite(self.certainty):
            raise ValueError(f"mark on image {self.sop_instance_uid}: certainty {self.certainty!r} is not a number")


def _boxes(boxes: Sequence[Box]) -> np.ndarray:
    return np.asarray(boxes, dtype=float).reshape(-1, 4)


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n, 4) with every box of ``b`` (m, 4): (n, m); 0 where the union is empty."""
    width = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    height = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = width * height
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _hit_matrix(marks: np.ndarray, lesions: np.ndarray, ious: np.ndarray) -> np.ndarray:
    """Which mark (rows) hits which lesion (columns) by :data:`HIT_RULE`."""
    cx = (marks[:, 0] + marks[:, 2]) / 2
    cy = (marks[:, 1] + marks[:, 3]) / 2
    inside = (
        (cx[:, None] >= lesions[None, :, 0])
        & (cx[:, None] <= lesions[None, :, 2])
        & (cy[:, None] >= lesions[None, :, 1])
        & (cy[:, None] <= lesions[None, :, 3])
    )
    return inside | (ious >= IOU_HIT - _EPS)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when they do not overlap)."""
    return float(_iou_matrix(_boxes([a]), _boxes([b]))[0, 0])


def hits(mark_box: Box, lesion_box: Box) -> bool:
    """Whether a mark's box hits a true lesion's box on the same image (:data:`HIT_RULE`)."""
    m, les = _boxes([mark_box]), _boxes([lesion_box])
    return bool(_hit_matrix(m, les, _iou_matrix(m, les))[0, 0])


LesionKey = tuple[str, int, str]
"""(study UID, lesion index, SOP Instance UID): one lesion-view."""


@dataclass
class Matching:
    """Marks matched to lesions image by image (:data:`HIT_RULE`)."""

    # The certainty of the mark that found each lesion-view, None if it was never found.
    lesion_scores: dict[LesionKey, float | None]
    false_positives: list[float]  # certainties of every mark that is a false positive


def match(marks: Sequence[Mark], lesions: Sequence[TrueLesion]) -> Matching:
    """Match marks to the lesions on their own image, most certain first (:data:`HIT_RULE`).

    Marks of equal certainty keep their given order. Two boxes of one lesion on one
    image (the same key) are refused: a lesion-view is one box.
    """
    lesion_scores: dict[LesionKey, float | None] = {}
    lesions_on: dict[tuple[str, str], list[TrueLesion]] = defaultdict(list)
    for lesion in lesions:
        key = (lesion.study_uid, lesion.lesion, lesion.sop_instance_uid)
        if key in lesion_scores:
            raise ValueError(
                f"lesion {lesion.lesion} of study {lesion.study_uid} has two boxes on image {lesion.sop_instance_uid}; "
                "give each lesion one box per image (or two lesion indices)"
            )
        lesion_scores[key] = None
        lesions_on[(lesion.study_uid, lesion.sop_instance_uid)].append(lesion)
    marks_on: dict[tuple[str, str], list[Mark]] = defaultdict(list)
    for mark in marks:
        marks_on[(mark.study_uid, mark.sop_instance_uid)].append(mark)

    false_positives: list[float] = []
    for image, image_marks in marks_on.items():
        image_lesions = lesions_on.get(image)
        if not image_lesions:
            false_positives.extend(m.certainty for m in image_marks)
            continue
        certainty = np.array([m.certainty for m in image_marks], dtype=float)
        order = np.argsort(-certainty, kind="stable")
        certainty = certainty[order]
        mark_boxes = _boxes([m.box for m in image_marks])[order]
        lesion_boxes = _boxes([les.box for les in image_lesions])
        ious = _iou_matrix(mark_boxes, lesion_boxes)
        hit = _hit_matrix(mark_boxes, lesion_boxes, ious)
        found = np.zeros(len(image_lesions), dtype=bool)
        is_false = ~hit.any(axis=1)
        # Only the marks that hit something need the sequential (greedy) pass.
        for row in np.flatnonzero(~is_false):
            candidates = hit[row] & ~found
            if not candidates.any():
                is_false[row] = True  # a duplicate on lesions already found
                continue
            column = int(np.argmax(np.where(candidates, ious[row], -1.0)))
            found[column] = True
            lesion = image_lesions[column]
            lesion_scores[(lesion.study_uid, lesion.lesion, lesion.sop_instance_uid)] = float(certainty[row])
        false_positives.extend(certainty[is_false].tolist())
    return Matching(lesion_scores=lesion_scores, false_positives=false_positives)


def _distinct_images(marks: Sequence[Mark], lesions: Sequence[TrueLesion]) -> set[tuple[str, str]]:
    return {(m.study_uid, m.sop_instance_uid) for m in marks} | {(x.study_uid, x.sop_instance_uid) for x in lesions}


@dataclass
class Froc:
    """The FROC curve and its read-outs at :data:`FP_RATES`."""

    images: int
    lesions: int  # lesion-views (one per lesion per image)
    # (threshold, false positives per image, lesion sensitivity), threshold descending; the first point is
    # (inf, 0, 0): nothing called. Empty with no lesion (see ``undefined``).
    curve: list[tuple[float, float, float]]
    sensitivity_at: dict[float, float | None]  # FP rate -> sensitivity (None with no lesions)
    mean_sensitivity: float | None  # mean over FP_RATES (None with no lesions)
    undefined: dict[str, str] = field(default_factory=dict)


def froc(marks: Sequence[Mark], lesions: Sequence[TrueLesion], images: int) -> Froc:
    """Lesion sensitivity against false positives per image, over every threshold on the marks' certainty.

    ``images`` is how many images were read: lesion-free images count as places
    for false positives. Sensitivity at a rate is that of the lowest threshold
    whose false positives per image stay at or under the rate (the most marks the
    budget allows); where the curve ends before a rate (fewer false positives than
    the rate even with every mark), it is the curve's last sensitivity.
    """
    distinct = len(_distinct_images(marks, lesions))
    if images < distinct:
        raise ValueError(f"images={images}, but the marks and lesions lie on {distinct} distinct images")
    matching = match(marks, lesions)
    n_lesions = len(matching.lesion_scores)
    undefined: dict[str, str] = {}
    none_at: dict[float, float | None] = dict.fromkeys(FP_RATES)
    if n_lesions == 0:
        why = "no true lesion in the data: lesion sensitivity has no denominator"
        undefined.update(curve=why, sensitivity_at=why, mean_sensitivity=why)
        return Froc(images, 0, [], none_at, None, undefined)

    found = np.sort(np.array([s for s in matching.lesion_scores.values() if s is not None], dtype=float))
    false = np.sort(np.array(matching.false_positives, dtype=float))
    thresholds = np.unique(np.concatenate([found, false]))[::-1]
    # Counts at or above each threshold, from the ascending sorts.
    true_counts = len(found) - np.searchsorted(found, thresholds, side="left")
    false_counts = len(false) - np.searchsorted(false, thresholds, side="left")
    thresholds = np.concatenate([[np.inf], thresholds])
    true_counts = np.concatenate([[0], true_counts])
    false_counts = np.concatenate([[0], false_counts])
    fp_per_image = false_counts / images
    sensitivity = true_counts / n_lesions
    curve = [(float(t), float(f), float(s)) for t, f, s in zip(thresholds, fp_per_image, sensitivity, strict=True)]
    # The last point whose false positive count is within the rate's budget (counts rise as the threshold falls).
    last = np.searchsorted(false_counts, np.array(FP_RATES) * images + _EPS, side="right") - 1
    sensitivity_at: dict[float, float | None] = {
        rate: float(sensitivity[index]) for rate, index in zip(FP_RATES, last, strict=True)
    }
    mean = float(np.mean([sensitivity[index] for index in last]))
    return Froc(images, n_lesions, curve, sensitivity_at, mean, undefined)


def froc_report(result: Froc) -> dict[str, Any]:
    """The FROC as plain JSON (``metrics.json``): the hit rule with it, the first point's threshold as None (inf)."""
    return {
        "hit_rule": HIT_RULE,
        "images": result.images,
        "lesions": result.lesions,
        "sensitivity_at": {f"{rate:g}": value for rate, value in result.sensitivity_at.items()},
        "mean_sensitivity": result.mean_sensitivity,
        "curve": [
            {"threshold": None if math.isinf(t) else t, "fp_per_image": f, "sensitivity": s} for t, f, s in result.curve
        ],
        "undefined": dict(result.undefined),
    }


@dataclass
class LesionMetrics:
    """Lesion and image metrics at one operating threshold (marks below it ignored)."""

    threshold: float
    lesions: int  # lesion-views
    found: int  # lesion-views found
    marks: int  # marks at or above the threshold
    true_marks: int  # marks that found a lesion-view (= found)
    false_marks: int  # every other mark
    recall: float | None  # found / lesions (lesion-view level)
    lesion_recall_any_view: float | None  # lesions found on at least one view / distinct (study, lesion)
    precision: float | None  # true_marks / marks
    f1: float | None
    false_positives_per_image: float | None
    # Each image as a case: positive if it holds a lesion, called positive if it holds a mark at or above the
    # threshold: tp, fp, tn, fn, accuracy, sensitivity, specificity, precision, f1, and "undefined" (name -> reason).
    image_level: dict[str, Any]
    undefined: dict[str, str] = field(default_factory=dict)


def lesion_metrics(
    marks: Sequence[Mark], lesions: Sequence[TrueLesion], images: Sequence[str], threshold: float
) -> LesionMetrics:
    """Recall, precision, F1 and false positives per image of the marks at or above ``threshold``.

    ``images`` are the SOP Instance UIDs of every image read: the image-level
    confusion counts the unmarked lesion-free ones as true negatives.
    """
    read = list(dict.fromkeys(images))
    elsewhere = {sop for _, sop in _distinct_images(marks, lesions)} - set(read)
    if elsewhere:
        raise ValueError(f"marks or lesions lie on images not in `images`: {sorted(elsewhere)[:5]}")
    undefined: dict[str, str] = {
        "specificity": "undefined per lesion: detection has no true-negative lesions (see image_level specificity)",
        "accuracy": "undefined per lesion: detection has no true-negative lesions (see image_level accuracy)",
    }

    def defined(name: str, numerator: int, denominator: int, why_not: str, into: dict[str, str]) -> float | None:
        value = _ratio(numerator, denominator)
        if value is None:
            into[name] = why_not
        return value

    used = [m for m in marks if m.certainty >= threshold]
    matching = match(used, lesions)
    n_lesions = len(matching.lesion_scores)
    found_keys = [key for key, score in matching.lesion_scores.items() if score is not None]
    found = len(found_keys)
    false_marks = len(matching.false_positives)
    distinct = {(study, lesion) for study, lesion, _ in matching.lesion_scores}
    found_any = {(study, lesion) for study, lesion, _ in found_keys}

    no_lesion = "no true lesion in the data"
    recall = defined("recall", found, n_lesions, no_lesion, undefined)
    any_view = defined("lesion_recall_any_view", len(found_any), len(distinct), no_lesion, undefined)
    precision = defined("precision", found, len(used), "no mark at or above the threshold", undefined)
    f1 = defined(
        "f1", 2 * found, 2 * found + false_marks + (n_lesions - found), "no true lesion and no mark", undefined
    )
    per_image = defined("false_positives_per_image", false_marks, len(read), "no image was read", undefined)

    # Image level: an image's score is its most certain mark (-inf when unmarked).
    index = {sop: i for i, sop in enumerate(read)}
    labels = np.zeros(len(read), dtype=int)
    labels[[index[les.sop_instance_uid] for les in lesions]] = 1
    scores = np.full(len(read), -np.inf)
    if used:
        np.maximum.at(scores, [index[m.sop_instance_uid] for m in used], [m.certainty for m in used])
    c = confusion_at(labels, scores, threshold)
    image_undefined: dict[str, str] = {}
    image_level: dict[str, Any] = {
        "images": len(read),
        "tp": c.tp,
        "fp": c.fp,
        "tn": c.tn,
        "fn": c.fn,
        "accuracy": defined("accuracy", c.tp + c.tn, len(read), "no image was read", image_undefined),
        "sensitivity": defined("sensitivity", c.tp, c.tp + c.fn, "no image holds a lesion", image_undefined),
        "specificity": defined("specificity", c.tn, c.tn + c.fp, "every image holds a lesion", image_undefined),
        "precision": defined("precision", c.tp, c.tp + c.fp, "no image was marked", image_undefined),
        "f1": defined("f1", 2 * c.tp, 2 * c.tp + c.fp + c.fn, "no lesion and no mark on any image", image_undefined),
        "undefined": image_undefined,
    }
    return LesionMetrics(
        threshold=threshold,
        lesions=n_lesions,
        found=found,
        marks=len(used),
        true_marks=found,
        false_marks=false_marks,
        recall=recall,
        lesion_recall_any_view=any_view,
        precision=precision,
        f1=f1,
        false_positives_per_image=per_image,
        image_level=image_level,
        undefined=undefined,
    )


def write_froc_plot(path: Path, result: Froc, title: str = "FROC") -> Path:
    """The FROC curve as a PNG (no display needed): lesion sensitivity against false positives per image.

    Log x axis from 0.1 to 8 (the rates 0.25 to 4 evenly spaced); a step curve
    (sensitivity at a rate is that of the last point within it), a dotted run on
    where the curve ends before 8 (every mark used), dots at :data:`FP_RATES` and
    their mean in the legend. Without lesions, the plot says why.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    left, right = 0.1, 8.0
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=120)
    ax.set_xscale("log")
    if result.mean_sensitivity is None or not result.curve:
        reason = result.undefined.get("mean_sensitivity") or result.undefined.get("curve", "undefined")
        text = "FROC undefined:\n" + textwrap.fill(reason, 40)
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, transform=ax.transAxes)
    else:
        # Points at 0 false positives sit on the left edge (a log axis has no 0).
        fp = np.clip([point[1] for point in result.curve], left, None)
        sensitivity = np.array([point[2] for point in result.curve])
        ax.step(fp, sensitivity, where="post", lw=2, label=f"{result.lesions} lesion-views, {result.images} images")
        if fp[-1] < right:
            ax.plot([fp[-1], right], [sensitivity[-1]] * 2, ls=":", color="C0", lw=1.5, label="every mark used")
        rates = [rate for rate, value in result.sensitivity_at.items() if value is not None]
        ax.plot(
            rates,
            [result.sensitivity_at[rate] for rate in rates],
            "o",
            color="C3",
            label=f"mean sensitivity at {', '.join(f'{r:g}' for r in FP_RATES)}: {result.mean_sensitivity:.3f}",
        )
        ax.legend(loc="lower right", fontsize=7)
    ax.set_xlim(left, right)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(list(FP_RATES), [f"{rate:g}" for rate in FP_RATES])
    ax.minorticks_off()
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
