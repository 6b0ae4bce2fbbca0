"""The worker pipeline against the model's pure forward pass, in slices/s, on the same device in the same run.

    .venv/bin/python tests/bench/inference.py [--model demo] [--slices 300] [--matrix 512] [--device auto]
    .venv/bin/python tests/bench/inference.py --arch densenet121 --input-matrix 512 --device cuda

The pipeline is what a worker runs per study: series selection, decode,
modality LUT, preprocessing (in the worker's decoder processes, overlapping
the model), the model in batches, aggregation. The forward
rate is the network alone on preprocessed input already on the device.
Target: the pipeline reaches at least 90% of the forward rate. ``--arch``
measures an untrained network of the registry instead of a package (e.g.
DenseNet-121 at 512x512 on a GPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from triagenode.config.settings import InferenceSettings
from triagenode.inference.architectures import build_network
from triagenode.inference.device import resolve_device
from triagenode.inference.loader import SliceLoader
from triagenode.inference.model_package import Manifest, ModelPackage, load_package
from triagenode.inference.phantom import write_phantom_study
from triagenode.inference.pipeline import run_study
from triagenode.inference.preprocessing import InputSpec, prepare_volume, read_series
from triagenode.inference.studies import slice_probabilities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--arch", help="measure this registry network (untrained) instead of --model")
    parser.add_argument("--input-matrix", type=int, default=512, help="input size with --arch")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512, help="the CT's matrix")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--decoders", type=int, default=-1, help="decoder processes (-1: the node's auto choice)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    decoders = InferenceSettings(decode_processes=args.decoders).decoders()
    if args.arch:
        spec = InputSpec(matrix=args.input_matrix, slice_context=1)
        package = ModelPackage(Manifest(name=args.arch, version="bench", architecture=args.arch, input=spec),
                               build_network(args.arch, spec.channels).eval())
    else:
        package = load_package(args.model)
    package.network.to(device).to(memory_format=torch.channels_last)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory() as tmp, SliceLoader(decoders) as loader:
        study = write_phantom_study(Path(tmp), seed=0, index=0, positive=True, slices=args.slices, matrix=args.matrix)
        files = sorted(study.directory.glob("*.dcm"))  # type: ignore[union-attr]
        inputs = prepare_volume(read_series(files), package.manifest.input).to(device)
        slice_probabilities(package.network, inputs[: args.batch_size], args.batch_size, device)  # warm-up
        forward, pipeline = [], []
        for _ in range(args.repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            slice_probabilities(package.network, inputs, args.batch_size, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            forward.append(len(files) / (time.perf_counter() - started))
            started = time.perf_counter()
            result = run_study(package, study.study_uid, files, device, args.batch_size, loader)
            pipeline.append(len(files) / (time.perf_counter() - started))
    print(f"device: {name}; model {package.manifest.name} at {package.manifest.input.matrix}px; "
          f"study {args.slices} slices of {args.matrix}x{args.matrix}; {decoders} decoder processes")
    print(f"pure forward      {max(forward):8.0f} slices/s")
    print(f"whole pipeline    {max(pipeline):8.0f} slices/s  ({max(pipeline) / max(forward):.0%} of forward)")
    print(f"one study         {args.slices / max(pipeline):8.2f} s   stages (ms): {result.timings_ms}")  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
