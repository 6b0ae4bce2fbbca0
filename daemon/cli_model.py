"""``triagenode phantom``, ``model info/train/evaluate`` and ``infer``: the model's lifecycle and a run without a node.

The only commands that load torch (``model info`` reads the manifest only),
each inside its own function, so the rest of the CLI never does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from triagenode.daemon.cli_shared import EXIT_NO, config_option, fail, json_option, plural, print_json, settings_from

if TYPE_CHECKING:
    from triagenode.inference.model_package import ModelPackage
    from triagenode.inference.pipeline import StudyAnalysis


@click.command()
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--kind", type=click.Choice(["ct", "mammo", "brain-mri"]), default="ct", show_default=True,
    help="ct: chest CT with lung nodules; mammo: four-view screening mammograms with masses and calcifications; "
    "brain-mri: T1, T2 and FLAIR with tumours or white-matter lesions, the truth as a DICOM SEG.",
)
@click.option("--studies", default=10, show_default=True, type=click.IntRange(1), help="How many studies.")
@click.option("--positive-fraction", default=0.5, show_default=True, type=click.FloatRange(0, 1))
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same studies (pixels and UIDs).")
@click.option("--slices", type=click.IntRange(8, 2000),
              help="Slices per series [default: 64 for ct, 28 for brain-mri (at least 16)].")
@click.option(
    "--matrix", type=click.IntRange(64, 4096),
    help="CT: rows and columns (default 256, at most 1024); mammo: rows, the columns keep the detector's aspect "
    "(default 3328: the full field at 0.07 mm).",
)
def phantom(
    out_dir: Path, kind: str, studies: int, positive_fraction: float, seed: int, slices: int | None,
    matrix: int | None,
) -> None:
    """Write synthetic studies (real DICOM, one folder each) and their labels.

    ct: positive studies carry 1-3 lung nodules of 4-25 mm; labels.csv gives each
    study's label and its nodules' positions and diameters. mammo: four views (L/R CC
    and MLO); positive studies carry 1-3 masses or calcification clusters, on both
    views of their breast; labels.csv gives each study's label, lesions.csv each
    lesion's box on each image. For tests, demos and training the demo models; not
    patient data.
    """
    from triagenode.inference.phantom import LABELS_FILE

    if kind == "brain-mri":
        from triagenode.inference.phantom_brain import write_brain_phantoms

        if slices is not None and slices < 16:
            fail(f"--slices {slices}: a brain MRI phantom has at least 16 slices")
        labels = [s.label for s in write_brain_phantoms(out_dir, studies, positive_fraction, seed, slices or 28,
                                                        matrix or 256)]
        files = f"{out_dir / LABELS_FILE} (and each study's truth/seg.dcm)"
    elif kind == "mammo":
        from triagenode.inference.phantom_mammo import FULL_FIELD_ROWS, LESIONS_FILE, write_mammo_phantoms

        labels = [s.label for s in write_mammo_phantoms(out_dir, studies, positive_fraction, seed,
                                                        matrix or FULL_FIELD_ROWS)]
        files = f"{out_dir / LABELS_FILE} and {out_dir / LESIONS_FILE}"
    else:
        from triagenode.inference.phantom import write_phantoms

        if matrix is not None and matrix > 1024:
            fail(f"--matrix {matrix}: a CT phantom has at most 1024 rows and columns")
        labels = [s.label for s in write_phantoms(out_dir, studies, positive_fraction, seed, slices or 64,
                                                  matrix or 256)]
        files = str(out_dir / LABELS_FILE)
    click.echo(f"wrote {plural(len(labels), 'study', 'studies')} ({sum(labels)} positive) and {files}")


@click.group()
def model() -> None:
    """Train, evaluate and inspect model packages (*.tnm)."""


@model.command("info")
@click.argument("package", metavar="FILE")
@json_option
def model_info(package: str, as_json: bool) -> None:
    """Print a model package's manifest (FILE may be 'demo')."""
    from triagenode.inference.model_package import ModelPackageError, package_file, read_manifest

    try:
        manifest = read_manifest(package_file(package))
    except ModelPackageError as exc:
        fail(str(exc))
    data = manifest.to_dict()
    if as_json:
        print_json(data)
        return
    click.echo(f"{manifest.name} {manifest.version} ({manifest.architecture}, created {manifest.created_at})")
    spec = manifest.input
    click.echo(
        f"input:      {spec.modality}, {spec.normalisation} {list(spec.window)}, "
        + (_detection_input(spec.matrix, spec.pixel_spacing_mm) if manifest.task == "detection"
           else f"{spec.matrix}x{spec.matrix}, {spec.channels} channel(s), "
           f"spacing {spec.pixel_spacing_mm or 'whole field of view'}")
    )
    click.echo(
        f"finding:    {manifest.finding.meaning} ({manifest.finding.scheme} {manifest.finding.value}), "
        f"threshold {manifest.threshold}, aggregation {manifest.aggregation}"
    )
    if manifest.detection is not None:
        classes = ", ".join(f"{c.name} ({c.code.meaning}, {c.code.scheme} {c.code.value})"
                            for c in manifest.detection.classes)
        click.echo(f"task:       detection of {classes}; marks at or above the threshold, read image by image")
    click.echo(f"training:   {json.dumps(manifest.training)}")
    click.echo(f"evaluation: {json.dumps(manifest.evaluation) if manifest.evaluation else 'none recorded'}")
    click.echo(f"sha256:     {manifest.weights_sha256}")
    click.echo(f"intended use: {manifest.intended_use or '-'}")


