"""The Mammography CAD SR (TID 4000) of a lesion detector: the form breast-imaging workstations draw CAD marks from.

Breast-imaging PACS and review workstations (Fuji Synapse, for one) show CAD
marks from a Mammography CAD SR (SOP Class 1.2.840.10008.5.1.4.1.1.88.50),
as iCAD, Hologic/R2 and ScreenPoint send it, not from a TID 1500. highdicom
has no builder for it, so the content tree is put together here from
highdicom's content items (and plain pydicom items where highdicom has none:
an IMAGE without a concept name, a by-reference relationship), following
PS3.16:

* TID 4000 Mammography CAD Document Root: CONTAINER (111036, DCM,
  "Mammography CAD Report"), SEPARATE, template 4000 (DCMR);
  HAS CONCEPT MOD Language (TID 1204: English, United States).
* Image Library: CONTAINS CONTAINER (111028, DCM, "Image Library") with one
  IMAGE per image the model read (TID 4020 CAD Image Library Entry), each
  with HAS ACQ CONTEXT Image Laterality (111027, CID 6022: Left/Right breast),
  Image View (111031, CID 4014, the image's View Code Sequence or its View
  Position) with its modifiers (111032, CID 4015), Patient Orientation Row and
  Column (111044/111043), Study Date/Time (111060/111061), Content Date/Time
  (111018/111019), Horizontal and Vertical Pixel Spacing (111026/111066, mm),
  and the matrix, Pixel Data Rows and Columns (110910/110911, {pixels}: the
  TID 1602 descriptors, an extension of TID 4020, so that a reader can check
  the coordinates against the image without fetching it).
* TID 4001: CONTAINS CODE (111017, DCM, "CAD Processing and Findings
  Summary") = "All algorithms succeeded; with findings" (111242) or "...;
  without findings" (111241) (CID 6047), and INFERRED FROM it, per lesion:
* TID 4003: CONTAINER (111034, DCM, "Individual Impression/Recommendation")
  with HAS CONCEPT MOD Rendering Intent (111056) "Presentation Required:
  Rendering device is expected to present" (111150, CID 6034), an Impression
  Description (111033) that names the lesion, its view and certainty ("lesion
  1: mass, L CC, certainty 0.91"), and CONTAINS
* TID 4006: CODE (111059, DCM, "Single Image Finding") of the lesion's kind
  from CID 6014 "Mammography Single Image Finding", with HAS CONCEPT MOD
  Rendering Intent (Presentation Required); HAS PROPERTIES Algorithm Name and
  Version (TID 4019); HAS PROPERTIES Certainty of Finding (111012) in percent
  (UCUM "%", 0-100, as TID 4006 gives it); HAS PROPERTIES (TID 4021) the Center
  (111010) as a SCOORD POINT at the box's centre and the Outline (111041) as a
  closed SCOORD POLYLINE of the box's corners, each R-SELECTED FROM the image's
  entry in the image library (a by-reference relationship, as TID 4021 has it).
* TID 4015: CONTAINS CODE (111064, DCM, "Summary of Detections") =
  "Succeeded" (CID 6042), INFERRED FROM CONTAINER (111063, "Successful
  Detections") with one TID 4017 Detection Performed (111022) per lesion class
  the model detects (CID 6014), each with HAS PROPERTIES Algorithm Name and
  Version and R-HAS PROPERTIES the images it processed.
* TID 4016: CONTAINS CODE (111065, DCM, "Summary of Analyses") = "Not
  Attempted": the model performs no analysis (CID 6043) beyond detection.

**The finding's code.** TID 4006 takes the kind of finding from CID 6014,
which codes a mass, as BI-RADS' older lexicon named it and as CAD vendors
mark it, "Mammography breast density" (SCT 129793001); "Mammographic breast
mass" (129788004, CID 6054), which the TID 1500 carries, and SNOMED CT's
"Mass" (4147007) are not in CID 6014. A workstation
chooses its mass mark by the CID 6014 code, so a mass goes as 129793001 here;
"Calcification Cluster" (129769006) is in CID 6014 as it is. Another class
code a model package gives passes through unchanged.

**Identity and series.** The document is sealed as the TID 1500 is
(:func:`inference.report.content_uid`: same content, same SOP Instance UID;
the Predecessor Documents Sequence names the document it replaces, but only
an earlier Mammography CAD SR). It goes in a series of its own (series number
9902, UID from the TID 1500's series inputs and "mammography-cad"),
described "AI CAD: mammography (not for diagnosis)" ("AI CAD <route>: ..."
for a ``[[models]]`` entry). Patient and study come from the evidence through
highdicom (:meth:`highdicom.SOPClass.copy_patient_and_study_information`), in
a character set chosen as :func:`inference.report._evidence` chooses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from triagenode.inference.detection_report import (
    BREAST_SIDES,
    MAMMOGRAPHY_CAD_SR,
    box_outline,
    image_of,
    lesion_code,
    lesion_words,
    ordered_images,
)
from triagenode.inference.model_package import CodedConcept, Manifest
from triagenode.inference.outcomes import StudyResult
from triagenode.inference.report import (
    MANUFACTURER,
    DocumentOptions,
    _code,
    _evidence,
    _options_for,
    _own_text,
    _routed,
    _seal,
    instance_references,
    report_series_uid,
)

CAD_SERIES_NUMBER = 9902
SERIES_DESCRIPTION = "AI CAD: mammography (not for diagnosis)"
TEMPLATE = "4000"
"""TID 4000 Mammography CAD Document Root (Mapping Resource DCMR)."""
BOTH_BREASTS = Code("63762007", "SCT", "Both breasts")
MAMMOGRAPHY_BREAST_DENSITY = Code("129793001", "SCT", "Mammography breast density")
CID_6014: dict[tuple[str, str], Code] = {
    ("SCT", "4147007"): MAMMOGRAPHY_BREAST_DENSITY,  # Mass
    ("SCT", "129788004"): MAMMOGRAPHY_BREAST_DENSITY,  # Mammographic breast mass (CID 6016/6017)
}
"""A lesion class code -> its CID 6014 "Mammography Single Image Finding" code, where they differ (see above)."""
VIEWS: dict[str, Code] = {
    "CC": Code("399162004", "SCT", "cranio-caudal"),
    "MLO": Code("399368009", "SCT", "medio-lateral oblique"),
    "ML": Code("399260004", "SCT", "medial-lateral"),
    "LM": Code("399352003", "SCT", "latero-medial"),
    "LMO": Code("399099002", "SCT", "latero-medial oblique"),
    "XCCL": Code("399192008", "SCT", "cranio-caudal exaggerated laterally"),
    "XCCM": Code("399101009", "SCT", "cranio-caudal exaggerated medially"),
    "FB": Code("399196006", "SCT", "caudo-cranial"),
    "SIO": Code("399188001", "SCT", "superolateral to inferomedial oblique"),
    "ISO": Code("441555000", "SCT", "inferomedial to superolateral oblique"),
}
"""View Position -> CID 4014 "View for Mammography", for images without a View Code Sequence."""
LANGUAGE = Code("en-US", "RFC5646", "English (United States)")
INDIVIDUAL_IMPRESSION = Code("111034", "DCM", "Individual Impression/Recommendation")
"""Spelled out: pydicom's meaning carries a zero-width space (from the standard's HTML), which would make
the document's own text non-ASCII and its character set UTF-8 for nothing."""
PIXELS = Code("{pixels}", "UCUM", "Pixels")
_CONTENT_SEQUENCE = Tag("ContentSequence")
_LIBRARY_POSITION = 2
"""The image library's position among the root's children (after the language): by-reference items point
into it as 1 (root) / 2 / the image's position."""


