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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from inference.model_package import Manifest
from inference.pipeline import StudyResult

SrClass = Literal["comprehensive3d", "comprehensive"]
MANUFACTURER = "Triage Node project"
SERIES_NUMBER = 9901


def _code(concept) -> Code:  # noqa: ANN001 - model_package.CodedConcept
    return Code(concept.value, concept.scheme, concept.meaning)


def report_uids(result: StudyResult) -> tuple[str, str]:
    """(series UID, SOP Instance UID): the same study, model version and result give the same report."""
    series = generate_uid(entropy_srcs=["triagenode-sr-series", result.study_uid, result.model, result.model_version])
    instance = generate_uid(
        entropy_srcs=[
            "triagenode-sr",
            result.study_uid,
            result.series_uid,
            result.model,
            result.model_version,
            f"{result.probability:.6f}",
            str(result.finding),
        ]
    )
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
    finding = _code(manifest.finding)
    algorithm = hd.sr.AlgorithmIdentification(
        name=manifest.name, version=manifest.version, family=codes.cid7162.ArtificialIntelligence
    )
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
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier=f"AI triage: {manifest.finding.meaning.lower()}",
            uid=hd.UID(str(generate_uid(entropy_srcs=["triagenode-tracking", result.study_uid, manifest.name]))),
        ),
        finding_type=finding,
        finding_sites=[hd.sr.FindingSite(_code(manifest.finding_site))] if manifest.finding_site else None,
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=finding, value=codes.SCT.Present if result.finding else codes.SCT.Absent)
        ],
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
    content = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion if manifest.input.modality == "CT" else codes.DCM.Imaging,
        imaging_measurements=[group],
        title=codes.DCM.ImagingMeasurementReport,
        referenced_images=key,
    )
    series_uid, instance_uid = report_uids(result)
    document = hd.sr.Comprehensive3DSR if sr_class == "comprehensive3d" else hd.sr.ComprehensiveSR
    sr = document(
        evidence=list(evaluated_series),
        content=content,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=manifest.name[:64],
        software_versions=manifest.version,
        series_description=f"AI triage: {manifest.finding.meaning.lower()} (not for diagnosis)"[:64],
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.ContentQualification = "PRODUCT" if product else "RESEARCH"
    return sr
