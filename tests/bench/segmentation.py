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
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pynetdicom import AE, evt

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from triagenode.inference.device import resolve_device
from triagenode.inference.model_package import load_package
from triagenode.inference.outcomes import StudyResult
from triagenode.inference.phantom_brain import write_brain_study
from triagenode.inference.segmentation import segment_study
from triagenode.inference.studies import dicom_files, read_study

TRIAGENODE = str(Path(sys.executable).parent / "triagenode")
STABLE_SECONDS = 2.0
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33", SEG_CLASS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        result = segment_study(package, read_study(read_uid(files[0]), files), torch_device)
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


def read_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)


def latency(studies: list[Path], model: str, device: str) -> None:
    if shutil.which("storescu") is None:
        print("latency: skipped, storescu not found (install Debian's dcmtk; .ci/run does)")
        return
    arrivals: dict[str, float] = {}
    pacs = AE(ae_title="PACS")
    for sop_class in SR_CLASSES:
        pacs.add_supported_context(sop_class)

    def on_store(event: evt.Event) -> int:
        if str(event.dataset.SOPClassUID) == SEG_CLASS:
            arrivals.setdefault(str(event.dataset.StudyInstanceUID), time.perf_counter())
        return 0

    pacs_port, node_port = free_port(), free_port()
    server = pacs.start_server(("127.0.0.1", pacs_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "node.toml"
        config.write_text(
            f'[node]\nhost = "127.0.0.1"\nport = {node_port}\ndata_dir = "{root / "data"}"\nmin_free_disk_mb = 100\n'
            f"[study]\nstable_seconds = {STABLE_SECONDS}\n"
            f'[inference]\nworkers = 1\ndevice = "{device}"\nmodel = "{model}"\n'
            f'[delivery]\ninitial_backoff_s = 1\n[[destinations]]\nname = "pacs"\nae_title = "PACS"\n'
            f'host = "127.0.0.1"\nport = {pacs_port}\n'
        )
        log = open(root / "node.log", "wb")
        node = subprocess.Popen([TRIAGENODE, "serve", "--config", str(config)], stdout=log, stderr=log)
        latencies = []
        try:
            deadline = time.monotonic() + 120
            while b"worker.ready" not in (root / "node.log").read_bytes():
                if time.monotonic() > deadline or node.poll() is not None:
                    sys.exit(f"the node did not get ready:\n{(root / 'node.log').read_text()[-2000:]}")
                time.sleep(0.2)
            for index, folder in enumerate(studies):
                files = images(folder)
                uid = read_uid(files[0])
                subprocess.run(
                    ["storescu", "-aec", "TRIAGENODE", "127.0.0.1", str(node_port), *map(str, files)],
                    env={**os.environ, "TCP_NODELAY": "1"}, check=True, capture_output=True,
                )
                sent = time.perf_counter()
                while uid not in arrivals:
                    if time.perf_counter() - sent > 300:
                        sys.exit("no SEG within 300 s")
                    time.sleep(0.01)
                latencies.append(arrivals[uid] - sent - STABLE_SECONDS)
                print(f"study {index}: {len(files)} images, SEG {latencies[-1]:.2f} s after completion")
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(60)
            server.shutdown()
    print(f"latency: median {statistics.median(latencies):.2f} s, worst {max(latencies):.2f} s (device {device})")


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
            latency(folders[1 : 1 + min(4, args.studies)], args.model, args.device)


if __name__ == "__main__":
    main()
