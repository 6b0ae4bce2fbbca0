"""The DICOM Structured Report that carries a result back to the PACS (highdicom, TID 1500).

One Comprehensive 3D SR (or Comprehensive SR, for archives that refuse 3D
SR) in the source study, in a new series whose description a PACS rule can
match. Its content: a device observer (the node) and the algorithm (the
model's name and version); one measurement group for the study with the
finding as a qualitative evaluation, Present or Absent (SCT 52101004 /
272519000), the probability as a NUM "Certainty of Finding" (DCM 111012,
unit 1), the key slice in the image library, and the evaluated series as
evidence. Completion COMPLETE, verification UNVERIFIED, content
qualification RESEARCH unless the site says PRODUCT.

Its SOP Instance UID is derived from the study, the model version and the
result, so a retried send or a re-run never creates a second, different
report for the same result.

A study the model cannot read (no suitable series) gets no report, unless
the site sets ``report_not_applicable``: then an SR of the same shape says
the finding is Indeterminate and gives the reason, so that a worklist rule
waiting for a report for every study is not left waiting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from config.settings import InferenceSettings
from inference.model_package import Manifest
from inference.pipeline import NotApplicable, StudyResult

SrClass = Literal["comprehensive3d", "comprehensive"]
MANUFACTURER = "Triage Node project"
SERIES_NUMBER = 9901


def _code(concept) -> Code:  # noqa: ANN001 - model_package.CodedConcept
    return Code(concept.value, concept.scheme, concept.meaning)


def report_uids(result: StudyResult | NotApplicable, manifest: Manifest | None = None) -> tuple[str, str]:
    """(series UID, SOP Instance UID): the same study, model version and result give the same report."""
    if isinstance(result, NotApplicable):
        assert manifest is not None, "a not-applicable outcome names no model; give the manifest"
        model, version, identity = manifest.name, manifest.version, ["not applicable", result.reason]
    else:
        model, version = result.model, result.model_version
        identity = [result.series_uid, f"{result.probability:.6f}", str(result.finding)]
    series = generate_uid(entropy_srcs=["triagenode-sr-series", result.study_uid, model, version])
    instance = generate_uid(entropy_srcs=["triagenode-sr", result.study_uid, model, version, *identity])
    return str(series), str(instance)


def build_measurement_report(
    result: StudyResult,
    manifest: Manifest,
    evaluated_series: Sequence[Dataset],
    *,
    node_ae_title: str,
    sr_class: SrClass = "comprehensive3d",
    product: bool = False,
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
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.CertaintyOfFinding,
                value=result.probability,
                unit=codes.UCUM.NoUnits,
                algorithm_id=algorithm,
            )
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(key[0])],
    )
    return _document(
        manifest, group, evaluated_series, key, report_uids(result), node_ae_title, sr_class, product,
        f"AI triage: {manifest.finding.meaning.lower()} (not for diagnosis)",
    )  # fmt: skip


def build_not_applicable_report(
    outcome: NotApplicable,
    manifest: Manifest,
    study_headers: Sequence[Dataset],
    *,
    node_ae_title: str,
    sr_class: SrClass = "comprehensive3d",
    product: bool = False,
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
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=f"Not assessed: {outcome.reason}"[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return _document(
        manifest, group, study_headers, None, report_uids(outcome, manifest), node_ae_title, sr_class, product,
        f"AI triage: {manifest.finding.meaning.lower()} not assessed",
    )  # fmt: skip


def report_for(
    outcome: StudyResult | NotApplicable, manifest: Manifest, inference: InferenceSettings, node_ae_title: str
) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | None:
    """The SR the node sends for an outcome, as the site configured it; None when it sends none."""
    options = {
        "node_ae_title": node_ae_title,
        "sr_class": inference.sr_sop_class,
        "product": inference.content_qualification == "PRODUCT",
    }
    if isinstance(outcome, StudyResult):
        return build_measurement_report(outcome, manifest, outcome.evidence, **options)  # type: ignore[arg-type]
    if inference.report_not_applicable and outcome.evidence:
        return build_not_applicable_report(outcome, manifest, outcome.evidence, **options)  # type: ignore[arg-type]
    return None


def _algorithm(manifest: Manifest) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=manifest.name, version=manifest.version, family=codes.cid7162.ArtificialIntelligence
    )


def _group(
    study_uid: str,
    manifest: Manifest,
    algorithm: hd.sr.AlgorithmIdentification,
    evaluation: Code,
    measurements: list[hd.sr.Measurement] | None = None,
    source_images: list[hd.sr.SourceImageForMeasurementGroup] | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The study's one measurement group (TID 1501): the finding evaluated as ``evaluation``."""
    finding = _code(manifest.finding)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier=f"AI triage: {manifest.finding.meaning.lower()}",
            uid=hd.UID(str(generate_uid(entropy_srcs=["triagenode-tracking", study_uid, manifest.name]))),
        ),
        finding_type=finding,
        finding_sites=[hd.sr.FindingSite(_code(manifest.finding_site))] if manifest.finding_site else None,
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=finding, value=evaluation)],
        measurements=measurements,
        source_images=source_images,
    )


def _document(  # noqa: PLR0913 - one place that turns the content into the SR document
    manifest: Manifest,
    group: hd.sr.MeasurementsAndQualitativeEvaluations,
    evidence: Sequence[Dataset],
    referenced_images: list[Dataset] | None,
    uids: tuple[str, str],
    node_ae_title: str,
    sr_class: SrClass,
    product: bool,
    series_description: str,
) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR:
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
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion if manifest.input.modality == "CT" else codes.DCM.Imaging,
        imaging_measurements=[group],
        title=codes.DCM.ImagingMeasurementReport,
        referenced_images=referenced_images,
    )
    series_uid, instance_uid = uids
    document = hd.sr.Comprehensive3DSR if sr_class == "comprehensive3d" else hd.sr.ComprehensiveSR
    sr = document(
        evidence=list(evidence),
        content=content,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=manifest.name[:64],
        software_versions=manifest.version,
        series_description=series_description[:64],
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.ContentQualification = "PRODUCT" if product else "RESEARCH"
    return sr