def build_mammography_cad_sr(
    result: StudyResult, manifest: Manifest, evidence: Sequence[Dataset], options: DocumentOptions
) -> Dataset:
    """The Mammography CAD SR of a detector's result (see the module docstring for the content tree).

    ``result.lesions`` are the marks at or above the threshold, most certain first (none: "without
    findings"); ``evidence`` the headers of every image the model read, each of which becomes an image
    library entry. The SR class option does not apply: this document has its own SOP Class.
    """
    if not evidence:
        raise ValueError("the report needs the headers of the images the model read as evidence")
    if manifest.detection is None:
        raise ValueError(f"model {manifest.name} is not a detection model: it has no lesion classes")
    options = _options_for(options, MAMMOGRAPHY_CAD_SR, same_class=True)
    images = ordered_images(evidence)
    position = {uid: index for index, uid in enumerate(images, start=1)}  # in the image library
    library = _container(codes.DCM.ImageLibrary, "CONTAINS")
    _nest(library, [_library_entry(image) for image in images.values()])

    findings = hd.sr.CodeContentItem(
        name=codes.DCM.CADProcessingAndFindingsSummary,
        value=codes.DCM.AllAlgorithmsSucceededWithFindings if result.lesions
        else codes.DCM.AllAlgorithmsSucceededWithoutFindings,
        relationship_type="CONTAINS",
    )
    impressions = []
    for number, lesion in enumerate(result.lesions, start=1):
        image = image_of(lesion, images)
        reference = [1, _LIBRARY_POSITION, position[lesion.sop_instance_uid]]
        finding = hd.sr.CodeContentItem(
            name=codes.DCM.SingleImageFinding, value=single_image_finding(lesion_code(manifest, lesion)),
            relationship_type="CONTAINS",
        )
        centre = hd.sr.ScoordContentItem(
            name=codes.DCM.Center, graphic_type=hd.sr.GraphicTypeValues.POINT,
            graphic_data=np.array([lesion.centre], dtype=np.float32),
            relationship_type="HAS PROPERTIES",
        )
        _nest(centre, [_by_reference("SELECTED FROM", reference)])
        outline = hd.sr.ScoordContentItem(
            name=codes.DCM.Outline, graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=box_outline(lesion.box), relationship_type="HAS PROPERTIES",
        )
        _nest(outline, [_by_reference("SELECTED FROM", reference)])
        _nest(finding, [
            _rendering_intent(),
            *_algorithm_identification(manifest),
            hd.sr.NumContentItem(
                name=codes.DCM.CertaintyOfFinding, value=_percent(lesion.certainty), unit=codes.UCUM.Percent,
                relationship_type="HAS PROPERTIES",
            ),
            centre,
            outline,
        ])
        impression = _container(INDIVIDUAL_IMPRESSION, "INFERRED FROM")
        _nest(impression, [
            _rendering_intent(),
            hd.sr.TextContentItem(
                name=codes.DCM.ImpressionDescription, value=lesion_words(number, lesion, manifest, image)[:1024],
                relationship_type="CONTAINS",
            ),
            finding,
        ])
        impressions.append(impression)
    if impressions:
        _nest(findings, impressions)

    detections = hd.sr.CodeContentItem(
        name=codes.DCM.SummaryOfDetections, value=codes.DCM.Succeeded, relationship_type="CONTAINS"
    )
    successful = _container(codes.DCM.SuccessfulDetections, "INFERRED FROM")
    _nest(successful, [
        _detection_performed(manifest, code, [[1, _LIBRARY_POSITION, position[uid]] for uid in images])
        for code in dict.fromkeys(single_image_finding(c.code) for c in manifest.detection.classes)
    ])
    _nest(detections, [successful])
    analyses = hd.sr.CodeContentItem(
        name=codes.DCM.SummaryOfAnalyses, value=codes.DCM.NotAttempted, relationship_type="CONTAINS"
    )

    root = hd.sr.ContainerContentItem(
        name=codes.DCM.MammographyCADReport, is_content_continuous=False, template_id=TEMPLATE
    )
    _nest(root, [_language(), library, findings, detections, analyses])

    description = _routed(SERIES_DESCRIPTION, options.route)
    headers = _evidence(list(images.values()), _own_text(root.ContentSequence, description, manifest.name,
                                                        manifest.version))
    first = headers[0]
    now = options.now or datetime.now()
    sr = hd.SOPClass(
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=report_series_uid(
            result.study_uid, manifest.name, manifest.version, options.route, kind="mammography-cad"
        ),
        series_number=CAD_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),  # replaced by the content's UID when sealed
        sop_class_uid=MAMMOGRAPHY_CAD_SR,
        instance_number=1,
        modality="SR",
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_qualification="PRODUCT" if options.product else "RESEARCH",
        series_description=description[:64],
        manufacturer_model_name=manifest.name[:64],
        software_versions=manifest.version,
        specific_character_set=first.get("SpecificCharacterSet"),
        content_date=now.date(),
        content_time=now.time(),
        series_date=now.date(),
        series_time=now.time(),
    )
    sr.copy_patient_and_study_information(first)
    # SR Document General (PS3.3 C.17.2): complete, unverified, preliminary (an AI result, not a reading).
    sr.CompletionFlag = "COMPLETE"
    sr.VerificationFlag = "UNVERIFIED"
    sr.PreliminaryFlag = "PRELIMINARY"
    sr.PerformedProcedureCodeSequence = []
    sr.ReferencedPerformedProcedureStepSequence = []
    sr.CurrentRequestedProcedureEvidenceSequence = _evidence_sequence(list(images.values()))
    for element in root:  # SR Document Content (PS3.3 C.17.3): the root item is the data set itself
        sr[element.tag] = element
    _seal(sr, options.predecessor)
    return sr


