"""The brain segmenter: slices per second through its pipeline, and the time from the last image to the SEG.

    .venv/bin/python tests/bench/segmentation.py [--studies 6] [--slices 28] [--device auto] [--model brain-demo]

1. Pipeline: three-contrast brain phantoms (T1, T2, FLAIR; 256 x 256) through
   :func:`inference.segmentation.segment_study`, the node's own path: contrast
   selection, reading, resampling onto the FLAIR, the recurrent U-Net, the mask
   back on the FLAIR grid. Prints FLAIR slices/s (each with its T1 and T2) after
   one warm-up study.
2. Latency: a node (one worker, the model, stable_seconds=2) and a recording
   destination on loopback; each study's three series sent with DCMTK storescu;
   the time from storescu's end to the SEG's arrival, minus stable_seconds.
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

from triagenode.inference.device import resolve_device
from triagenode.inference.model_package import load_package
from triagenode.inference.outcomes import StudyResult
from triagenode.inference.phantom_brain import write_brain_study
from triagenode.inference.segmentation import segment_study
from triagenode.inference.studies import dicom_files, read_study

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"



def images(folder: Path) -> list[Path]:
    """A study's image files (its ground-truth SEG stays with the benchmark)."""
    return [path for path in dicom_files(folder) if "truth" not in path.parts]


def pipeline(studies: list[Path], model: str, device: str) -> None:
    package = load_package(model)
    torch_device = resolve_device(device)
    package.network.to(torch_device)
    totals: dict[str, float] = {}
    slices = 0
    started = None
    for index, folder in enumerate(studies):
        files = images(folder)
        result = segment_study(package, read_study(study_uid_of(files[0]), files), torch_device)
        assert isinstance(result, StudyResult), result
        if index == 0:  # warm-up
            started = time.perf_counter()
            continue
        slices += result.slices
        for stage, ms in result.timings_ms.items():
            totals[stage] = totals.get(stage, 0.0) + ms
    assert started is not None
    elapsed = time.perf_counter() - started
    stages = ", ".join(f"{stage} {ms / slices:.1f}" for stage, ms in totals.items() if stage != "total")
    print(f"pipeline: {slices} FLAIR slices (x3 contrasts) in {elapsed:.2f} s: {slices / elapsed:.1f} slices/s "
          f"({(len(studies) - 1) / elapsed * 60:.1f} studies/min) on {torch_device}; ms per slice: {stages}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--slices", type=int, default=28)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="brain-demo")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        made = time.perf_counter()
        studies = [write_brain_study(Path(tmp), 9, index, index % 2 == 0, args.slices).directory
                   for index in range(args.studies + 1)]
        print(f"wrote {len(studies)} brain studies of {args.slices} slices in {time.perf_counter() - made:.1f} s")
        folders = [folder for folder in studies if folder is not None]
        pipeline(folders, args.model, args.device)
        if not args.skip_latency:
            studies_to_send = [images(folder) for folder in folders[1 : 1 + min(4, args.studies)]]
            node_latency(studies_to_send, args.model, args.device, "SEG", SEG_CLASS)


if __name__ == "__main__":
    main()
