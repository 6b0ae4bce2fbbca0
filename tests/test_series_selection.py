"""One series selection and one per-study pipeline for the node, `infer`, training and evaluation.

The README promises that a model never sees other pixels in production than in
validation. These tests hold it on a study where the old rules disagreed: a thin
1 mm series of 40 slices (the node's pick: thinnest first) beside a thick 5 mm
series of 60 slices (the lifecycle's old pick: most instances).
"""

from __future__ import annotations

import json
import random
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pydicom import dcmread
from pydicom.uid import MRImageStorage, generate_uid

from triagenode.config.settings import InferenceSettings
from triagenode.inference.evaluation import score_studies
from triagenode.inference.input_spec import InputSpec
from triagenode.inference.labelled import LabelledDataError, labelled_series
from triagenode.inference.model_package import (
    ModelPackage,
    ModelPackageError,
    load_package,
    read_manifest,
    save_package,
)
from triagenode.inference.outcomes import NotApplicable, StudyResult
from triagenode.inference.phantom import PhantomStudy, read_labels, write_labels, write_phantom_study
from triagenode.inference.pipeline import analyse_study
from triagenode.inference.preprocessing import layout_series
from triagenode.inference.studies import dicom_files, read_studies, read_study, select_series
from triagenode.inference.training import load_studies

from nodes import TRIAGENODE

NODE_AE_TITLE = "TRIAGENODE"