def _detection_input(matrix: int, spacing_mm: float | None) -> str:
    """How a detector sees each image, in words (``model info``)."""
    if spacing_mm:
        return f"each image resampled to {spacing_mm:g} mm per pixel (its longer side at most {2 * matrix})"
    return f"each image scaled to {matrix} pixels on its longer side"


@model.command("train")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--labels", "labels_csv", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--task", type=click.Choice(["classification", "detection", "segmentation"]), default="classification",
    show_default=True,
    help="classification: one probability per study (CT); detection: lesions marked per image (mammography); "
    "segmentation: lesions outlined per voxel (brain MRI).",
)
@click.option(
    "--arch", type=click.Choice(["simplecnn", "resnet18", "densenet121", "lesionfcn", "recurrentunet"]),
    help="The network [default: simplecnn for classification, lesionfcn for detection, recurrentunet for "
    "segmentation].",
)
@click.option(
    "--lesions", "lesions_csv", type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Detection: the lesion boxes [default: lesions.csv next to --labels].",
)
@click.option("--crop", default=256, show_default=True, type=click.IntRange(32, 2048),
              help="Detection: side of the square crops trained on, in input pixels.")
@click.option("--crops-per-epoch", default=1024, show_default=True, type=click.IntRange(1),
              help="Detection: crops drawn per epoch.")
@click.option("--target-fp-per-image", default=0.02, show_default=True, type=click.FloatRange(0),
              help="Detection: the operating threshold is the lowest with at most this many validation false "
              "positives per image.")
