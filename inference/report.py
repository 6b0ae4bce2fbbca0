"""The DICOM Structured Report that carries a result back to the PACS (highdicom, TID 1500).

One Comprehensive 3D SR (or Comprehensive SR, for archives that refuse 3D
SR) in the source study, in a new series whose description a PACS rule can
match. Its content: a device observer (the node) and the algorithm (the
model's name and version); the procedure reported (LOINC 24627-2 "CT Chest"
for a CT model of a chest finding site); one measurement group for the study
with the finding as a qualitative evaluation, Present or Absent (SCT 52101004
/ 272519000), the probability as a NUM "Certainty of Finding" (DCM 111012,
unit 1), the model's operating threshold as a NUM "Threshold Value" (DCM
122411, unit 1), a sentence that says all of it in words ("Lung nodule:
present (model probability 0.999982, at or above the operating threshold
0.742656; ...)"), the key
slice in the image library, and the evaluated series as evidence. Completion
COMPLETE, verification UNVERIFIED, content qualification RESEARCH unless the
site says PRODUCT. Containers are SEPARATE, not CONTINUOUS, so that renderers
(DCMTK ``dsr2html``, PACS SR viewers) label every item with its concept name
instead of running the values together as prose.

**Identity.** Its SOP Instance UID is a digest of the document's content
(:func:`content_uid`): the SR class, patient and study, every evaluated
instance, the key slice, the finding, probability, threshold, model and
version, the node. Only the creation times and the Predecessor Documents
Sequence are left out. So a retried send or a re-run of the same study gives
the same UID again, and anything different (a late slice, the other SR
class, another model version) a new one, which names the report it replaces
in its Predecessor Documents Sequence (0040,A360).

**Character sets.** The SR keeps the images' Specific Character Set when
highdicom takes it as it is (none, ``ISO_IR 100``, ``ISO_IR 192``, ...).
Otherwise (``\\ISO 2022 IR 87`` with an empty first value at Japanese sites,
``\\ISO 2022 IR 149`` at Korean ones, which highdicom refuses) the evidence's
text is decoded with pydicom's own character-set handling and the SR is
written in UTF-8 (``ISO_IR 192``), so the patient's name arrives intact.

A study the model cannot read (no suitable series) gets no report, unless
the site sets ``report_not_applicable``: then an SR of the same shape says
the finding is Indeterminate and gives the reason, so that a worklist rule
waiting for a report for every study is not left waiting.

**Detection models** (``manifest.task == "detection"``, a mammography lesion
detector) get the documents ``mammo_sr`` names (:func:`reports_for`): a TID
1500 with a study-level group and one planar ROI group per lesion
(:mod:`inference.detection_report`, built with the helpers below), a
Mammography CAD SR (TID 4000, :mod:`inference.mammo_cad_sr`), or both.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Literal

import highdicom as hd
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA, TM

from triagenode.config.settings import InferenceSettings, MammoSr
from triagenode.inference.model_package import CodedConcept, Manifest
from triagenode.inference.outcomes import NotApplicable, StudyResult

SrClass = Literal["comprehensive3d", "comprehensive"]
SR_CLASS_UIDS: dict[str, str] = {"comprehensive3d": Comprehensive3DSRStorage, "comprehensive": ComprehensiveSRStorage}
"""``[inference].sr_sop_class`` -> SOP Class UID."""
MANUFACTURER = "Triage Node project"
SERIES_NUMBER = 9901
CHARACTER_SET = "ISO_IR 192"
"""UTF-8: the SR's character set when the images' own cannot be kept (see the module docstring)."""
CT_CHEST = Code("24627-2", "LN", "CT Chest")
"""Procedure reported (CID 100) for a CT model whose finding site lies in the chest."""
CHEST_SITES = frozenset({"39607008", "51185008", "302551006"})
"""SNOMED CT finding sites read on a chest CT: lung, thorax, entire thorax."""
THRESHOLD_VALUE = codes.DCM.ThresholdValue  # (122411, DCM, "Threshold Value")
_STANDALONE_CHARACTER_SETS = frozenset(
    v.value for v in hd.enum.SpecificCharacterSetValues if not v.value.startswith("ISO 2022")
)
"""Single-valued Specific Character Sets that highdicom accepts as they are."""

_NOT_CONTENT = frozenset(
    {
        "SOPInstanceUID",  # what is being computed
        "InstanceCreationDate",
        "InstanceCreationTime",
        "ContentDate",
        "ContentTime",
        "SeriesDate",
        "SeriesTime",
        "PredecessorDocumentsSequence",  # history, not content: a re-run of the same result stays the same document
    }
)


@dataclass(frozen=True)
class Predecessor:
    """An earlier SR of the same study that a new report replaces (Predecessor Documents Sequence, 0040,A360)."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    predecessors: tuple[Predecessor, ...] = ()
    """The earlier SR's own predecessors: the new report keeps them when it turns out to be that same document
    (same content, same UID), so that a re-run never loses the history nor references itself."""

    @classmethod
    def of(cls, sr: Dataset) -> Predecessor:
        """The predecessor that an SR data set (a stored report, read back) makes."""
        earlier = tuple(
            cls(str(study.StudyInstanceUID), str(series.SeriesInstanceUID), str(ref.ReferencedSOPClassUID),
                str(ref.ReferencedSOPInstanceUID))
            for study in sr.get("PredecessorDocumentsSequence", [])
            for series in study.get("ReferencedSeriesSequence", [])
            for ref in series.get("ReferencedSOPSequence", [])
        )
        return cls(str(sr.StudyInstanceUID), str(sr.SeriesInstanceUID), str(sr.SOPClassUID), str(sr.SOPInstanceUID),
                   earlier)


