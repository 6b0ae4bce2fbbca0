"""A lesion segmenter's documents: a DICOM Segmentation of the mask and the TID 1500 SR that measures it.

**The SEG** (Segmentation Storage, BINARY): the result's label map
(``result.mask.labels``, slices in the order of ``result.mask.source_headers``,
the FLAIR series) as one segment per lesion class of the model package
(``segmentation.classes``; segment i + 1 is class i), each with its segmented
property category SCT 49755003 "Morphologically Abnormal Structure" and the
class's code as type (SCT 52988006 "Lesion"), algorithm type AUTOMATIC and the
model (name, version, family AI) as its algorithm. Every frame is kept
(``omit_empty_frames=False``), so an empty mask (a negative study) is a valid
SEG too, of all-zero frames. It lies in a series of its own (number 9903,
"AI segmentation: lesion (not for diagnosis)", with the ``[[models]]`` entry's
name inserted as the SR's is), whose UID is the report series' with
``kind="seg"``. Its SOP Instance UID is a digest of what it holds (the mask's
bytes, the classes, the model and version, the source images' UIDs, the series,
the node), so a re-run of the same result gives the same SEG and another mask
another. Nothing in it carries highdicom's current time: the content, series
and instance creation date and time are ``options.now``, and so is highdicom's
own Contribution DateTime; the Dimension Organization UID comes from the SOP
Instance UID.

**The SR** (TID 1500, Comprehensive 3D SR or Comprehensive SR, series 9901 as
the node's other TID 1500s, built with :mod:`inference.report`'s helpers, so
identity, predecessors, observer and character sets work as for them):

* **The study** (TID 1501, first, so a worklist rule sorts a segmenter's
  studies as any other): finding "Lesion" of the "Brain" (SCT 12738006),
  Present or Absent as the outlined volume reaches the manifest's
  ``volume_threshold_ml`` (``result.finding``), the model's highest lesion
  probability as "Certainty of Finding" (unit 1), the volume threshold as
  "Threshold Value" (unit ml), and a Comment that says it in words ("Brain
  lesion: present, 12.3 ml outlined (threshold 1 ml; model ...; not for
  diagnosis)").
* **One volumetric ROI per segment** (TID 1411): tracking identifier
  ("segment 1: lesion") and a tracking UID drawn from the SEG and the segment;
  the SEG's segment as the referenced segment; the class's code as finding
  type, the brain as site; "Volume" (SCT 118565006) in ml (UCUM ``ml``); the
  segment's mean probability as "Certainty of Finding".

Its evidence: the FLAIR headers and the SEG.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM

from triagenode.inference.model_package import LESION, CodedConcept, Manifest, SegmentationSpec
from triagenode.inference.outcomes import Segment, StudyResult
from triagenode.inference.report import (
    MANUFACTURER,
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
    _routed,
    report_series_uid,
)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
"""Segmentation Storage: the SEG's class; a predecessor of that class is never the SR's."""
SEG_SERIES_NUMBER = 9903
BRAIN = CodedConcept("12738006", "SCT", "Brain")
VOLUME = codes.SCT.Volume  # (118565006, SCT, "Volume")
MILLILITER = Code("ml", "UCUM", "milliliter")


def build_segmentation(result: StudyResult, manifest: Manifest, options: DocumentOptions) -> hd.seg.Segmentation:
    """The BINARY SEG of a segmenter's result on its reference (FLAIR) series (see the module docstring)."""
    spec = _spec(manifest)
    mask = result.mask
    if mask is None:
        raise ValueError(f"the result of study {result.study_uid} carries no mask: there is nothing to segment")
    labels = np.asarray(mask.labels)
    sources = list(mask.source_headers)
    if labels.ndim != 3 or labels.shape[0] != len(sources):
        raise ValueError(f"a mask of shape {labels.shape} for {len(sources)} source images")
    if int(labels.max(initial=0)) > len(spec.classes):
        raise ValueError(f"label {int(labels.max())} in the mask, but model {manifest.name} has "
                         f"{len(spec.classes)} class(es)")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=manifest.name, version=manifest.version, family=codes.cid7162.ArtificialIntelligence
    )
    series_uid = report_series_uid(result.study_uid, manifest.name, manifest.version, options.route, kind="seg")
    uid = segmentation_uid(labels, manifest, sources, series_uid, options.node_ae_title)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=lesion_class.name[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=_code(lesion_class.code),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=segment_tracking_uid(uid, number),
            tracking_id=f"segment {number}: {lesion_class.name}"[:64],
        )
        for number, lesion_class in enumerate(spec.classes, start=1)
    ]
    # One plane per segment (frames, rows, columns, segments): explicit, and valid when a class is empty.
    planes = np.stack([labels == number for number in range(1, len(spec.classes) + 1)], axis=-1)
    now = options.now or datetime.now()
    description = _routed(
        f"AI segmentation: {', '.join(c.name for c in spec.classes)} (not for diagnosis)", options.route
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=planes,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=manifest.name[:64],
        software_versions=manifest.version,
        device_serial_number=options.node_ae_title[:64],
        omit_empty_frames=False,
        content_label="AI_SEGMENTATION",
        content_description=f"{manifest.name} {manifest.version} (not for diagnosis)"[:64],
        series_description=description[:64],
    )
    _fix_times(seg, now, uid)
    return seg


