"""The TID 1500 report of a lesion detector (mammography): the study's triage result and one region per lesion.

One Comprehensive 3D SR (or Comprehensive SR) in the source study, in the
report series the classifier's reports use (:func:`inference.report.report_series_uid`,
series number 9901), built with the same helpers, so identity (content UID),
predecessors, character sets, observer, algorithm and the SEPARATE containers
work as for the CT report (see :mod:`inference.report`). Its measurement
groups:

* **The study** (TID 1501, first, so that a worklist rule reading the first
  group sorts a detector's studies as it sorts a classifier's): finding
  "Lesion" (SCT 52988006) of the "Breast" (SCT 76752008), Present or Absent,
  the highest certainty of any candidate as "Certainty of Finding" (DCM
  111012, unit 1), the operating threshold as "Threshold Value" (DCM 122411),
  and a Comment that says it in words ("Breast lesion: present, 2 lesions
  marked (highest certainty 0.91, at or above the operating threshold 0.5;
  ...)"), or that no lesion reached the threshold.
* **One planar ROI per lesion** (TID 1410), most certain first: the tracking
  identifier ("lesion 1: mammographic breast mass, L CC") and a tracking UID drawn from the study,
  model, image, type and box, so the same mark keeps its UID across re-runs
  and another mark gets another; the finding as the model package codes its
  lesion classes (``detection.classes``: SNOMED CT 129788004 "Mammographic breast
  mass", 129769006 "Calcification Cluster", as CID 6054 has them); the finding
  site, "Left breast"
  (SCT 80248007) or "Right breast" (SCT 73056007) from the image laterality
  ("Breast" when the image does not say); the region as a closed 5-point
  POLYLINE SCOORD of the box's corners in the image's pixel coordinates
  ((0, 0) the top left corner of the top left pixel, as the lesion's box is
  given), on the referenced image; the lesion's "Certainty of Finding" (unit
  1) with the algorithm.

The images that carry lesions (the key image when none) form the image
library (TID 1600), with the descriptors highdicom writes for projection
radiography (matrix, orientation, imager pixel spacing).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from triagenode.inference.model_package import (
    BREAST,
    LEFT_BREAST,
    LESION,
    RIGHT_BREAST,
    CodedConcept,
    Manifest,
)
from triagenode.inference.outcomes import Lesion, StudyResult
from triagenode.inference.report import (
    DocumentOptions,
    _add_comment,
    _against,
    _algorithm,
    _code,
    _document,
    _group,
    _label,
    _number,
    _options_for,
    study_measurements,
)

MAMMOGRAPHY_CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
"""Mammography CAD SR Storage: a predecessor of that class belongs to the other document of a detector
(see :mod:`inference.mammo_cad_sr`), which this one never replaces."""
BREAST_SIDES: dict[str, CodedConcept] = {"L": LEFT_BREAST, "R": RIGHT_BREAST}
"""Image Laterality -> the finding site (CID 6022 "Side")."""


def build_detection_report(
    result: StudyResult, manifest: Manifest, evidence: Sequence[Dataset], options: DocumentOptions
) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR:
    """The TID 1500 SR of a detector's result (see the module docstring).

    ``result.lesions`` are the marks at or above the operating threshold, most certain first (may be
    empty: the study group then says Absent, and its Comment that no lesion reached the threshold);
    ``evidence`` the headers (no pixels needed) of every image the model read. ``options.predecessor``
    is named only when it is not a Mammography CAD SR, which this document never replaces.
    """
    if not evidence:
        raise ValueError("the report needs the headers of the images the model read as evidence")
    options = _options_for(options, MAMMOGRAPHY_CAD_SR, same_class=False)
    images = ordered_images(evidence)
    key = images.get(result.key_instance_uid) or next(iter(images.values()))
    algorithm = _algorithm(manifest)
    study = _group(
        result.study_uid,
        manifest,
        algorithm,
        codes.SCT.Present if result.finding else codes.SCT.Absent,
        measurements=study_measurements(result, algorithm),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(key)],
        finding=LESION,
        finding_site=BREAST,
    )
    _add_comment(study, detection_verdict(manifest, result))
    groups = [study] + [
        lesion_group(number, lesion, result.study_uid, manifest, image_of(lesion, images), algorithm)
        for number, lesion in enumerate(result.lesions, start=1)
    ]
    marked = {lesion.sop_instance_uid for lesion in result.lesions}
    library = [image for uid, image in images.items() if uid in marked] or [key]
    return _document(
        manifest, groups, evidence, [image for image in library if _describable(image)] or None,
        result.study_uid, options, f"AI triage: {_label(LESION, BREAST).lower()} (not for diagnosis)",
    )


def lesion_group(
    number: int,
    lesion: Lesion,
    study_uid: str,
    manifest: Manifest,
    image: Dataset,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """One lesion as a TID 1410 planar ROI group: who it is, what, where (site and region), how certain."""
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier=lesion_label(number, lesion, manifest, image),
            uid=hd.UID(lesion_uid(study_uid, manifest, lesion)),
        ),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=box_outline(lesion.box),
            source_image=hd.sr.SourceImageForRegion.from_source_image(image),
        ),
        finding_type=_code(lesion_code(manifest, lesion)),
        finding_sites=[hd.sr.FindingSite(_code(breast_side(lesion, image)))],
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.CertaintyOfFinding,
                value=lesion.certainty,
                unit=codes.UCUM.NoUnits,
                algorithm_id=algorithm,
            )
        ],
    )


def detection_verdict(manifest: Manifest, result: StudyResult) -> str:
    """The detector's result in words, as the classifier's :func:`inference.report._verdict` gives its own.

    "Breast lesion: present, 2 lesions marked (highest certainty 0.91, at or above the operating
    threshold 0.5; model ...; not for diagnosis)", or "...: absent, no lesion reached the operating
    threshold (highest certainty 0.31, below ...)". Plain ASCII, numbers as the NUM items carry them.
    """
    certainty, threshold = _against(result.probability, result.threshold)
    count = len(result.lesions)
    marked = f"{count} lesion{'s' if count != 1 else ''} marked" if count else "no lesion reached the threshold"
    return (
        f"{_label(LESION, BREAST)}: {'present' if result.finding else 'absent'}, {marked} (highest certainty "
        f"{certainty}, {'at or above' if result.finding else 'below'} the operating threshold {threshold}; "
        f"model {manifest.name} {manifest.version}; not for diagnosis)"
    )


def ordered_images(evidence: Sequence[Dataset]) -> dict[str, Dataset]:
    """The images read, by SOP Instance UID, in a fixed order (series, then instance UID): the order files
    arrived in is no part of a document's content."""
    ordered = sorted(evidence, key=lambda ds: (str(ds.get("SeriesInstanceUID", "")), str(ds.SOPInstanceUID)))
    return {str(ds.SOPInstanceUID): ds for ds in ordered}