@dataclass(frozen=True)
class DocumentOptions:
    """How the node writes its SR documents: the same for every report of a site, whatever the outcome.

    Every report builder takes one, so a new kind of report (detection, segmentation) does not
    repeat five keyword arguments and their defaults.
    """

    node_ae_title: str
    """The node's AE title: it names the observing device (a UID made from it) in every report."""
    sr_class: SrClass = "comprehensive3d"
    """Comprehensive 3D SR, or Comprehensive SR for archives that refuse the 3D class."""
    product: bool = False
    """Content Qualification PRODUCT (a validated, cleared model) instead of RESEARCH."""
    predecessor: Predecessor | None = None
    """The study's earlier report, which the new one replaces (unless both are the same document)."""
    now: datetime | None = None
    """Series and Content Date/Time; the current time when None."""
    route: str | None = None
    """The ``[[models]]`` entry the report is for: its name makes the report series the entry's own (UID,
    description), so two entries on one study (even of one package) give two series. None for the node's
    one model (``[inference] model``), whose series stay what they were."""
    more_predecessors: tuple[Predecessor, ...] = ()
    """The earlier report's other documents (a detector's Mammography CAD SR beside its TID 1500): each new
    document replaces the earlier one of its own class (:func:`_options_for`)."""

    @classmethod
    def for_site(
        cls,
        inference: InferenceSettings,
        node_ae_title: str,
        predecessor: Predecessor | None = None,
        route: str | None = None,
        more_predecessors: Sequence[Predecessor] = (),
    ) -> DocumentOptions:
        """The options ``[inference]`` sets: the SR class and the content qualification."""
        return cls(
            node_ae_title=node_ae_title,
            sr_class=inference.sr_sop_class,
            product=inference.content_qualification == "PRODUCT",
            predecessor=predecessor,
            route=route,
            more_predecessors=tuple(more_predecessors),
        )


def read_predecessor(path: Path) -> Predecessor | None:
    """The stored report at ``path`` as a predecessor; None when the file is gone or is not an SR.

    A missing earlier report must not stop the new one: it then simply names no predecessor.
    """
    try:
        sr = dcmread(
            path,
            specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID",
                           "PredecessorDocumentsSequence"],
        )
        return Predecessor.of(sr)
    except (OSError, InvalidDicomError, AttributeError, ValueError):
        return None


def report_series_uid(
    study_uid: str, model: str, version: str, route: str | None = None, kind: str | None = None
) -> str:
    """The report series of a study for one model version (of one ``[[models]]`` entry, ``route``).

    Every report of theirs goes into one series; another entry, even of the same package, has its own.
    ``kind`` names another form of document for the same result (``"mammography-cad"``), which a
    PACS files in a series of its own.
    """
    sources = ["triagenode-sr-series", study_uid, model, version] + ([route] if route is not None else [])
    sources += [kind] if kind is not None else []
    return str(generate_uid(entropy_srcs=sources))


