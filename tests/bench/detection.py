"""The mammography detector: images per second through its pipeline, and the time from the last image to the SR.

    .venv/bin/python tests/bench/detection.py [--studies 8] [--rows 3328] [--device auto] [--model mammo-demo]

1. Pipeline: four-view phantom studies (full field, 3328 x 2560, unless
   ``--rows``) through :func:`inference.detection.detect_study`, the node's own
   path: header read, decode, whole-image input, forward pass, decoding of the
   lesion map. Prints images/s and where the time went (decode, preprocess,
   model, postprocess), after one warm-up study.
2. Latency: a node (one worker, the model, stable_seconds=2) and a recording
   destination on loopback; each four-view study sent with DCMTK storescu;
   the time from storescu's end to the SR's arrival, minus stable_seconds:
   what the node adds once it knows the study is complete.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from node_latency import node_latency, study_uid_of

from triagenode.config.settings import InferenceSettings
from triagenode.inference.detection import detect_study
from triagenode.inference.device import resolve_device
from triagenode.inference.loader import SliceLoader
from triagenode.inference.model_package import load_package
from triagenode.inference.outcomes import StudyResult
from triagenode.inference.phantom_mammo import FULL_FIELD_ROWS, write_mammo_study
from triagenode.inference.studies import dicom_files, read_study


def pipeline(studies: list[Path], model: str, device: str) -> None:
    package = load_package(model)
    torch_device = resolve_device(device)
    package.network.to(torch_device)
    totals: dict[str, float] = {}
    images = 0
    started = None
    settings = InferenceSettings()
    loader = SliceLoader(settings.decoders())  # as a worker of a node on this machine has them
    print(f"decoder processes: {loader.processes} (0: a thread of the worker)")
    for index, folder in enumerate(studies):
        files = dicom_files(folder)
        headers = read_study(study_uid_of(files[0]), files)
        result = detect_study(package, headers, torch_device, settings.batch_size, loader)
        assert isinstance(result, StudyResult), result
        if index == 0:  # warm-up: first forward pass, allocator, oneDNN kernels
            started = time.perf_counter()
            continue
        images += result.slices
        for stage, ms in result.timings_ms.items():
            totals[stage] = totals.get(stage, 0.0) + ms
    assert started is not None
    elapsed = time.perf_counter() - started
    loader.close()
    stages = ", ".join(f"{stage} {ms / images:.1f}" for stage, ms in totals.items() if stage != "total")
    print(f"pipeline: {images} images in {elapsed:.2f} s: {images / elapsed:.2f} images/s "
          f"({images / 4 / elapsed * 60:.1f} four-view studies/min) on {torch_device}; ms per image: {stages}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--rows", type=int, default=FULL_FIELD_ROWS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="mammo-demo")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        made = time.perf_counter()
        studies = [write_mammo_study(Path(tmp), 9, index, index % 2 == 0, args.rows).directory
                   for index in range(args.studies + 1)]
        print(f"wrote {len(studies)} four-view studies of {args.rows} rows in {time.perf_counter() - made:.1f} s")
        folders = [folder for folder in studies if folder is not None]
        pipeline(folders, args.model, args.device)
        if not args.skip_latency:
            studies_to_send = [dicom_files(folder) for folder in folders[1 : 1 + min(4, args.studies)]]
            node_latency(studies_to_send, args.model, args.device, "SR")


if __name__ == "__main__":
    main()