def single_image_finding(code: CodedConcept) -> Code:
    """A lesion class code as CID 6014 "Mammography Single Image Finding" has it (see the module docstring)."""
    return CID_6014.get((code.scheme, code.value), _code(code))


def _percent(fraction: float) -> float:
    """A certainty 0-1 as TID 4006's percent, 0-100 (six significant decimals are plenty)."""
    return round(float(fraction) * 100, 6)


def _container(name: Code, relationship: str) -> hd.sr.ContainerContentItem:
    return hd.sr.ContainerContentItem(name=name, is_content_continuous=False, relationship_type=relationship)


def _language() -> hd.sr.CodeContentItem:
    """TID 1204: Language of Content Item and Descendants, English (United States), as highdicom's TID 1500 says."""
    return hd.sr.CodeContentItem(
        name=codes.DCM.LanguageOfContentItemAndDescendants, value=LANGUAGE, relationship_type="HAS CONCEPT MOD"
    )


def _rendering_intent() -> hd.sr.CodeContentItem:
    """HAS CONCEPT MOD Rendering Intent: Presentation Required (CID 6034), so a workstation draws the mark."""
    return hd.sr.CodeContentItem(
        name=codes.DCM.RenderingIntent,
        value=codes.DCM.PresentationRequiredRenderingDeviceIsExpectedToPresent,
        relationship_type="HAS CONCEPT MOD",
    )