def content_uid(sr: Dataset) -> str:
    """The SOP Instance UID an SR's content gives: a digest of every attribute but the creation times
    (instance, series, content, contribution), its own UID and its predecessors (see the module
    docstring), so same content, same UID."""
    content = Dataset()
    for element in sr:
        if element.keyword not in _NOT_CONTENT:
            content.add(element)
    if "ContributingEquipmentSequence" in content:  # highdicom names itself with the time it ran
        equipment = copy.deepcopy(content.ContributingEquipmentSequence)
        for item in equipment:
            item.pop("ContributionDateTime", None)
        content.ContributingEquipmentSequence = equipment
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, content)
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()
    return str(generate_uid(entropy_srcs=["triagenode-sr", digest]))


def build_measurement_report(
    result: StudyResult, manifest: Manifest, evaluated_series: Sequence[Dataset], options: DocumentOptions
) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR:
    """The SR for one study result; ``evaluated_series`` are the headers of the series the model read."""
    if not evaluated_series:
        raise ValueError("the report needs the evaluated series' headers as evidence")
    key = [ds for ds in evaluated_series if str(ds.SOPInstanceUID) == result.key_instance_uid] or [evaluated_series[0]]
    algorithm = _algorithm(manifest)
    group = _group(
        result.study_uid,
        manifest,
        algorithm,
        codes.SCT.Present if result.finding else codes.SCT.Absent,
        measurements=study_measurements(result, algorithm),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(key[0])],
    )
    _add_comment(group, _verdict(manifest, result))
    return _document(
        manifest, [group], evaluated_series, key, result.study_uid, options,
        f"AI triage: {manifest.finding.meaning.lower()} (not for diagnosis)",
    )


