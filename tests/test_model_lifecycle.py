"""Phantoms, preprocessing, the model package, training and evaluation, through the CLI where a user would."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread
from pydicom.data import get_testdata_file

from triagenode.inference.architectures import build_network
from triagenode.inference.model_package import Manifest, ModelPackageError, load_package, read_manifest, save_package
from triagenode.inference.phantom import read_labels, write_phantoms
from triagenode.inference.preprocessing import (
    InputSpec,
    SeriesGeometryError,
    prepare_volume,
    read_series,
    volume_from_datasets,
)

from nodes import TRIAGENODE


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    result = subprocess.run(
        [TRIAGENODE, "phantom", str(out), "--studies", "8", "--seed", "5", "--slices", "24", "--matrix", "128"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 8 studies (4 positive)" in result.stdout
    return out


def test_phantoms_are_real_ct_with_labels_and_deterministic(phantoms: Path, tmp_path: Path) -> None:
    labels = read_labels(phantoms / "labels.csv")
    assert len(labels) == 8 and sum(s.label for s in labels.values()) == 4
    for study in labels.values():
        assert (len(study.nodules) > 0) == bool(study.label)
        assert all(4.0 <= n.diameter <= 25.0 for n in study.nodules)
    first = sorted((phantoms / "study_00000").glob("*.dcm"))
    assert len(first) == 24
    ds = dcmread(first[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
    assert ds.RescaleIntercept == -1024 and ds.StudyInstanceUID in labels
    assert (ds.Rows, ds.Columns) == (128, 128)
    hu = ds.pixel_array.astype(float) - 1024
    assert hu.min() < -900 and hu.max() > 300, "air outside, bone in the spine"

    again = write_phantoms(tmp_path / "again", 2, seed=5, slices=24, matrix=128)
    assert again[0].study_uid == ds.StudyInstanceUID
    assert (tmp_path / "again/study_00000" / first[5].name).read_bytes() == first[5].read_bytes()


def test_read_series_orders_by_position_not_by_file_or_instance_number(phantoms: Path) -> None:
    files = sorted((phantoms / "study_00001").glob("*.dcm"))
    shuffled = files[:]
    random.Random(3).shuffle(shuffled)
    datasets = [dcmread(p) for p in shuffled]
    for ds in datasets:  # instance numbers that lie
        ds.InstanceNumber = random.Random(ds.SOPInstanceUID).randint(1, 999)
    volume = volume_from_datasets(datasets)
    assert np.all(np.diff(volume.positions_mm) > 0)
    reference = read_series(files)
    assert np.array_equal(volume.values, reference.values)
    assert volume.slice_spacing_mm == pytest.approx(2.5)
    first = dcmread(files[0])
    assert volume.values[0] == pytest.approx(first.pixel_array.astype(np.float32) - 1024)


def test_inconsistent_geometry_is_refused_with_a_reason(phantoms: Path) -> None:
    files = sorted((phantoms / "study_00002").glob("*.dcm"))
    with pytest.raises(SeriesGeometryError, match="slice spacing varies"):
        read_series(files[:5] + files[7:])
    datasets = [dcmread(p) for p in files[:4]]
    datasets[1].ImagePositionPatient = datasets[0].ImagePositionPatient
    with pytest.raises(SeriesGeometryError, match="share a slice position"):
        volume_from_datasets(datasets)
    datasets = [dcmread(p) for p in files[:4]]
    datasets[2].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    with pytest.raises(SeriesGeometryError, match="another Image Orientation"):
        volume_from_datasets(datasets)


def test_preprocessing_window_resample_and_context(phantoms: Path) -> None:
    volume = read_series(sorted((phantoms / "study_00003").glob("*.dcm")))
    x = prepare_volume(volume, InputSpec(matrix=64, slice_context=1))
    assert x.shape == (24, 3, 64, 64) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(x[5, 1], prepare_volume(volume, InputSpec(matrix=64))[5, 0])
    assert torch.equal(x[0, 0], x[0, 1]), "the first slice repeats as its missing neighbour"
    spaced = prepare_volume(volume, InputSpec(matrix=200, pixel_spacing_mm=2.0, denoise="median"))
    assert spaced.shape == (24, 1, 200, 200)
    z = prepare_volume(volume, InputSpec(normalisation="zscore", denoise="gaussian"))
    assert abs(float(z.mean())) < 0.1


@pytest.mark.parametrize(
    "spec",
    [
        InputSpec(matrix=64, slice_context=1),
        InputSpec(matrix=200, pixel_spacing_mm=2.0, denoise="median", slice_context=2),
        InputSpec(normalisation="zscore", denoise="gaussian", matrix=96),
    ],
    ids=["window-2.5d", "spacing-median", "zscore"],
)
def test_the_node_sees_exactly_what_training_sees_with_or_without_decoder_processes(
    phantoms: Path, spec: InputSpec
) -> None:
    """Workers decode runs of slices in other processes and batch them as they come; not one value may differ."""
    from triagenode.inference.loader import DecodeTimings, SliceLoader
    from triagenode.inference.preprocessing import layout_series

    files = sorted((phantoms / "study_00003").glob("*.dcm"))
    random.Random(3).shuffle(files)
    expected = prepare_volume(read_series(files), spec)
    layout = layout_series([dcmread(path, stop_before_pixels=True) for path in files])
    ordered = [files[i] for i in layout.order]
    shared_before = set(Path("/dev/shm").glob("psm_*"))
    for processes in (0, 2):
        timings = DecodeTimings()
        with SliceLoader(processes) as loader:
            batches = list(loader.batches(ordered, layout, spec, 5, timings))
        assert [len(b) for b in batches] == [5, 5, 5, 5, 4]
        assert torch.equal(torch.cat(batches), expected), f"{processes} decoder processes"
        assert timings.decode_ms > 0 and timings.preprocess_ms > 0
    left = set(Path("/dev/shm").glob("psm_*")) - shared_before
    assert not left, f"the shared volumes are unlinked, not {left}"


def test_a_decoder_that_dies_fails_that_series_and_the_next_gets_fresh_decoders(tmp_path: Path) -> None:
    import os
    import signal
    from concurrent.futures.process import BrokenProcessPool

    from triagenode.inference.loader import DecodeTimings, SliceLoader, pool_is_broken
    from triagenode.inference.phantom import write_phantom_study
    from triagenode.inference.preprocessing import layout_series

    study = write_phantom_study(tmp_path, seed=8, index=0, positive=False, slices=320, matrix=256)
    files = sorted(study.directory.glob("*.dcm"))  # type: ignore[union-attr] # 20 runs: most still pending
    layout = layout_series([dcmread(path, stop_before_pixels=True) for path in files])
    ordered = [files[i] for i in layout.order]
    with SliceLoader(2) as loader:
        decoders = set(loader._pool._processes)  # type: ignore[union-attr]
        batches = loader.batches(ordered, layout, InputSpec(), 4, DecodeTimings())
        next(batches)
        assert not pool_is_broken(loader._pool)  # type: ignore[arg-type]
        os.kill(min(decoders), signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):
            list(batches)
        assert pool_is_broken(loader._pool), "concurrent.futures' private _broken no longer says so"  # type: ignore[arg-type]
        again = torch.cat(list(loader.batches(ordered, layout, InputSpec(), 4, DecodeTimings())))
        assert not set(loader._pool._processes) & decoders  # type: ignore[union-attr]
    assert torch.equal(again, prepare_volume(read_series(files), InputSpec()))


def test_compressed_pixel_data_decodes_through_pylibjpeg() -> None:
    volume = read_series([Path(get_testdata_file("MR_small_jp2klossless.dcm"))])
    plain = read_series([Path(get_testdata_file("MR_small.dcm"))])
    assert np.array_equal(volume.values, plain.values)


def test_model_package_round_trip_and_refusals(tmp_path: Path) -> None:
    network = build_network("simplecnn", 3)
    manifest = Manifest(name="t", version="1.2.3", architecture="simplecnn", input=InputSpec(slice_context=1))
    path = tmp_path / "m.tnm"
    save_package(path, manifest, network)
    loaded = load_package(path)
    assert loaded.manifest.version == "1.2.3" and loaded.manifest.input.channels == 3
    x = torch.rand(2, 3, 128, 128)
    network.eval()
    assert torch.allclose(loaded.network(x), network(x))
    with zipfile.ZipFile(path) as archive:
        weights = archive.read("weights.pt")
    assert read_manifest(path).weights_sha256 == hashlib.sha256(weights).hexdigest()

    tampered = tmp_path / "tampered.tnm"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(tampered, "w") as target:
        target.writestr("manifest.json", source.read("manifest.json"))
        target.writestr("weights.pt", weights[:-8] + b"\0" * 8)
    with pytest.raises(ModelPackageError, match="SHA-256 .* damaged or was altered"):
        load_package(tampered)

    unknown = tmp_path / "unknown.tnm"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(unknown, "w") as target:
        data = json.loads(source.read("manifest.json"))
        data["architecture"] = "vit-giant"
        target.writestr("manifest.json", json.dumps(data))
        target.writestr("weights.pt", source.read("weights.pt"))
    with pytest.raises(ModelPackageError, match="'vit-giant' is not known"):
        load_package(unknown)
    (tmp_path / "junk.tnm").write_bytes(b"not a zip")
    with pytest.raises(ModelPackageError, match="not a model package"):
        load_package(tmp_path / "junk.tnm")
    result = subprocess.run([TRIAGENODE, "model", "info", str(tmp_path / "junk.tnm")], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1


def test_train_one_epoch_then_evaluate_end_to_end_on_cpu(phantoms: Path, tmp_path: Path) -> None:
    model = tmp_path / "tiny.tnm"
    train = subprocess.run(
        [TRIAGENODE, "model", "train", "--data", str(phantoms), "--labels", str(phantoms / "labels.csv"),
         "--out", str(model), "--epochs", "1", "--val-fraction", "0.5", "--device", "cpu", "--matrix", "64",
         "--slices-per-epoch", "256", "--seed", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert train.returncode == 0, train.stderr
    assert "epoch 1/1" in train.stderr and model.is_file()
    log = [json.loads(line) for line in model.with_suffix(".log.jsonl").read_text().splitlines()]
    assert log[0]["epoch"] == 1 and "val_auc" in log[0]
    manifest = read_manifest(model)
    assert manifest.training["training_studies"] == 4 and manifest.training["validation_studies"] == 4
    assert manifest.input.matrix == 64 and 0.0 <= manifest.threshold <= 1.0

    out = tmp_path / "eval"
    evaluated = subprocess.run(
        [TRIAGENODE, "model", "evaluate", "--model", str(model), "--data", str(phantoms),
         "--labels", str(phantoms / "labels.csv"), "--out", str(out), "--device", "cpu", "--record"],
        capture_output=True, text=True, timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert "ROC AUC" in evaluated.stdout and "confusion matrix" in evaluated.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["studies"] == 8 and metrics["positives"] == 4
    assert len(metrics["studies_scored"]) == 8
    assert (out / "roc.png").stat().st_size > 1000 and (out / "confusion.png").stat().st_size > 1000
    assert read_manifest(model).evaluation["studies"] == 8, "--record stores the evaluation"
    load_package(model)  # still loads: the checksum was rewritten with the manifest


def test_training_is_deterministic_for_a_seed_on_cpu(phantoms: Path, tmp_path: Path) -> None:
    from triagenode.inference.training import TrainingConfig, train

    digests = []
    for run in range(2):
        config = TrainingConfig(
            phantoms, phantoms / "labels.csv", tmp_path / f"run{run}.tnm", epochs=1, input=InputSpec(matrix=48),
            val_fraction=0.5, seed=7, device="cpu", slices_per_epoch=64,
        )
        digests.append(train(config, log=lambda _line: None).weights_sha256)
    assert digests[0] == digests[1]


def test_the_demo_model_is_small_evaluated_and_says_what_it_is_not() -> None:
    from triagenode.inference.model_package import DEMO_MODEL

    assert DEMO_MODEL.stat().st_size < 5 * 1024 * 1024
    package = load_package("demo")
    manifest = package.manifest
    assert manifest.architecture == "simplecnn" and manifest.input.matrix == 128
    assert "Not for clinical use" in manifest.intended_use and "phantoms" in manifest.intended_use
    evaluation = manifest.evaluation
    assert evaluation["studies"] == 200, "evaluated on 200 held-out phantom studies"
    assert evaluation["auc"] >= 0.95
    assert 0.0 < manifest.threshold < 1.0
    shown = subprocess.run([TRIAGENODE, "model", "info", "demo", "--json"], capture_output=True, text=True)
    assert shown.returncode == 0 and json.loads(shown.stdout)["weights_sha256"] == manifest.weights_sha256


def test_the_demo_model_finds_nodules_in_fresh_phantoms(phantoms: Path) -> None:
    """Studies it never saw (another seed, another matrix): positives score above negatives."""
    from triagenode.inference.studies import aggregate, slice_probabilities

    package = load_package("demo")
    labels = read_labels(phantoms / "labels.csv")
    scores = {0: [], 1: []}
    for index in range(8):
        files = sorted((phantoms / f"study_{index:05d}").glob("*.dcm"))
        uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        inputs = prepare_volume(read_series(files), package.manifest.input)
        scores[labels[uid].label].append(aggregate(slice_probabilities(package.network, inputs)))
    assert np.mean(scores[1]) > np.mean(scores[0])


def test_training_resumes_from_its_checkpoint(phantoms: Path, tmp_path: Path) -> None:
    from triagenode.inference.training import TrainingConfig, train

    out = tmp_path / "resumed.tnm"
    common = dict(input=InputSpec(matrix=48), val_fraction=0.5, seed=3, device="cpu", slices_per_epoch=64)
    train(TrainingConfig(phantoms, phantoms / "labels.csv", out, epochs=1, **common), log=lambda _line: None)
    lines: list[str] = []
    manifest = train(
        TrainingConfig(phantoms, phantoms / "labels.csv", out, epochs=2, resume=out.with_suffix(".ckpt"), **common),
        log=lines.append,
    )
    assert any("resumed from" in line and "after epoch 1" in line for line in lines)
    assert [json.loads(line)["epoch"] for line in out.with_suffix(".log.jsonl").read_text().splitlines()] == [1, 2]
    assert manifest.training["epochs_run"] == 2


def test_without_nodule_positions_training_uses_multiple_instance_learning(phantoms: Path, tmp_path: Path) -> None:
    labels = tmp_path / "study-labels.csv"
    rows = (phantoms / "labels.csv").read_text().splitlines()
    labels.write_text("\n".join(["study_uid,label"] + [",".join(row.split(",")[:2]) for row in rows[1:]]) + "\n")
    from triagenode.inference.training import TrainingConfig, train

    lines: list[str] = []
    manifest = train(
        TrainingConfig(phantoms, labels, tmp_path / "mil.tnm", epochs=1, input=InputSpec(matrix=48), val_fraction=0.5,
                       seed=0, device="cpu"),
        log=lines.append,
    )
    assert any("multiple-instance learning" in line for line in lines)
    assert manifest.training["labels"] == "study-level (multiple-instance)"


@pytest.mark.parametrize("arch", ["simplecnn", "resnet18", "densenet121"])
def test_every_registered_architecture_packages_and_loads(arch: str, tmp_path: Path) -> None:
    network = build_network(arch, 3)
    path = tmp_path / f"{arch}.tnm"
    save_package(path, Manifest(name=arch, version="1", architecture=arch, input=InputSpec(slice_context=1)), network)
    loaded = load_package(path)
    assert loaded.network(torch.rand(1, 3, 64, 64)).shape == (1, 2)


def test_labels_that_name_missing_studies_are_a_clear_error(phantoms: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text((phantoms / "labels.csv").read_text() + "1.2.3.4.5,1,\n")
    for command in (["train", "--out", str(tmp_path / "x.tnm")], ["evaluate", "--model", "demo"]):
        result = subprocess.run(
            [TRIAGENODE, "model", *command, "--data", str(phantoms), "--labels", str(labels), "--device", "cpu"],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 1
        assert "1 labelled studies are not under" in result.stderr and "1.2.3.4.5" in result.stderr