def _restack(files: list[Path], study_uid: str, series_uid: str, thickness_mm: float, out_dir: Path) -> list[Path]:
    """Re-write a phantom series as a series of ``study_uid`` with slices ``thickness_mm`` apart."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for k, path in enumerate(sorted(files)):
        ds = dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SliceThickness = thickness_mm
        z = round((k - len(files) / 2) * thickness_mm, 3)
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], z]
        ds.SliceLocation = z
        ds.SeriesDescription = f"AXIAL {thickness_mm:g}MM"
        target = out_dir / f"{series_uid[-8:]}_{k:04d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


@pytest.fixture(scope="module")
def two_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PhantomStudy, str, str]:
    """A labelled folder of one positive study: a thin 1 mm series of 40 slices and a thick 5 mm series of 60."""
    scratch = tmp_path_factory.mktemp("sources")
    thin_source = write_phantom_study(scratch, seed=41, index=0, positive=True, slices=40, matrix=64)
    thick_source = write_phantom_study(scratch, seed=41, index=1, positive=True, slices=60, matrix=64)
    data = tmp_path_factory.mktemp("two-series")
    study_uid, thin_uid, thick_uid = thin_source.study_uid, generate_uid(), generate_uid()
    assert thin_source.directory is not None and thick_source.directory is not None
    _restack(list(thin_source.directory.glob("*.dcm")), study_uid, thin_uid, 1.0, data / "study")
    _restack(list(thick_source.directory.glob("*.dcm")), study_uid, thick_uid, 5.0, data / "study")
    truth = PhantomStudy(study_uid, 1, thin_source.nodules)
    write_labels(data / "labels.csv", [truth])
    return data, truth, thin_uid, thick_uid


@pytest.fixture(scope="module")
def demo() -> ModelPackage:
    return load_package("demo")


def test_the_old_rules_disagree_on_this_study(two_series: tuple[Path, PhantomStudy, str, str]) -> None:
    """Guard for the test below: most instances (the lifecycle's old rule) picks the thick series."""
    data, truth, thin_uid, thick_uid = two_series
    [study] = read_studies(dicom_files(data)).values()
    by_count = max(study.series, key=lambda s: len(s.files))
    assert by_count.series_uid == thick_uid and len(by_count.files) == 60
    assert {s.series_uid: len(s.files) for s in study.series} == {thin_uid: 40, thick_uid: 60}


def test_training_and_evaluation_read_the_series_the_node_reads(
    two_series: tuple[Path, PhantomStudy, str, str], demo: ModelPackage
) -> None:
    data, truth, thin_uid, _ = two_series
    files = dicom_files(data / "study")
    random.Random(2).shuffle(files)  # the order files arrived in is no part of the choice
    node = analyse_study(demo, read_study(truth.study_uid, files), "cpu", 32, None, InferenceSettings(), NODE_AE_TITLE)
    assert isinstance(node.outcome, StudyResult)
    assert node.outcome.series_uid == thin_uid and node.outcome.slices == 40

    [trained] = load_studies(data, read_labels(data / "labels.csv"), demo.manifest.input, log=lambda _: None)
    assert trained.series_uid == thin_uid and len(trained.inputs) == 40
    assert trained.slice_labels is not None and len(trained.slice_labels) == 40

    [evaluated] = score_studies(demo, data, data / "labels.csv", torch.device("cpu"), log=lambda _: None)
    assert evaluated.series_uid == thin_uid and evaluated.slices == 40
    assert evaluated.probability == pytest.approx(node.outcome.probability, abs=1e-6)


def test_evaluate_and_infer_give_the_same_probability(
    two_series: tuple[Path, PhantomStudy, str, str], tmp_path: Path
) -> None:
    """Through the CLI, as a user runs both: the evaluated probability is the one `infer` (and the node) reports."""
    data, truth, thin_uid, _ = two_series
    inferred = subprocess.run(
        [TRIAGENODE, "infer", str(data / "study"), "--json", "--device", "cpu"], capture_output=True, text=True,
        timeout=300,
    )
    assert inferred.returncode == 0, inferred.stderr
    [entry] = json.loads(inferred.stdout)
    evaluated = subprocess.run(
        [TRIAGENODE, "model", "evaluate", "--model", "demo", "--data", str(data), "--labels",
         str(data / "labels.csv"), "--device", "cpu", "--out", str(tmp_path / "eval")],
        capture_output=True, text=True, timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    [scored] = json.loads((tmp_path / "eval" / "metrics.json").read_text())["studies_scored"]
    assert entry["series_uid"] == scored["series_uid"] == thin_uid
    assert scored["probability"] == pytest.approx(entry["probability"], abs=1e-6)


def test_the_preference_order_is_the_models_own(two_series: tuple[Path, PhantomStudy, str, str]) -> None:
    data, truth, thin_uid, thick_uid = two_series
    [study] = read_studies(dicom_files(data)).values()

    def chosen(spec: InputSpec) -> str:
        series = select_series(study, spec)
        assert not isinstance(series, NotApplicable), series.reason
        return series.series_uid

    assert chosen(InputSpec()) == thin_uid, "by default the thinnest slices, as the node always chose"
    assert chosen(InputSpec(series_preference=("most_slices",))) == thick_uid
    assert chosen(InputSpec(series_preference=("thickest",))) == thick_uid
    assert chosen(InputSpec(min_slices=50)) == thick_uid
    assert chosen(InputSpec(sop_classes=("1.2.840.10008.5.1.4.1.1.2",))) == thin_uid
    refused = select_series(study, InputSpec(min_slices=61))
    assert isinstance(refused, NotApplicable)
    assert refused.reason == (
        "no CT image series the model can read "
        "(a CT series of 40 slices (needs 61), a CT series of 60 slices (needs 61))"
    )
    assert len(refused.evidence) == 100, "every instance of the study is the evidence of a not-applicable report"
    assert isinstance(select_series(study, InputSpec(modality="MR")), NotApplicable)
    mr_only = select_series(study, InputSpec(sop_classes=(MRImageStorage,)))
    assert isinstance(mr_only, NotApplicable) and "of SOP class 1.2.840.10008.5.1.4.1.1.2" in mr_only.reason


def test_a_tie_is_broken_by_series_uid_not_by_file_order(tmp_path: Path) -> None:
    source = write_phantom_study(tmp_path / "src", seed=3, index=0, positive=False, slices=20, matrix=32)
    assert source.directory is not None
    files = list(source.directory.glob("*.dcm"))
    uids = sorted([generate_uid(), generate_uid()])
    written = [_restack(files, source.study_uid, uid, 2.0, tmp_path / "study" / uid[-8:]) for uid in uids]
    for order in (written[0] + written[1], written[1] + written[0]):
        chosen = select_series(read_study(source.study_uid, order), InputSpec())
        assert not isinstance(chosen, NotApplicable) and chosen.series_uid == uids[0]


def test_the_lifecycles_small_headers_choose_and_lay_out_as_the_nodes_whole_ones(
    two_series: tuple[Path, PhantomStudy, str, str],
) -> None:
    data, *_ = two_series
    files = dicom_files(data)
    [whole] = read_studies(files).values()
    [small] = read_studies(files, whole_headers=False).values()
    for spec in (InputSpec(), InputSpec(series_preference=("most_slices",))):
        a, b = select_series(whole, spec), select_series(small, spec)
        assert not isinstance(a, NotApplicable) and not isinstance(b, NotApplicable)
        assert a.series_uid == b.series_uid and a.files == b.files
        la, lb = layout_series(a.headers), layout_series(b.headers)
        assert la.order == lb.order and la.sop_instance_uids == lb.sop_instance_uids
        assert (la.positions_mm == lb.positions_mm).all() and la.pixel_spacing_mm == lb.pixel_spacing_mm
    assert "PatientName" in whole.headers[0] and "PatientName" not in small.headers[0]


def test_labelled_studies_the_model_cannot_read_are_refused_with_the_reason(
    two_series: tuple[Path, PhantomStudy, str, str],
) -> None:
    data, truth, *_ = two_series
    with pytest.raises(LabelledDataError, match=r"study .*: no CT image series .* \(needs 100\)"):
        labelled_series(data, {truth.study_uid: truth}, InputSpec(min_slices=100))


def test_the_selection_rules_travel_in_the_manifest(tmp_path: Path, demo: ModelPackage) -> None:
    spec = replace(
        demo.manifest.input, sop_classes=("1.2.840.10008.5.1.4.1.1.2",), series_preference=("most_slices", "thinnest")
    )
    path = tmp_path / "rules.tnm"
    save_package(path, replace(demo.manifest, input=spec), demo.network)
    assert read_manifest(path).input == spec
    assert read_manifest(path).to_dict()["input"]["series_preference"] == ["most_slices", "thinnest"]

    bad = tmp_path / "bad.tnm"
    manifest = read_manifest(path).to_dict()
    manifest["input"]["series_preference"] = ["newest"]
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(bad, "w") as target:
        target.writestr("manifest.json", json.dumps(manifest))
        target.writestr("weights.pt", source.read("weights.pt"))
    with pytest.raises(ModelPackageError, match="unknown series preference 'newest'"):
        read_manifest(bad)


def test_infer_writes_the_report_the_worker_path_builds(
    two_series: tuple[Path, PhantomStudy, str, str], demo: ModelPackage, tmp_path: Path
) -> None:
    """`infer --sr-out` and the worker share analyse_study: the same study, the same SR (its UID is its content)."""
    data, truth, *_ = two_series
    result = subprocess.run(
        [TRIAGENODE, "infer", str(data / "study"), "--device", "cpu", "--sr-out", str(tmp_path / "sr.dcm")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    written = dcmread(tmp_path / "sr.dcm")
    analysis = analyse_study(
        demo, read_study(truth.study_uid, dicom_files(data / "study")), "cpu", 32, None, InferenceSettings(),
        NODE_AE_TITLE,
    )
    assert analysis.report is not None and analysis.report_ms > 0
    assert written.SOPInstanceUID == analysis.report.SOPInstanceUID