def study_measurements(result: StudyResult, algorithm: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    """The study group's numbers: the model's probability (a detector's highest certainty) as Certainty of
    Finding, and the operating threshold it was read at, so a worklist rule can sort and explain."""
    return [
        hd.sr.Measurement(
            name=codes.DCM.CertaintyOfFinding, value=result.probability, unit=codes.UCUM.NoUnits,
            algorithm_id=algorithm,
        ),
        hd.sr.Measurement(name=THRESHOLD_VALUE, value=result.threshold, unit=codes.UCUM.NoUnits),
    ]


def build_not_applicable_report(
    outcome: NotApplicable, manifest: Manifest, study_headers: Sequence[Dataset], options: DocumentOptions
) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR:
    """The SR for a study the model could not read, for sites that want a report for every study.

    The finding is Indeterminate (SCT 82334004), with no probability; a
    Comment (DCM 121106) gives the reason, so the radiologist knows the study
    was seen but not assessed. ``study_headers`` (every instance of the study)
    are its evidence.
    """
    if not study_headers:
        raise ValueError("the report needs the study's headers as evidence")
    group = _group(outcome.study_uid, manifest, _algorithm(manifest), codes.SCT.Indeterminate)
    _add_comment(group, f"Not assessed: {outcome.reason}")
    return _document(
        manifest, [group], study_headers, None, outcome.study_uid, options,
        f"AI triage: {manifest.finding.meaning.lower()} not assessed",
    )


def reports_for(
    outcome: StudyResult | NotApplicable,
    manifest: Manifest,
    inference: InferenceSettings,
    node_ae_title: str,
    predecessor: Predecessor | None = None,
    route: str | None = None,
    mammo_sr: MammoSr | None = None,
    more_predecessors: Sequence[Predecessor] = (),
) -> list[Dataset]:
    """Every SR the node sends for an outcome, as the site configured it, the primary one first; [] for none.

    A classifier's result: its one TID 1500. A detector's result: what ``mammo_sr`` (the
    ``[[models]]`` entry's, else ``[inference] mammo_sr``) names: the TID 1500 (``tid1500``), the
    Mammography CAD SR (``mammography-cad``), or both, the TID 1500 first (``both``). A segmenter's
    result: its DICOM Segmentation and the TID 1500 that measures it, the SEG first
    (:mod:`inference.segmentation_report`). A study the
    model cannot read: a report only when ``[inference] report_not_applicable`` asks for one.
    ``predecessor``: the study's earlier report (see :func:`read_predecessor`), which the new one replaces;
    ``more_predecessors``: that report's other documents (each new document replaces the one of its class).
    ``route``: the ``[[models]]`` entry (see :attr:`DocumentOptions.route`).
    """
    options = DocumentOptions.for_site(inference, node_ae_title, predecessor, route, more_predecessors)
    if isinstance(outcome, StudyResult):
        if manifest.task == "segmentation":
            # Imported here: it builds on this module's helpers. The SEG first: the SR references it.
            from triagenode.inference.segmentation_report import (
                SEGMENTATION_STORAGE,
                build_segmentation,
                build_volumetric_report,
            )

            seg = build_segmentation(outcome, manifest, _options_for(options, SEGMENTATION_STORAGE, same_class=True))
            return [seg, build_volumetric_report(outcome, manifest, seg, options)]
        if manifest.task != "detection":
            return [build_measurement_report(outcome, manifest, outcome.evidence, options)]
        # Imported here: both modules build on this one's helpers.
        from triagenode.inference.detection_report import build_detection_report
        from triagenode.inference.mammo_cad_sr import build_mammography_cad_sr

        form = mammo_sr or inference.mammo_sr
        documents: list[Dataset] = []
        if form in ("tid1500", "both"):
            documents.append(build_detection_report(outcome, manifest, outcome.evidence, options))
        if form in ("mammography-cad", "both"):
            documents.append(build_mammography_cad_sr(outcome, manifest, outcome.evidence, options))
        return documents
    if inference.report_not_applicable and outcome.evidence:
        return [build_not_applicable_report(outcome, manifest, outcome.evidence, options)]
    return []


def report_for(
    outcome: StudyResult | NotApplicable,
    manifest: Manifest,
    inference: InferenceSettings,
    node_ae_title: str,
    predecessor: Predecessor | None = None,
    route: str | None = None,
    mammo_sr: MammoSr | None = None,
) -> Dataset | None:
    """The primary SR the node sends for an outcome (see :func:`reports_for`); None when it sends none.

    For a detector that is the TID 1500, unless ``mammo_sr`` is ``mammography-cad``.
    """
    documents = reports_for(outcome, manifest, inference, node_ae_title, predecessor, route, mammo_sr)
    return documents[0] if documents else None


def convert_report(stored: Dataset, sr_class: SrClass, now: datetime | None = None) -> Dataset:
    """The stored report ``stored`` re-created as an SR of class ``sr_class``, ready to save and send.

    For ``triagenode queue resend`` after ``[inference].sr_sop_class`` changed (an archive that
    refuses Comprehensive 3D SR gets a Comprehensive SR, or back): the same content, patient,
    study, series, evidence, Series and Content Date/Time; a new Instance Creation Date/Time; a new
    SOP Instance UID, deterministic (:func:`content_uid`, which includes the class, so converting the
    same report twice gives the same UID, and building the same result directly in that class
    gives it too); the stored report as its predecessor (Predecessor Documents Sequence).

    A report already of class ``sr_class`` comes back unchanged (a copy). Raises ValueError for a
    data set that is not a Comprehensive (3D) SR, or for content that the target class cannot hold
    (SCOORD3D items in a Comprehensive SR).
    """
    if sr_class not in SR_CLASS_UIDS:
        raise ValueError(f"unknown SR class {sr_class!r}; expected one of {', '.join(SR_CLASS_UIDS)}")
    if str(stored.get("SOPClassUID", "")) not in SR_CLASS_UIDS.values() or "ContentSequence" not in stored:
        raise ValueError(f"not a Comprehensive (3D) SR: SOP Class UID {stored.get('SOPClassUID', 'missing')}")
    target = SR_CLASS_UIDS[sr_class]
    if stored.SOPClassUID == target:
        return copy.deepcopy(stored)
    if sr_class == "comprehensive" and any(item.ValueType == "SCOORD3D" for item in _items(stored.ContentSequence)):
        raise ValueError("the report holds 3D coordinates (SCOORD3D), which a Comprehensive SR cannot carry")
    now = now or datetime.now()
    converted = copy.deepcopy(stored)
    converted.SOPClassUID = target
    converted.InstanceCreationDate, converted.InstanceCreationTime = DA(now.date()), TM(now.time())
    _seal(converted, Predecessor.of(stored))
    document = hd.sr.ComprehensiveSR if sr_class == "comprehensive" else hd.sr.Comprehensive3DSR
    return document.from_dataset(converted, copy=False)


def _algorithm(manifest: Manifest) -> hd.sr.AlgorithmIdentification:
    """The model as TID 4019 names it (name, version, family AI)."""
    return hd.sr.AlgorithmIdentification(
        name=manifest.name, version=manifest.version, family=codes.cid7162.ArtificialIntelligence
    )


def _code(concept: CodedConcept) -> Code:
    return Code(concept.value, concept.scheme, concept.meaning)


def _finding_label(manifest: Manifest) -> str:
    """The finding with its site, as a radiologist names it: "Lung nodule"."""
    return _label(manifest.finding, manifest.finding_site)


def _label(finding: CodedConcept, site: CodedConcept | None) -> str:
    """A finding and its site in words: Nodule of the Lung -> "Lung nodule", Lesion of the Breast -> "Breast lesion"."""
    if site is None:
        return finding.meaning
    return f"{site.meaning} {finding.meaning[:1].lower()}{finding.meaning[1:]}"


def _verdict(manifest: Manifest, result: StudyResult) -> str:
    """The result in words: what, present or absent, and the number against the threshold it was read at.

    The numbers as the NUM items carry them (never rounded to "1.0000", never two equal-looking numbers
    on either side of the threshold), in plain ASCII words ("at or above", "below"), so the sentence
    reads the same in any character set.
    """
    probability, threshold = _against(result.probability, result.threshold)
    relation = "at or above" if result.finding else "below"
    return (
        f"{_finding_label(manifest)}: {'present' if result.finding else 'absent'} (model probability "
        f"{probability}, {relation} the operating threshold {threshold}; "
        f"model {manifest.name} {manifest.version}; not for diagnosis)"
    )


def _against(value: float, threshold: float) -> tuple[str, str]:
    """A number and the threshold it was read against, in words that never look equal when they are not."""
    words = _number(value), _number(threshold)
    if words[0] == words[1] and value != threshold:
        return repr(value), repr(threshold)
    return words


def _number(value: float) -> str:
    """0.63 -> "0.63", 0.999982 -> "0.999982": up to six decimals, no trailing zeros."""
    return f"{value:.6f}".rstrip("0").rstrip(".") or "0"


def _add_comment(group: hd.sr.MeasurementsAndQualitativeEvaluations, text: str) -> None:
    """A TEXT item (DCM 121106 "Comment") in the measurement group (TID 1501 row 12: a qualitative
    evaluation in text form), so that the report reads as a sentence wherever it is shown."""
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
    )