def _algorithm_identification(manifest: Manifest) -> list[hd.sr.TextContentItem]:
    """TID 4019 Algorithm Identification: the model's name and version, HAS PROPERTIES of the finding."""
    return [
        hd.sr.TextContentItem(name=codes.DCM.AlgorithmName, value=manifest.name[:1024],
                              relationship_type="HAS PROPERTIES"),
        hd.sr.TextContentItem(name=codes.DCM.AlgorithmVersion, value=manifest.version[:1024],
                              relationship_type="HAS PROPERTIES"),
    ]


def _detection_performed(manifest: Manifest, code: Code, images: list[list[int]]) -> hd.sr.CodeContentItem:
    """TID 4017 CAD Detection Performed: what was looked for, by which algorithm, on which images (by reference)."""
    item = hd.sr.CodeContentItem(name=codes.DCM.DetectionPerformed, value=code, relationship_type="CONTAINS")
    return _nest(item, [
        *_algorithm_identification(manifest),
        *(_by_reference("HAS PROPERTIES", reference) for reference in images),
    ])


def _nest(item: Dataset, children: Sequence[Dataset]) -> Dataset:
    """``item`` with ``children`` as its Content Sequence, set as a plain sequence: highdicom's own would
    refuse the items it has no class for (an IMAGE without a concept name, a by-reference relationship)."""
    item[_CONTENT_SEQUENCE] = DataElement(_CONTENT_SEQUENCE, "SQ", DicomSequence(list(children)))
    return item


def _by_reference(relationship: str, target: list[int]) -> Dataset:
    """A by-reference relationship (PS3.3 C.17.3.2.5) to the content item at ``target`` (1 = the root)."""
    item = Dataset()
    item.RelationshipType = relationship
    item.ReferencedContentItemIdentifier = list(target)
    return item


