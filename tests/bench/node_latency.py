"""The benchmarks' shared harness: a node and a recording destination on loopback, and the time to a report.

Starts ``triagenode serve`` (one worker, the given model, stable_seconds=2)
and a pynetdicom destination, sends each study with DCMTK storescu, and
measures from storescu's end to the arrival of the study's first document of
``arrival_class`` (any class when None), minus stable_seconds: what the node
adds once it knows the study is complete.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, evt

TRIAGENODE = str(Path(sys.executable).parent / "triagenode")
STABLE_SECONDS = 2.0
REPORT_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.50",  # Mammography CAD SR
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def study_uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)


def node_latency(studies: Sequence[Sequence[Path]], model: str, device: str, what: str = "report",
                 arrival_class: str | None = None) -> None:
    """Send each study (its files) to a fresh node and print the time to its ``what`` at the destination."""
    if shutil.which("storescu") is None:
        print("latency: skipped, storescu not found (install Debian's dcmtk; .ci/run does)")
        return
    arrivals: dict[str, float] = {}
    pacs = AE(ae_title="PACS")
    for sop_class in REPORT_CLASSES:
        pacs.add_supported_context(sop_class)

    def on_store(event: evt.Event) -> int:
        if arrival_class is None or str(event.dataset.SOPClassUID) == arrival_class:
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
            for index, files in enumerate(studies):
                uid = study_uid_of(files[0])
                subprocess.run(
                    ["storescu", "-aec", "TRIAGENODE", "127.0.0.1", str(node_port), *map(str, files)],
                    env={**os.environ, "TCP_NODELAY": "1"}, check=True, capture_output=True,
                )
                sent = time.perf_counter()
                while uid not in arrivals:
                    if time.perf_counter() - sent > 300:
                        sys.exit(f"no {what} within 300 s")
                    time.sleep(0.01)
                latencies.append(arrivals[uid] - sent - STABLE_SECONDS)
                print(f"study {index}: {len(files)} images, {what} {latencies[-1]:.2f} s after completion")
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(60)
            server.shutdown()
    print(f"latency: median {statistics.median(latencies):.2f} s, worst {max(latencies):.2f} s (device {device})")