def _group(
    study_uid: str,
    manifest: Manifest,
    algorithm: hd.sr.AlgorithmIdentification,
    evaluation: Code,
    measurements: list[hd.sr.Measurement] | None = None,
    source_images: list[hd.sr.SourceImageForMeasurementGroup] | None = None,
    finding: CodedConcept | None = None,
    finding_site: CodedConcept | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The study's measurement group (TID 1501): the finding evaluated as ``evaluation``.

    The finding and its site are the manifest's unless given (a detector's study-level group
    reports "Lesion" of the "Breast" whatever its lesion classes are).
    """
    finding = finding or manifest.finding
    site = finding_site or manifest.finding_site
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier=f"AI triage: {finding.meaning.lower()}",
            uid=hd.UID(str(generate_uid(entropy_srcs=["triagenode-tracking", study_uid, manifest.name]))),
        ),
        finding_type=_code(finding),
        finding_sites=[hd.sr.FindingSite(_code(site))] if site else None,
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=_code(finding), value=evaluation)],
        measurements=measurements,
        source_images=source_images,
    )


_UNSPECIFIED_REGION = {
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
    "NM": codes.LN.NMUnspecifiedBodyRegion,
    "PT": codes.LN.PETUnspecifiedBodyRegion,
    "CR": codes.LN.XRUnspecifiedBodyRegion,
    "DX": codes.LN.XRUnspecifiedBodyRegion,
    "MG": codes.SCT.Mammography,
}
"""Procedure codes (CID 100) of modalities other than CT whose region the manifest does not say. CID 100
(extensible) has no mammography code; MG gets SNOMED CT 71651007 "Mammography", the procedure (as CID
10005 lists it), screening or diagnostic alike, unilateral or bilateral."""


def _procedure(manifest: Manifest) -> Code:
    """Procedure reported (TID 1500, CID 100): what the model reads."""
    if manifest.input.modality != "CT":
        return _UNSPECIFIED_REGION.get(manifest.input.modality, codes.SCT.ImagingProcedure)
    site = manifest.finding_site
    if site is not None and site.scheme == "SCT" and site.value in CHEST_SITES:
        return CT_CHEST
    return codes.LN.CTUnspecifiedBodyRegion


def _evidence(evidence: Sequence[Dataset], own_text: Iterable[str]) -> list[Dataset]:
    """The evidence in a fixed order (by series, then SOP Instance UID: the order files arrived in is no
    part of the content), its first header (highdicom copies patient and study from it) in a character
    set the SR can declare.

    The images' own character set is kept when it is one value highdicom takes as it is (none, ISO_IR
    100, ISO_IR 192, ...) and the node's own text fits it. Otherwise (code extensions such as
    ``\\ISO 2022 IR 87`` or ``\\ISO 2022 IR 149`` with an empty first value, which highdicom refuses, or a
    model name beyond ASCII) the header is decoded with pydicom's own character-set handling and
    declared UTF-8, so pydicom re-encodes the patient's name intact.
    """
    ordered = sorted(evidence, key=lambda ds: (str(ds.get("SeriesInstanceUID", "")), str(ds.SOPInstanceUID)))
    declared = ordered[0].get("SpecificCharacterSet")
    listed = [] if declared is None else [declared] if isinstance(declared, str) else list(declared)
    values = [str(value).strip() for value in listed]
    if all(text.isascii() for text in own_text) and (
        not any(values) or (len(values) == 1 and values[0] in _STANDALONE_CHARACTER_SETS)
    ):
        return ordered
    first = copy.deepcopy(ordered[0])
    first.decode()  # every text element becomes str, decoded as its character set says
    first.SpecificCharacterSet = CHARACTER_SET
    return [first, *ordered[1:]]


def _own_text(content: Sequence[Dataset], *more: str) -> list[str]:
    """The text the node writes itself: text values and code meanings of the content tree, and ``more``."""
    texts = list(more)
    for item in _items(content):
        texts += [str(item.TextValue)] if "TextValue" in item else []
        for key in ("ConceptNameCodeSequence", "ConceptCodeSequence", "MeasurementUnitsCodeSequence"):
            texts += [str(code.get("CodeMeaning", "")) for code in item.get(key, [])]
    return texts


def _items(items: Iterable[Dataset]) -> Iterable[Dataset]:
    """Every content item of a tree, depth first."""
    for item in items:
        yield item
        yield from _items(item.get("ContentSequence", []))


def _references(predecessors: Iterable[Predecessor]) -> list[Dataset]:
    """A Predecessor Documents Sequence (SOP Instance Reference Macro: study > series > instance)."""
    return instance_references(
        (p.study_uid, p.series_uid, p.sop_class_uid, p.sop_instance_uid) for p in predecessors
    )


def instance_references(instances: Iterable[tuple[str, str, str, str]]) -> list[Dataset]:
    """The SOP Instance Reference Macro (study > series > instance) of (study, series, SOP class, SOP instance)
    UIDs, each instance once, in the order given: predecessors, and a CAD SR's evidence."""
    studies: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for study_uid, series_uid, sop_class_uid, sop_instance_uid in instances:
        series = studies.setdefault(study_uid, {}).setdefault(series_uid, [])
        if all(sop_instance_uid != known for _, known in series):
            series.append((sop_class_uid, sop_instance_uid))
    items = []
    for study_uid, by_series in studies.items():
        study = Dataset()
        study.StudyInstanceUID = study_uid
        study.ReferencedSeriesSequence = []
        for series_uid, members in by_series.items():
            series = Dataset()
            series.SeriesInstanceUID = series_uid
            series.ReferencedSOPSequence = []
            for sop_class_uid, sop_instance_uid in members:
                reference = Dataset()
                reference.ReferencedSOPClassUID = sop_class_uid
                reference.ReferencedSOPInstanceUID = sop_instance_uid
                series.ReferencedSOPSequence.append(reference)
            study.ReferencedSeriesSequence.append(series)
        items.append(study)
    return items