def build_volumetric_report(
    result: StudyResult, manifest: Manifest, seg: Dataset, options: DocumentOptions
) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR:
    """The TID 1500 SR of a segmenter's result, measuring the segments of ``seg`` (see the module docstring).

    ``options.predecessor`` is named only when it is not a SEG, which this document never replaces.
    """
    spec = _spec(manifest)
    if result.mask is None or not result.mask.source_headers:
        raise ValueError("the report needs the segmented series' headers as evidence")
    if str(seg.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        raise ValueError(f"not a Segmentation: SOP Class UID {seg.get('SOPClassUID', 'missing')}")
    options = _options_for(options, SEGMENTATION_STORAGE, same_class=False)
    sources = list(result.mask.source_headers)
    key = next((ds for ds in sources if str(ds.SOPInstanceUID) == result.key_instance_uid), sources[len(sources) // 2])
    algorithm = _algorithm(manifest)
    study = _group(
        result.study_uid,
        manifest,
        algorithm,
        codes.SCT.Present if result.finding else codes.SCT.Absent,
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.CertaintyOfFinding, value=result.probability, unit=codes.UCUM.NoUnits,
                algorithm_id=algorithm,
            ),
            hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=spec.volume_threshold_ml, unit=MILLILITER),
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(key)],
        finding=LESION,
        finding_site=BRAIN,
    )
    _add_comment(study, segmentation_verdict(manifest, result))
    segments = {segment.label: segment for segment in result.segments}
    groups = [study] + [
        segment_group(number, lesion_class.name, lesion_class.code, segments.get(lesion_class.name), seg, algorithm)
        for number, lesion_class in enumerate(spec.classes, start=1)
    ]
    return _document(
        manifest, groups, [*sources, seg], None, result.study_uid, options,
        f"AI triage: {_label(LESION, BRAIN).lower()} (not for diagnosis)",
    )


def segment_group(
    number: int,
    name: str,
    code: CodedConcept,
    segment: Segment | None,
    seg: Dataset,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """One segment of the SEG as a TID 1411 volumetric ROI group: which segment, what, where, how much."""
    volume_ml = segment.volume_ml if segment is not None else 0.0
    measurements = [hd.sr.Measurement(name=VOLUME, value=volume_ml, unit=MILLILITER, algorithm_id=algorithm)]
    if segment is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.DCM.CertaintyOfFinding, value=segment.certainty, unit=codes.UCUM.NoUnits,
                algorithm_id=algorithm,
            )
        )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier=f"segment {number}: {name}"[:64],
            uid=hd.UID(segment_tracking_uid(str(seg.SOPInstanceUID), number)),
        ),
        referenced_segment=referenced_segment(seg, number),
        finding_type=_code(code),
        finding_sites=[hd.sr.FindingSite(_code(BRAIN))],
        algorithm_id=algorithm,
        measurements=measurements,
    )