@click.option(
    "--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="The package to write (*.tnm)."
)
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--optimizer", default="adam", show_default=True, type=click.Choice(["adam", "sgd"]))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option(
    "--val-fraction", default=0.25, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True)
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--matrix", type=click.IntRange(32, 2048),
    help="Input size [default: 128 for classification; detection: 512, the image's longer side].",
)
@click.option(
    "--slice-context", default=1, show_default=True, type=click.IntRange(0, 5), help="Neighbours as channels."
)
@click.option(
    "--patience",
    default=6,
    show_default=True,
    type=click.IntRange(1),
    help="Early stop after N epochs without a better validation AUC.",
)
@click.option("--slices-per-epoch", default=None, type=click.IntRange(1), help="Cap on slices drawn per epoch.")
@click.option("--name", help="The model's name [default: lung-nodule-triage, or mammo-lesion-detection].")
@click.option("--version", "model_version", default="0.1.0", show_default=True)
@click.option("--intended-use", default="", help="Text stored in the manifest.")
@click.option(
    "--resume", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="Checkpoint (*.ckpt) to go on from."
)
def model_train(
    data_dir: Path,
    labels_csv: Path,
    task: str,
    arch: str | None,
    lesions_csv: Path | None,
    crop: int,
    crops_per_epoch: int,
    target_fp_per_image: float,
    out: Path,
    epochs: int,
    batch_size: int,
    optimizer: str,
    lr: float,
    val_fraction: float,
    seed: int,
    device: str,
    matrix: int | None,
    slice_context: int,
    patience: int,
    slices_per_epoch: int | None,
    name: str | None,
    model_version: str,
    intended_use: str,
    resume: Path | None,
) -> None:
    """Train a CNN on labelled studies and write a model package.

    Classification (CT): labels.csv gives each study's label (and nodule positions, for
    slice-level training). Detection (mammography): labels.csv and lesions.csv, the
    boxes of each lesion on each image, as `triagenode phantom --kind mammo` writes them.
    Writes OUT, OUT.ckpt (after every epoch, for --resume) and OUT.log.jsonl (one line per epoch).
    """
    from dataclasses import replace

    from triagenode.inference.device import DeviceError
    from triagenode.inference.labelled import LabelledDataError
    from triagenode.inference.preprocessing import InputSpec
    from triagenode.inference.training import TrainingConfig, TrainingError, train

    detection = task == "detection"
    if detection and crop % 8:  # before torch is imported: a typo is told at once
        fail(f"--crop {crop}: use a multiple of 8 (the detector halves its input three times)")
    segmentation = task == "segmentation"
    if detection:
        from triagenode.inference.detection_training import MAMMO_INPUT, train_detector

        spec = replace(MAMMO_INPUT, matrix=matrix or MAMMO_INPUT.matrix)
    elif segmentation:
        from triagenode.inference.segmentation_training import BRAIN_INPUT, train_segmenter

        spec = replace(BRAIN_INPUT, matrix=matrix or BRAIN_INPUT.matrix)
    else:
        spec = InputSpec(matrix=matrix or 128, slice_context=slice_context)
    config = TrainingConfig(
        data_dir=data_dir,
        labels=labels_csv,
        out=out,
        arch=arch or ("lesionfcn" if detection else "recurrentunet" if segmentation else "simplecnn"),
        input=spec,
        lesions=lesions_csv,
        crop=crop,
        crops_per_epoch=crops_per_epoch,
        target_fp_per_image=target_fp_per_image,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
        patience=patience,
        name=name or ("mammo-lesion-detection" if detection else "brain-lesion-segmentation" if segmentation
                      else "lung-nodule-triage"),
        version=model_version,
        intended_use=intended_use,
        resume=resume,
        slices_per_epoch=slices_per_epoch,
    )
    try:
        trainer = train_detector if detection else train_segmenter if segmentation else train
        trainer(config, log=lambda line: click.echo(line, err=True))
    except (TrainingError, DeviceError, LabelledDataError, ValueError) as exc:
        fail(str(exc))