def _routed(description: str, route: str | None) -> str:
    """A series description with the ``[[models]]`` entry's name after its prefix: "AI triage lung: ..."."""
    if route is None or ":" not in description:
        return description
    prefix, rest = description.split(":", 1)
    return f"{prefix} {route}:{rest}"


def _options_for(options: DocumentOptions, sop_class_uid: str, same_class: bool) -> DocumentOptions:
    """``options`` whose predecessor is the earlier document that is (``same_class``) or is not of
    ``sop_class_uid``, among the earlier report's documents; None when there is none such.

    A detector's two documents (TID 1500 and Mammography CAD SR) each replace only an earlier
    document of their own form, never the other.
    """
    earlier = [p for p in (options.predecessor, *options.more_predecessors) if p is not None]
    chosen = next((p for p in earlier if (p.sop_class_uid == sop_class_uid) == same_class), None)
    return replace(options, predecessor=chosen, more_predecessors=())


def _seal(sr: Dataset, predecessor: Predecessor | None) -> None:
    """Give a finished SR its content UID, and its predecessor unless that is the very same document."""
    uid = content_uid(sr)
    sr.SOPInstanceUID = uid
    if getattr(sr, "file_meta", None) is None:
        sr.file_meta = FileMetaDataset()
        sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.file_meta.MediaStorageSOPInstanceUID = uid
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    if predecessor is None:
        earlier: tuple[Predecessor, ...] = ()
    elif predecessor.sop_instance_uid == uid:
        earlier = tuple(p for p in predecessor.predecessors if p.sop_instance_uid != uid)
    else:
        earlier = (predecessor,)
    if earlier:
        sr.PredecessorDocumentsSequence = _references(earlier)
    elif "PredecessorDocumentsSequence" in sr:
        del sr.PredecessorDocumentsSequence