def referenced_segment(seg: Dataset, number: int) -> hd.sr.ReferencedSegment:
    """The SEG's segment ``number`` with the images it was drawn on (the SEG's Referenced Series Sequence).

    highdicom's ``ReferencedSegment.from_segmentation`` looks for the segment in each frame's functional
    groups, where highdicom itself does not put it for a SEG of one segment (it is shared), so the
    reference is made here from the same SEG data set.
    """
    if not any(int(item.SegmentNumber) == number for item in seg.SegmentSequence):
        raise ValueError(f"the SEG {seg.SOPInstanceUID} has no segment {number}")
    sources = [
        hd.sr.SourceImageForSegmentation(str(ref.ReferencedSOPClassUID), str(ref.ReferencedSOPInstanceUID))
        for series in seg.get("ReferencedSeriesSequence", [])
        for ref in series.get("ReferencedInstanceSequence", [])
    ]
    if not sources:
        raise ValueError(f"the SEG {seg.SOPInstanceUID} names no source images")
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=number,
        source_images=sources,
    )


def segmentation_verdict(manifest: Manifest, result: StudyResult) -> str:
    """"Brain lesion: present, 12.3 ml outlined (threshold 1 ml; model ...; not for diagnosis)": plain ASCII."""
    spec = _spec(manifest)
    total = sum(segment.volume_ml for segment in result.segments)
    outlined, threshold = _millilitres(total), _millilitres(spec.volume_threshold_ml)
    if outlined == threshold and total != spec.volume_threshold_ml:
        outlined, threshold = _against(total, spec.volume_threshold_ml)
    relation = "at or above" if result.finding else "below"
    return (
        f"{_label(LESION, BRAIN)}: {'present' if result.finding else 'absent'}, {outlined} ml outlined "
        f"({relation} the threshold {threshold} ml; highest probability {_number(result.probability)}; "
        f"model {manifest.name} {manifest.version}; not for diagnosis)"
    )


def segmentation_uid(
    labels: np.ndarray, manifest: Manifest, sources: list[Dataset], series_uid: str, node_ae_title: str
) -> str:
    """The SEG's SOP Instance UID: a digest of the mask, its classes, the model, the source images, its series
    and the node; the same result gives the same UID, another mask another."""
    spec = _spec(manifest)
    digest = hashlib.sha256()
    digest.update(repr(labels.shape).encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    parts = [manifest.name, manifest.version, series_uid, node_ae_title]
    parts += [f"{c.name}={c.code.scheme}:{c.code.value}" for c in spec.classes]
    parts += [str(ds.SOPInstanceUID) for ds in sources]
    digest.update("\x00".join(parts).encode())
    return str(generate_uid(entropy_srcs=["triagenode-seg", digest.hexdigest()]))


def segment_tracking_uid(seg_uid: str, number: int) -> str:
    """A segment's tracking UID: the SEG's and the segment's number, the same in the SEG and the SR."""
    return str(generate_uid(entropy_srcs=["triagenode-segment", seg_uid, str(number)]))


def _millilitres(value: float) -> str:
    """12.3456 -> "12.346": a volume to the microlitre, no trailing zeros."""
    return f"{value:.3f}".rstrip("0").rstrip(".") or "0"


def _spec(manifest: Manifest) -> SegmentationSpec:
    if manifest.segmentation is None:
        raise ValueError(f"model {manifest.name} is not a segmentation model: it has no segmentation section")
    return manifest.segmentation


def _fix_times(seg: Dataset, now: datetime, uid: str) -> None:
    """Replace every time highdicom stamped with ``now``, and its fresh Dimension Organization UID with one
    drawn from the SEG's own UID, so the same result gives the same data set."""
    seg.SeriesDate = seg.ContentDate = seg.InstanceCreationDate = DA(now.date())
    seg.SeriesTime = seg.ContentTime = seg.InstanceCreationTime = TM(now.time())
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(now)
    dimension_uid = str(generate_uid(entropy_srcs=["triagenode-seg-dimensions", uid]))
    for item in [*seg.get("DimensionOrganizationSequence", []), *seg.get("DimensionIndexSequence", [])]:
        item.DimensionOrganizationUID = dimension_uid


__all__ = [
    "SEGMENTATION_STORAGE",
    "SEG_SERIES_NUMBER",
    "build_segmentation",
    "build_volumetric_report",
    "referenced_segment",
    "segment_group",
    "segmentation_uid",
    "segmentation_verdict",
]
