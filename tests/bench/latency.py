"""Triage latency: from the last instance's C-STORE response to the report arriving at the destination.

    .venv/bin/python tests/bench/latency.py [--studies 3] [--slices 300] [--device auto]

Starts a node (one worker, the demo model, stable_seconds=2) and a recording
destination on loopback, sends each 300-slice CT study with DCMTK storescu,
and prints, per study and as median and worst, the time from storescu's end
to the SR's arrival minus stable_seconds: what the node adds after it knows
the study is complete (completion check, lease, decode, preprocess, model,
report, delivery).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComprehensiveSRStorage

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from triagenode.inference.phantom import write_phantom_study

TRIAGENODE = str(Path(sys.executable).parent / "triagenode")
STABLE_SECONDS = 2.0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        sys.exit("storescu not found: install Debian's dcmtk (.ci/run does)")
    arrivals: dict[str, float] = {}
    pacs = AE(ae_title="PACS")
    for sop_class in (Comprehensive3DSRStorage, ComprehensiveSRStorage):
        pacs.add_supported_context(sop_class)

    def on_store(event: evt.Event) -> int:
        arrivals[str(event.dataset.StudyInstanceUID)] = time.perf_counter()
        return 0

    pacs_port, node_port = free_port(), free_port()
    server = pacs.start_server(("127.0.0.1", pacs_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "node.toml"
        config.write_text(
            f'[node]\nhost = "127.0.0.1"\nport = {node_port}\ndata_dir = "{root / "data"}"\nmin_free_disk_mb = 100\n'
            f"[study]\nstable_seconds = {STABLE_SECONDS}\n"
            f'[inference]\nworkers = 1\ndevice = "{args.device}"\n'
            f'[delivery]\ninitial_backoff_s = 1\n[[destinations]]\nname = "pacs"\nae_title = "PACS"\n'
            f'host = "127.0.0.1"\nport = {pacs_port}\n'
        )
        log = open(root / "node.log", "wb")
        node = subprocess.Popen([TRIAGENODE, "serve", "--config", str(config)], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 120
            while b"worker.ready" not in (root / "node.log").read_bytes():
                if time.monotonic() > deadline or node.poll() is not None:
                    sys.exit(f"the node did not get ready:\n{(root / 'node.log').read_text()[-2000:]}")
                time.sleep(0.2)
            latencies = []
            for index in range(args.studies):
                study = write_phantom_study(root / "studies", 5, index, index % 2 == 0, args.slices, args.matrix)
                files = sorted(study.directory.glob("*.dcm"))  # type: ignore[union-attr]
                subprocess.run(
                    ["storescu", "-aec", "TRIAGENODE", "127.0.0.1", str(node_port), *map(str, files)],
                    env={**os.environ, "TCP_NODELAY": "1"}, check=True, capture_output=True,
                )
                sent = time.perf_counter()
                while study.study_uid not in arrivals:
                    if time.perf_counter() - sent > 300:
                        sys.exit("no report within 300 s")
                    time.sleep(0.01)
                latency = arrivals[study.study_uid] - sent - STABLE_SECONDS
                latencies.append(latency)
                print(f"study {index}: {len(files)} slices, report {latency:.2f} s after completion")
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(60)
            server.shutdown()
    print(f"median {statistics.median(latencies):.2f} s, worst {max(latencies):.2f} s (device {args.device})")


if __name__ == "__main__":
    main()