def _document(
    manifest: Manifest,
    groups: Sequence[
        hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ],
    evidence: Sequence[Dataset],
    referenced_images: list[Dataset] | None,
    study_uid: str,
    options: DocumentOptions,
    series_description: str,
) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR:
    """The TID 1500 document around ``groups`` (the study's group first), sealed with its content UID."""
    node_ae_title = options.node_ae_title
    observer = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=hd.UID(str(generate_uid(entropy_srcs=["triagenode-device", node_ae_title]))),
                name=f"Triage Node {node_ae_title}",
                manufacturer_name=MANUFACTURER,
                model_name=f"{manifest.name} {manifest.version}",
            ),
        )
    )
    content = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=_procedure(manifest),
        imaging_measurements=list(groups),
        title=codes.DCM.ImagingMeasurementReport,
        referenced_images=referenced_images,
    )
    for item in _items(content):
        if item.ValueType == "CONTAINER":
            item.ContinuityOfContent = "SEPARATE"  # each item under its concept name, not run together as prose
    now = options.now or datetime.now()
    series_description = _routed(series_description, options.route)
    evidence = _evidence(evidence, _own_text(content, series_description, manifest.name, manifest.version))
    document = hd.sr.Comprehensive3DSR if options.sr_class == "comprehensive3d" else hd.sr.ComprehensiveSR
    sr = document(
        evidence=evidence,
        content=content,
        series_instance_uid=report_series_uid(study_uid, manifest.name, manifest.version, options.route),
        series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(),  # replaced by the content's UID below
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=manifest.name[:64],
        software_versions=manifest.version,
        series_description=series_description[:64],
        is_complete=True,
        is_final=False,
        is_verified=False,
        specific_character_set=evidence[0].get("SpecificCharacterSet"),
        series_date=now.date(),
        series_time=now.time(),
        content_date=now.date(),
        content_time=now.time(),
    )
    sr.ContentQualification = "PRODUCT" if options.product else "RESEARCH"
    _seal(sr, options.predecessor)
    return sr
