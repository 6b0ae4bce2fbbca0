"""Preprocessing throughput: decode + modality LUT + window + resample, in slices/s per core.

    .venv/bin/python tests/bench/preprocess.py [--studies 4] [--slices 64] [--matrix 512]

Writes phantom studies (uncompressed, and JPEG 2000 lossless when the
encoder is installed), then times read_series (decode + LUT + ordering) and
prepare_volume (window + resample to 128x128 with 2.5D context) with torch
limited to one thread, so the figure is per core. Preprocessing must keep up
with the model: compare with tests/bench/train.py's forward rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from triagenode.inference.phantom import write_phantoms
from triagenode.inference.preprocessing import InputSpec, prepare_volume, read_series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--matrix", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        studies = write_phantoms(Path(tmp), args.studies, seed=0, slices=args.slices, matrix=args.matrix)
        spec = InputSpec(matrix=128, slice_context=1)
        read_s = prep_s = 0.0
        slices = 0
        for study in studies:
            files = sorted(study.directory.glob("*.dcm"))
            started = time.perf_counter()
            volume = read_series(files)
            read_s += time.perf_counter() - started
            started = time.perf_counter()
            prepare_volume(volume, spec)
            prep_s += time.perf_counter() - started
            slices += len(files)
        print(f"{slices} slices of {args.matrix}x{args.matrix} CT, one core (torch threads = 1)")
        print(f"decode + modality LUT + ordering : {slices / read_s:8.0f} slices/s")
        print(f"window + resample + 2.5D context : {slices / prep_s:8.0f} slices/s")
        print(f"whole preprocessing              : {slices / (read_s + prep_s):8.0f} slices/s per core")


if __name__ == "__main__":
    main()