def image_of(lesion: Lesion, images: dict[str, Dataset]) -> Dataset:
    """The header of the image a lesion was marked on; a report cannot point at an image it was not given."""
    try:
        return images[lesion.sop_instance_uid]
    except KeyError:
        raise ValueError(
            f"lesion on image {lesion.sop_instance_uid}, which is not among the images read (the evidence)"
        ) from None


def lesion_code(manifest: Manifest, lesion: Lesion) -> CodedConcept:
    """The finding a lesion's type stands for, as the model package codes it (``detection.classes``)."""
    if manifest.detection is None:
        raise ValueError(f"model {manifest.name} is not a detection model: it has no lesion classes")
    try:
        return manifest.detection.code_of(lesion.type)
    except KeyError:
        known = ", ".join(c.name for c in manifest.detection.classes)
        raise ValueError(f"lesion type {lesion.type!r} is not one of model {manifest.name}'s ({known})") from None


def laterality_of(lesion: Lesion, image: Dataset) -> str:
    """"L", "R" or "": the lesion's, else the image's Image Laterality (or Laterality)."""
    return lesion.laterality or str(image.get("ImageLaterality", "") or image.get("Laterality", "") or "")


def view_of(lesion: Lesion, image: Dataset) -> str:
    """"CC", "MLO", ... or "": the lesion's, else the image's View Position."""
    return lesion.view or str(image.get("ViewPosition", "") or "")


def breast_side(lesion: Lesion, image: Dataset) -> CodedConcept:
    """The finding site: Left or Right breast by laterality, Breast when the image does not say."""
    return BREAST_SIDES.get(laterality_of(lesion, image).upper(), BREAST)


def lesion_label(number: int, lesion: Lesion, manifest: Manifest, image: Dataset) -> str:
    """"lesion 1: mammographic breast mass, L CC": the tracking identifier; a reader names the mark and its view."""
    where = " ".join(part for part in (laterality_of(lesion, image), view_of(lesion, image)) if part)
    kind = lesion_code(manifest, lesion).meaning.lower()
    return f"lesion {number}: {kind}" + (f", {where}" if where else "")


def lesion_words(number: int, lesion: Lesion, manifest: Manifest, image: Dataset) -> str:
    """"lesion 1: mammographic breast mass, L CC, certainty 0.91": the mark, its view and its certainty."""
    return f"{lesion_label(number, lesion, manifest, image)}, certainty {_number(lesion.certainty)}"


def lesion_uid(study_uid: str, manifest: Manifest, lesion: Lesion) -> str:
    """The lesion's tracking UID: the same study, model, image, type and box give the same UID."""
    sources = ["triagenode-lesion", study_uid, manifest.name, lesion.sop_instance_uid, lesion.type]
    return str(generate_uid(entropy_srcs=sources + [repr(float(value)) for value in lesion.box]))


def box_outline(box: tuple[float, float, float, float]) -> np.ndarray:
    """The box (x0, y0, x1, y1) as a closed POLYLINE: its four corners clockwise from the top left, and the
    first again (PS3.3 C.18.6.1.2: a closed polyline repeats its first point)."""
    x0, y0, x1, y1 = (float(value) for value in box)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def _describable(image: Dataset) -> bool:
    """Whether highdicom can describe the image in the image library (TID 1603 needs the orientation and the
    imager pixel spacing of a projection image); an image without them is left out of the library only."""
    orientation = image.get("PatientOrientation")
    return orientation is not None and len(orientation) == 2 and "ImagerPixelSpacing" in image


__all__ = [
    "MAMMOGRAPHY_CAD_SR",
    "box_outline",
    "build_detection_report",
    "detection_verdict",
    "lesion_label",
    "lesion_uid",
]
