"""A segmentation model's runtime parts: recognising its contrasts, and putting every series on one grid.

Sites name their series in many ways; the manifest's rules find each contrast
by its description and sequence parameters, and a study without one is not
applicable, naming it. The series are then resampled onto the reference
(FLAIR) grid by their geometry: a linear function of the patient position,
sampled on a T1 of another matrix, slice positions and orientation, must
come out on the FLAIR grid as the same function.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid

from triagenode.inference.outcomes import NotApplicable
from triagenode.inference.segmentation import ContrastRule, Grid, resample_onto, select_contrasts, voxel_volume_ml
from triagenode.inference.studies import SeriesCandidate, StudyHeaders

RULES = (
    ContrastRule("FLAIR", series_description=r"flair", inversion_time_ms=(1500, None)),
    ContrastRule("T2", series_description=r"\bt2\b", echo_time_ms=(60, None)),
    ContrastRule("T1", series_description=r"\bt1\b", echo_time_ms=(None, 30)),
)


def headers(description: str, slices: int, matrix: int, spacing: float, thickness: float, first_z: float,
            orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0), **timing: float) -> list[Dataset]:
    """An axial (or tilted) series covering a 200 mm field of view: geometry and sequence timing only."""
    series_uid = generate_uid()
    row, column = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, column)
    out = []
    for k in range(slices):
        ds = Dataset()
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = description
        ds.Modality = "MR"
        ds.Rows = ds.Columns = matrix
        ds.PixelSpacing = [spacing, spacing]
        ds.ImageOrientationPatient = list(orientation)
        corner = -100.0 * row - 100.0 * column + (first_z + k * thickness) * normal
        ds.ImagePositionPatient = [round(float(v), 4) for v in corner]
        for keyword, value in timing.items():
            setattr(ds, keyword, value)
        out.append(ds)
    return out[::-1]  # files come in any order: the geometry orders them


def study_of(*series: list[Dataset]) -> StudyHeaders:
    study = StudyHeaders("1.2.3")
    for members in series:
        study.series.append(SeriesCandidate("1.2.3", str(members[0].SeriesInstanceUID), "MR", [], None, (),
                                            frozenset({"1.2.840.10008.5.1.4.1.1.4"}), True, members))
        study.series[-1].files = [f"f{i}" for i in range(len(members))]  # type: ignore[misc]
    return study


def test_each_contrast_is_found_by_its_rule_and_a_missing_one_is_named() -> None:
    flair = headers("AX FLAIR", 10, 32, 6.25, 4.0, -20, EchoTime=120, RepetitionTime=9000, InversionTime=2500)
    t2 = headers("T2 TSE AX", 10, 32, 6.25, 4.0, -20, EchoTime=100, RepetitionTime=5000)
    t1 = headers("t1 se ax", 10, 32, 6.25, 4.0, -20, EchoTime=12, RepetitionTime=500)
    chosen = select_contrasts(study_of(t1, t2, flair), "MR", RULES)
    assert not isinstance(chosen, NotApplicable)
    assert {name: s.headers[0].SeriesDescription for name, s in chosen.items()} == {
        "FLAIR": "AX FLAIR", "T2": "T2 TSE AX", "T1": "t1 se ax"}
    assert list(chosen) == ["FLAIR", "T2", "T1"]  # the first is the reference grid

    missing = select_contrasts(study_of(t1, flair), "MR", RULES)
    assert isinstance(missing, NotApplicable)
    assert missing.reason.startswith("no T2 series among the study's MR series"), missing.reason
    assert "t1 se ax" in missing.reason and "needs FLAIR, T2, T1" in missing.reason

    # A FLAIR-described series whose inversion time does not fit a FLAIR is not taken for one.
    fake = headers("FLAIR", 10, 32, 6.25, 4.0, -20, EchoTime=120, RepetitionTime=9000, InversionTime=200)
    assert isinstance(select_contrasts(study_of(fake, t2, t1), "MR", RULES), NotApplicable)
    assert ContrastRule("X").refusal(flair[0]) == "the rule has no condition"


def test_a_series_of_another_matrix_and_slices_lands_on_the_reference_grid_by_geometry() -> None:
    flair = headers("FLAIR", 12, 40, 5.0, 4.0, -24)
    t1 = headers("T1", 9, 25, 8.0, 6.0, -30)  # another matrix, spacing, slice thickness and positions
    target, source = Grid.of(flair), Grid.of(t1)

    def field(points: np.ndarray) -> np.ndarray:
        return points[..., 0] + 2 * points[..., 1] + 3 * points[..., 2]  # linear: trilinear sampling is exact

    moved = resample_onto(field(source.points()), source, target)
    expected = field(target.points())
    indices = source.indices_of(target.points())
    inside = ((indices >= 0) & (indices <= np.array(source.shape) - 1)).all(-1)  # within the T1's own voxels
    assert inside.sum() > 10000
    np.testing.assert_allclose(moved[inside], expected[inside], atol=1e-3)
    assert voxel_volume_ml(target) == pytest.approx(5.0 * 5.0 * 4.0 / 1000)


def test_a_tilted_series_is_resampled_by_its_orientation() -> None:
    flair = headers("FLAIR", 12, 40, 5.0, 4.0, -24)
    angle = np.deg2rad(10)
    tilted = (1, 0, 0, 0, float(np.cos(angle)), float(np.sin(angle)))  # rotated about x, as an angled acquisition
    t2 = headers("T2", 16, 48, 5.0, 3.0, -24, orientation=tilted)
    target, source = Grid.of(flair), Grid.of(t2)

    def field(points: np.ndarray) -> np.ndarray:
        return 0.5 * points[..., 0] - points[..., 1] + 4 * points[..., 2]

    moved = resample_onto(field(source.points()), source, target)
    indices = source.indices_of(target.points())
    inside = ((indices >= 0) & (indices <= np.array(source.shape) - 1)).all(-1)
    assert inside.sum() > 1000
    np.testing.assert_allclose(moved[inside], field(target.points())[inside], atol=1e-3)


def test_a_brain_study_is_segmented_on_its_flair_grid_and_a_missing_contrast_is_named(tmp_path) -> None:  # noqa: ANN001
    import shutil

    import torch

    from triagenode.inference.architectures import build_network
    from triagenode.inference.input_spec import InputSpec
    from triagenode.inference.model_package import LESION, Manifest, ModelPackage, SegmentationSpec
    from triagenode.inference.phantom_brain import write_brain_study
    from triagenode.inference.pipeline import score_study
    from triagenode.inference.studies import dicom_files, read_study

    study = write_brain_study(tmp_path, 4, 0, positive=True, slices=16, matrix=64)
    assert study.directory is not None
    torch.manual_seed(0)
    manifest = Manifest("brain-test", "0", "recurrentunet", task="segmentation", finding=LESION,
                        input=InputSpec(modality="MR", matrix=64, min_slices=8), segmentation=SegmentationSpec(),
                        architecture_params={"width": 4})
    package = ModelPackage(manifest, build_network("recurrentunet", 3, 2, {"width": 4}).eval())
    images = [path for path in dicom_files(study.directory) if "truth" not in path.parts]
    result = score_study(package, read_study(study.study_uid, images))
    assert not isinstance(result, NotApplicable), result
    assert result.mask is not None and result.mask.labels.shape == (16, 64, 64)
    flair = result.mask.source_headers
    assert {str(ds.SeriesInstanceUID) for ds in flair} == {study.series_uids["FLAIR"]}
    positions = [float(ds.ImagePositionPatient[2]) for ds in flair]
    assert positions == sorted(positions)
    [segment] = result.segments
    voxel_ml = (230 / 64) ** 2 * 5.0 / 1000  # a 230 mm field of view over 64 pixels, 5 mm slices
    assert segment.voxels == int((result.mask.labels == 1).sum())
    assert segment.volume_ml == pytest.approx(segment.voxels * voxel_ml, rel=1e-3)
    assert result.finding == (segment.volume_ml >= 1.0)

    shutil.rmtree(study.directory / "T2")
    without = [path for path in dicom_files(study.directory) if "truth" not in path.parts]
    missing = score_study(package, read_study(study.study_uid, without))
    assert isinstance(missing, NotApplicable) and missing.reason.startswith("no T2 series"), missing


def test_evaluation_measures_the_node_s_masks_against_the_truth_seg(tmp_path) -> None:  # noqa: ANN001
    import json

    import torch

    from triagenode.inference.architectures import build_network
    from triagenode.inference.input_spec import InputSpec
    from triagenode.inference.model_package import LESION, Manifest, SegmentationSpec, load_package, save_package
    from triagenode.inference.phantom_brain import write_brain_phantoms
    from triagenode.inference.segmentation_evaluation import evaluate_segmenter

    data = tmp_path / "brains"
    write_brain_phantoms(data, 2, positive_fraction=0.5, seed=6, slices=16, matrix=64)
    torch.manual_seed(0)
    manifest = Manifest("brain-test", "0", "recurrentunet", task="segmentation", finding=LESION,
                        input=InputSpec(modality="MR", normalisation="zscore", matrix=64, min_slices=8),
                        segmentation=SegmentationSpec(), architecture_params={"width": 4})
    save_package(tmp_path / "brain.tnm", manifest, build_network("recurrentunet", 3, 2, {"width": 4}))
    report = evaluate_segmenter(load_package(tmp_path / "brain.tnm"), data, data / "labels.csv", tmp_path / "eval",
                                log=lambda line: None)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["task"] == "segmentation" and len(written["studies_scored"]) == 2
    assert {"dice_mean", "dice_ci95", "dice_mean_large", "hausdorff95_median_mm", "lesion_recall",
            "lesion_precision", "volume_error_ml_mean_abs", "voxel_accuracy", "voxel_recall"} <= set(report["summary"])
    assert {"sensitivity", "specificity", "auc"} <= set(report["triage"])
    truth_ml = sorted(study["truth_ml"] for study in written["studies_scored"])
    assert truth_ml[0] == 0 and truth_ml[1] > 0  # the negative and the positive, from their SEGs
    assert (tmp_path / "eval" / "overlay_1.png").read_bytes()[:4] == b"\x89PNG"
