"""A detection model's runtime parts: which images it reads, how an image becomes its input, how a map becomes marks.

Mammography studies come as four images of one series, four series of one
image, or more views, sometimes with the detector's raw For Processing images
beside them; the selection must read every For Presentation view and say why
it skipped the others. The input and the decoding map pixels both ways: a
lesion drawn into a map at a known place must come back as a box on the same
image pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from triagenode.config.settings import ModelRoute
from triagenode.inference.detection import decode_map, image_input, lesion_target, presentation_values, select_images
from triagenode.inference.detection_training import MAMMO_INPUT
from triagenode.inference.model_package import DetectionSpec, Manifest
from triagenode.inference.outcomes import NotApplicable
from triagenode.inference.phantom_mammo import DIGITAL_MAMMOGRAPHY_FOR_PROCESSING, write_mammo_study
from triagenode.inference.routing import ModelRouter, summary_of
from triagenode.inference.studies import dicom_files, read_study


@pytest.fixture(scope="module")
def four_views(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    study = write_mammo_study(tmp_path_factory.mktemp("views"), 3, 0, positive=True, rows=128)
    assert study.directory is not None
    return dicom_files(study.directory)


def _rewrite(files: list[Path], out: Path, change) -> list[Path]:  # noqa: ANN001 - a callable on each data set
    out.mkdir(exist_ok=True)
    written = []
    for index, path in enumerate(files):
        ds = dcmread(path)
        change(index, ds)
        target = out / path.name
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def _for_processing(index: int, ds) -> None:  # noqa: ANN001 - a pydicom Dataset
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DIGITAL_MAMMOGRAPHY_FOR_PROCESSING
    ds.PresentationIntentType = "FOR PROCESSING"


def _uid(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def test_four_images_of_one_series_are_read_as_four_views(four_views: list[Path]) -> None:
    selection = select_images(read_study(_uid(four_views), four_views), MAMMO_INPUT)
    assert not isinstance(selection, NotApplicable)
    assert sorted(image.label for image in selection.images) == ["L CC", "L MLO", "R CC", "R MLO"]
    assert selection.skipped == []


def test_four_series_of_one_image_each_are_read_too(four_views: list[Path], tmp_path: Path) -> None:
    series = {index: str(generate_uid()) for index in range(4)}
    files = _rewrite(four_views, tmp_path, lambda index, ds: setattr(ds, "SeriesInstanceUID", series[index]))
    selection = select_images(read_study(_uid(files), files), MAMMO_INPUT)
    assert not isinstance(selection, NotApplicable)
    assert len(selection.images) == 4 and len({image.series_uid for image in selection.images}) == 4


def test_for_processing_images_are_skipped_each_with_its_reason(four_views: list[Path], tmp_path: Path) -> None:
    def raw_left(index: int, ds) -> None:  # noqa: ANN001 - a pydicom Dataset
        if ds.ImageLaterality == "L":
            _for_processing(index, ds)

    files = _rewrite(four_views, tmp_path, raw_left)
    selection = select_images(read_study(_uid(files), files), MAMMO_INPUT)
    assert not isinstance(selection, NotApplicable)
    assert sorted(image.label for image in selection.images) == ["R CC", "R MLO"]
    assert len(selection.skipped) == 2
    assert all("For Processing" in reason and reason.startswith("L ") for reason in selection.skipped)

    only_raw = _rewrite(four_views, tmp_path / "raw", _for_processing)
    nothing = select_images(read_study(_uid(only_raw), only_raw), MAMMO_INPUT)
    assert isinstance(nothing, NotApplicable)
    assert "no MG image the model can read" in nothing.reason and "For Processing" in nothing.reason


def test_routing_refuses_a_series_of_for_processing_images_with_that_reason(
    four_views: list[Path], tmp_path: Path
) -> None:
    manifest = Manifest("detector", "1", "lesionfcn", task="detection", input=MAMMO_INPUT, detection=DetectionSpec())
    router = ModelRouter([ModelRoute(name="mammo", package="x")], {"mammo": manifest})
    (read,) = router(summary_of(read_study(_uid(four_views), four_views)))
    assert read.matched, read.reason
    files = _rewrite(four_views, tmp_path, _for_processing)
    (refused,) = router(summary_of(read_study(_uid(files), files)))
    assert not refused.matched and "For Processing images only" in refused.reason


def test_the_input_keeps_the_aspect_and_a_drawn_lesion_decodes_to_its_box() -> None:
    values = np.zeros((1000, 800), dtype=np.float32)
    x, scale = image_input(values, MAMMO_INPUT)
    assert scale == pytest.approx(512 / 1000)
    assert x.shape == (1, 1, 512, 416)  # 800 * 0.512 = 409.6 -> 410, padded to a multiple of 8

    spec = DetectionSpec()
    box = (200.0, 320.0, 300.0, 400.0)  # image pixels: x0, y0, x1, y1
    target = lesion_target([(0, box)], (512, 416), scale, spec.output_stride).numpy()
    probabilities = np.zeros((3, *target.shape), dtype=np.float32)
    probabilities[0] = 1.0
    probabilities[1][target == 1] = 0.9  # a mass exactly where the target puts it
    probabilities[0][target == 1] = 0.1
    probabilities[2, 5, 5] = 0.4  # and a fainter calcification candidate elsewhere
    marks = decode_map(probabilities, spec, scale, (1000, 800))
    assert [(kind, round(certainty, 2)) for kind, _, certainty in marks] == [("mass", 0.9), ("calcification", 0.4)]
    found = marks[0][1]
    cell = spec.output_stride / scale  # one output cell, in image pixels
    for got, want in zip(found, box, strict=True):
        assert abs(got - want) <= cell, (found, box)


def test_overlapping_candidates_of_two_classes_keep_the_more_certain() -> None:
    spec = DetectionSpec()
    probabilities = np.zeros((3, 40, 40), dtype=np.float32)
    probabilities[1, 10:16, 10:16] = 0.6
    probabilities[2, 11:15, 11:15] = 0.8
    marks = decode_map(probabilities, spec, 0.5, (320, 320))
    assert [(kind, round(c, 2)) for kind, _, c in marks] == [("calcification", 0.8)]


def test_monochrome1_is_inverted_and_other_bit_depths_come_to_the_window_s_scale() -> None:
    from pydicom import Dataset

    values = np.array([[0.0, 1023.0]], dtype=np.float32)
    header = Dataset()
    header.BitsStored, header.PhotometricInterpretation = 10, "MONOCHROME1"
    # 10 bits, low values bright: 0 is the densest -> the top of a 12-bit scale.
    assert presentation_values(header, values).tolist() == [[4092.0, 0.0]]
    header.PhotometricInterpretation, header.BitsStored = "MONOCHROME2", 14
    assert presentation_values(header, np.array([[16380.0]], dtype=np.float32)).tolist() == [[4095.0]]


def test_images_of_two_detectors_are_seen_at_one_scale() -> None:
    # A 24 x 30 cm detector at 0.07 mm and an 18 x 24 cm one at 0.1 mm: the same mm per input pixel.
    big, small = np.zeros((4096, 3328), dtype=np.float32), np.zeros((2400, 1800), dtype=np.float32)
    x_big, scale_big = image_input(big, MAMMO_INPUT, 0.07)
    x_small, scale_small = image_input(small, MAMMO_INPUT, 0.1)
    assert 0.07 / scale_big == pytest.approx(0.455) and 0.1 / scale_small == pytest.approx(0.455)
    assert x_big.shape[-2] == 632 and x_small.shape[-2] == 528  # 286.7 mm and 240 mm at 0.455 mm, padded to 8
    _, unknown = image_input(small, MAMMO_INPUT)  # no spacing in the header: the longer side is the matrix
    assert unknown == pytest.approx(512 / 2400)


def test_a_training_crop_and_its_augmentation_keep_the_lesion_on_its_target_cells() -> None:
    import torch

    from triagenode.inference.detection_training import LabelledImage, _crop, augment_pair

    spec = DetectionSpec()
    inputs = torch.zeros((1, 256, 256))
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    inputs[0][((yy - 100.5) ** 2 + (xx - 60.5) ** 2) <= 20**2] = 1.0  # a disc of radius 20 input pixels
    box = (40.5, 80.5, 80.5, 120.5)  # its box in image pixels, at scale 1
    target = lesion_target([(0, box)], (256, 256), 1.0, spec.output_stride)
    image = LabelledImage("s", "i", inputs, target, 1.0, (256, 256), [(100, 60)])
    generator = torch.Generator().manual_seed(3)
    for _ in range(8):
        x, t = _crop(image, 128, spec.output_stride, True, generator)
        x, t = augment_pair(x[None], t[None], generator)
        cells = t[0] == 1
        assert cells.any()
        # Every target cell of the lesion lies on the (bright) disc in the augmented image.
        pooled = torch.nn.functional.avg_pool2d(x[:, :1], spec.output_stride)[0, 0]
        assert float(pooled[cells].mean()) > 0.6, "the augmented target moved off its lesion"
        # A flip and a rotation, never a shear: the disc stays round (its second moments equal in every direction).
        disc = (x[0, 0] > 0.5).nonzero().float()
        inside = len(disc) and disc.min() > 0 and disc.max() < 127
        if inside:
            axes = torch.linalg.eigvalsh(torch.cov(disc.T)).sqrt()
            assert float(axes.max() / axes.min()) < 1.1, f"the disc became an ellipse {axes.tolist()}"


def test_bad_detection_data_is_refused_before_any_pixel_is_decoded(tmp_path: Path) -> None:
    from triagenode.inference.detection_evaluation import evaluate_detector
    from triagenode.inference.detection_training import load_labelled_images
    from triagenode.inference.labelled import LabelledDataError
    from triagenode.inference.model_package import load_package
    from triagenode.inference.phantom_mammo import write_mammo_phantoms
    from triagenode.inference.training import TrainingConfig, TrainingError, train

    data = tmp_path / "phantoms"
    write_mammo_phantoms(data, 2, positive_fraction=0.5, seed=8, rows=128)
    labels, lesions = data / "labels.csv", data / "lesions.csv"
    package = load_package("mammo-demo")

    def train_refuses(labels_csv: Path = labels) -> str:
        with pytest.raises(LabelledDataError) as refused:
            load_labelled_images(data, labels_csv, lesions, MAMMO_INPUT, DetectionSpec(), lambda line: None)
        return str(refused.value)

    def evaluation_refuses(labels_csv: Path = labels) -> str:
        with pytest.raises(LabelledDataError) as refused:
            evaluate_detector(package, data, labels_csv, None, log=lambda line: None, lesions_csv=lesions)
        return str(refused.value)

    original = lesions.read_text()
    rows = original.splitlines()
    lesions.write_text("\n".join([rows[0], rows[1].replace(rows[1].split(",")[2], "1.2.3.4.5", 1), *rows[2:]]))
    for refuses in (train_refuses, evaluation_refuses):
        assert "is on image 1.2.3.4.5, which the model does not read" in refuses()

    lesions.write_text(rows[0] + "\n")  # the positive study's boxes gone
    for refuses in (train_refuses, evaluation_refuses):
        assert "is labelled positive but" in refuses() and "gives none of its lesions" in refuses()

    lesions.write_text(original)
    more = tmp_path / "more.csv"
    more.write_text(labels.read_text() + "1.2.826.0.1.3680043.8.498.1,0\n")
    for refuses in (train_refuses, evaluation_refuses):
        assert "1 labelled studies are not under" in refuses(more)

    lesions.unlink()
    for refuses in (train_refuses, evaluation_refuses):
        assert "lesions.csv does not exist" in refuses()

    with pytest.raises(TrainingError, match="is a detector; train it with --task detection"):
        train(TrainingConfig(data_dir=data, labels=labels, out=tmp_path / "c.tnm", arch="lesionfcn"))