def _library_entry(image: Dataset) -> Dataset:
    """TID 4020 CAD Image Library Entry: an IMAGE (no concept name) with its acquisition context."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = image.SOPClassUID
    reference.ReferencedSOPInstanceUID = image.SOPInstanceUID
    entry = Dataset()
    entry.RelationshipType = "CONTAINS"
    entry.ValueType = "IMAGE"
    entry.ReferencedSOPSequence = [reference]
    context: list[Dataset] = []

    def code(name: Code, value: Code) -> hd.sr.CodeContentItem:
        item = hd.sr.CodeContentItem(name=name, value=value, relationship_type="HAS ACQ CONTEXT")
        context.append(item)
        return item

    laterality = str(image.get("ImageLaterality", "") or image.get("Laterality", "") or "").upper()
    side = BREAST_SIDES.get(laterality)
    if side is not None or laterality == "B":
        code(codes.DCM.ImageLaterality, _code(side) if side is not None else BOTH_BREASTS)
    view = _view(image)
    if view is not None:
        item = code(codes.DCM.ImageView, view)
        modifiers = [
            hd.sr.CodeContentItem(name=codes.DCM.ImageViewModifier, value=_coded(modifier),
                                  relationship_type="HAS CONCEPT MOD")
            for view_item in image.get("ViewCodeSequence", [])[:1]
            for modifier in view_item.get("ViewModifierCodeSequence", [])
        ]
        if modifiers:
            _nest(item, modifiers)
    orientation = image.get("PatientOrientation")
    if orientation is not None and len(orientation) == 2 and all(orientation):
        for name, value in ((codes.DCM.PatientOrientationRow, orientation[0]),
                            (codes.DCM.PatientOrientationColumn, orientation[1])):
            context.append(hd.sr.TextContentItem(name=name, value=str(value), relationship_type="HAS ACQ CONTEXT"))
    for name, keyword, kind in (
        (codes.DCM.StudyDate, "StudyDate", hd.sr.DateContentItem),
        (codes.DCM.StudyTime, "StudyTime", hd.sr.TimeContentItem),
        (codes.DCM.ContentDate, "ContentDate", hd.sr.DateContentItem),
        (codes.DCM.ContentTime, "ContentTime", hd.sr.TimeContentItem),
    ):
        if image.get(keyword):
            context.append(kind(name=name, value=image.get(keyword), relationship_type="HAS ACQ CONTEXT"))
    spacing = image.get("ImagerPixelSpacing") or image.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        for name, value in ((codes.DCM.HorizontalPixelSpacing, spacing[1]),
                            (codes.DCM.VerticalPixelSpacing, spacing[0])):
            context.append(hd.sr.NumContentItem(name=name, value=float(DSfloat(value)), unit=codes.UCUM.Millimeter,
                                                relationship_type="HAS ACQ CONTEXT"))
    for name, keyword in ((codes.DCM.PixelDataRows, "Rows"), (codes.DCM.PixelDataColumns, "Columns")):
        if image.get(keyword):
            context.append(hd.sr.NumContentItem(name=name, value=int(image.get(keyword)), unit=PIXELS,
                                                relationship_type="HAS ACQ CONTEXT"))
    return _nest(entry, context) if context else entry


def _view(image: Dataset) -> Code | None:
    """The image's view (CID 4014): its View Code Sequence, else its View Position; None when neither says."""
    for item in image.get("ViewCodeSequence", [])[:1]:
        if item.get("CodeValue") and item.get("CodingSchemeDesignator"):
            return _coded(item)
    return VIEWS.get(str(image.get("ViewPosition", "") or "").upper())


def _coded(item: Dataset) -> Code:
    return Code(str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.get("CodeMeaning", "")))


def _evidence_sequence(images: Sequence[Dataset]) -> list[Dataset]:
    """Current Requested Procedure Evidence Sequence: every image read, by study > series > instance."""
    return instance_references(
        (str(i.StudyInstanceUID), str(i.SeriesInstanceUID), str(i.SOPClassUID), str(i.SOPInstanceUID))
        for i in images
    )


__all__ = ["CAD_SERIES_NUMBER", "MAMMOGRAPHY_CAD_SR", "build_mammography_cad_sr", "single_image_finding"]