@model.command("evaluate")
@click.option("--model", "package", required=True, help="Model package (*.tnm) or 'demo'.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--labels", "labels_csv", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write metrics.json, roc.png, confusion.png (and froc.png for a detector) here.",
)
@click.option(
    "--lesions", "lesions_csv", type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Detection models: the lesion boxes [default: lesions.csv next to --labels].",
)
@click.option("--target-sensitivity", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--device", default="auto", show_default=True)
@click.option("--record", is_flag=True, help="Store this evaluation in the package's manifest.")
@json_option
def model_evaluate(
    package: str,
    data_dir: Path,
    labels_csv: Path,
    out_dir: Path | None,
    lesions_csv: Path | None,
    target_sensitivity: float,
    device: str,
    record: bool,
    as_json: bool,
) -> None:
    """Measure a model on labelled local studies: accuracy, sensitivity, specificity, PPV, NPV, F1, ROC AUC.

    A detection model is also judged as breast-imaging CAD is: FROC (lesion sensitivity at 0.25-4 false
    positives per image, froc.png) and lesion-level recall, precision and F1 (needs lesions.csv).
    """
    from triagenode.inference.device import DeviceError, resolve_device
    from triagenode.inference.evaluation import EvaluationError, evaluate
    from triagenode.inference.model_package import ModelPackageError, load_package

    log = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    try:
        loaded = load_package(package)
        if loaded.manifest.task == "segmentation":
            from triagenode.inference.segmentation_evaluation import evaluate_segmenter

            report = evaluate_segmenter(loaded, data_dir, labels_csv, out_dir, target_sensitivity,
                                        resolve_device(device), record, log)
        elif loaded.manifest.task == "detection":
            from triagenode.inference.detection_evaluation import evaluate_detector

            report = evaluate_detector(loaded, data_dir, labels_csv, out_dir, target_sensitivity,
                                       resolve_device(device), record, log, lesions_csv)
        else:
            report = evaluate(loaded, data_dir, labels_csv, out_dir, target_sensitivity, resolve_device(device),
                              record, log)
    except (ModelPackageError, EvaluationError, DeviceError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        print_json(report)


@click.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@config_option
@click.option(
    "--model",
    "model_path",
    help="A configured model's name, a model package or 'demo' [default: every configured model whose route "
    "the study fits; without [[models]], [inference].model].",
)
@click.option("--device", help="auto, cpu, cuda or cuda:N [default: [inference].device].")
@click.option(
    "--sr-out", type=click.Path(path_type=Path),
    help="Write the reports: a file for one study and one document, else a folder.",
)
@json_option
def infer(
    config_path: Path | None, path: Path, model_path: str | None, device: str | None, sr_out: Path | None, as_json: bool
) -> None:
    """Run the models on DICOM files (a folder or one file) without a daemon and print the result per study.

    The same series selection, preprocessing and aggregation as the node's workers, so the
    number matches what the node reports; with [[models]], each study goes to the models whose
    route it fits, as on the node (one result per study and model). Exits 1 when a study could
    not be read.
    """
    from triagenode.config import ConfigError
    from triagenode.config.settings import IMPLICIT_MODEL, ModelRoute
    from triagenode.inference.device import DeviceError, resolve_device
    from triagenode.inference.model_package import ModelPackageError, load_package
    from triagenode.inference.pipeline import SeriesGeometryError, analyse_study
    from triagenode.inference.routing import ModelRouter, summary_of
    from triagenode.inference.studies import dicom_files, read_studies

    settings = settings_from(config_path)
    inference = settings.inference
    routes = {route.name: route for route in settings.routes()}
    if model_path in routes:
        routes = {model_path: routes[model_path]}
    elif model_path is not None:
        routes = {IMPLICIT_MODEL: ModelRoute(name=IMPLICIT_MODEL, package=model_path)}
    routed = bool(settings.models) and model_path is None
    configured = {entry.name for entry in settings.models}  # their reports get the entry's own series
    packages: dict[str, ModelPackage] = {}
    try:
        router = ModelRouter.from_settings(settings) if routed else None
        torch_device = resolve_device(device or inference.device)
        for route in routes.values():
            if route.package not in packages:
                packages[route.package] = load_package(route.package)
                packages[route.package].network.to(torch_device)
    except (ModelPackageError, DeviceError, ConfigError) as exc:
        fail(str(exc))
    studies = read_studies(dicom_files(path))
    if not studies:
        fail(f"no DICOM files with a Study Instance UID under {path}")
    results: list[dict[str, Any]] = []
    failed = False
    for study_uid, study in studies.items():
        if router is not None:
            decisions = router(summary_of(study))
            names = [d.model for d in decisions if d.matched]
            if not names:
                why = "; ".join(f"{d.model}: {d.reason}" for d in decisions)
                reason = f"no model applies ({why})"
                results.append({"study_uid": study_uid, "status": "not applicable", "reason": reason})
                continue
        else:
            names = list(routes)
        for name in names:
            route, package = routes[name], packages[routes[name].package]
            try:
                analysis = analyse_study(package, study, torch_device, inference.batch_size, None, inference,
                                         settings.node.ae_title, with_report=sr_out is not None,
                                         route=name if name in configured else None, mammo_sr=route.mammo_sr)
            except SeriesGeometryError as exc:
                results.append({"study_uid": study_uid, "route": name, "status": "failed", "reason": str(exc)})
                failed = True
                continue
            results.append(_infer_entry(study_uid, name, package, analysis, sr_out, len(studies) * len(names)))
    if as_json:
        print_json(results)
    else:
        for entry in results:
            written = f"; report {entry['sr']['path']}" if "sr" in entry else ""
            model = f" [{entry['route']}]" if len(routes) > 1 and "route" in entry else ""
            if entry["status"] != "reported":
                click.echo(f"{entry['study_uid']}{model}: {entry['status']}: {entry['reason']}{written}")
                continue
            verdict = "PRESENT" if entry["finding"] else "absent"
            if entry.get("task") == "segmentation":
                outlined = ", ".join(f"{s['label']} {s['volume_ml']:.2f} ml" for s in entry["segments"]) or "nothing"
                click.echo(
                    f"{entry['study_uid']}{model}: {entry['finding_meaning']} {verdict} ({outlined} outlined, "
                    f"highest probability {entry['probability']:.3f}), {plural(entry['slices'], 'slice')}, "
                    f"{entry['timings_ms']['total']:.0f} ms{written}"
                )
                continue
            if entry.get("task") == "detection":
                click.echo(
                    f"{entry['study_uid']}{model}: {entry['finding_meaning']} {verdict}, highest certainty "
                    f"{entry['probability']:.3f} (threshold {entry['threshold']:.3f}), "
                    f"{plural(len(entry['lesions']), 'lesion')} marked on {plural(entry['slices'], 'image')}, "
                    f"{entry['timings_ms']['total']:.0f} ms{written}"
                )
                for number, lesion in enumerate(entry["lesions"], start=1):
                    view = " ".join(part for part in (lesion["laterality"], lesion["view"]) if part) or "image"
                    box = " ".join(f"{value:.1f}" for value in lesion["box"])
                    click.echo(f"  lesion {number}: {lesion['type']}, {view}, box {box}, certainty "
                               f"{lesion['certainty']:.3f} (image {lesion['sop_instance_uid']})")
                for reason in entry["skipped"]:
                    click.echo(f"  skipped: {reason}")
                continue
            click.echo(
                f"{entry['study_uid']}{model}: {entry['finding_meaning']} {verdict}, probability "
                f"{entry['probability']:.3f} (threshold {entry['threshold']:.3f}), "
                f"key slice {entry['key_instance_uid']}, {plural(entry['slices'], 'slice')}, "
                f"{entry['timings_ms']['total']:.0f} ms{written}"
            )
    if failed:
        sys.exit(EXIT_NO)


def _infer_entry(
    study_uid: str, model: str, package: ModelPackage, analysis: StudyAnalysis, sr_out: Path | None, outputs: int
) -> dict[str, Any]:
    """One study's result from one model as ``infer`` prints it, with the report written where asked."""
    from triagenode.config.values import IMPLICIT_MODEL
    from triagenode.inference.pipeline import NotApplicable

    outcome = analysis.outcome
    if isinstance(outcome, NotApplicable):
        entry: dict[str, Any] = {"study_uid": study_uid, "status": "not applicable", "reason": outcome.reason}
    else:
        entry = {"status": "reported", "task": package.manifest.task, **outcome.to_dict()}
        entry["finding_meaning"] = package.manifest.finding.meaning.lower()
    entry["route"] = model  # "model" is the package's own name, as in the node's result
    documents = analysis.reports
    if sr_out is not None and documents:
        written = []
        for number, document in enumerate(documents):
            stem = study_uid if outputs == 1 or model == IMPLICIT_MODEL else f"{study_uid}.{model}"
            # A second document (the Mammography CAD SR beside the TID 1500) is named after its kind.
            name = f"{stem}.dcm" if number == 0 else f"{stem}.{_document_kind(document)}.dcm"
            target = sr_out / name if outputs > 1 or len(documents) > 1 or sr_out.is_dir() else sr_out
            target.parent.mkdir(parents=True, exist_ok=True)
            document.save_as(target, enforce_file_format=True)
            written.append({"path": str(target), "sop_instance_uid": str(document.SOPInstanceUID),
                            "sop_class_uid": str(document.SOPClassUID)})
        entry["sr"] = written[0]
        entry["reports"] = written
    return entry


def _document_kind(document: Any) -> str:
    """A file-name word for a report document's kind: 'mammo-cad', 'seg' or 'sr'."""
    from triagenode.inference.mammo_cad_sr import MAMMOGRAPHY_CAD_SR
    from triagenode.inference.segmentation_report import SEGMENTATION_STORAGE

    kinds = {MAMMOGRAPHY_CAD_SR: "mammo-cad", SEGMENTATION_STORAGE: "seg"}
    return kinds.get(str(document.SOPClassUID), "sr")
