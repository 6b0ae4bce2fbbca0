"""Ingest throughput: the node against DCMTK's storescp and Orthanc, fed by DCMTK's storescu.

    .venv/bin/python tests/bench/ingest.py [--slices 300] [--matrix 512] [--repeat 1]

Generates a CT study (300 slices of 512x512, ~0.5 MB each), then for each
receiver (the node, storescp, Orthanc; each fresh, on its own loopback port
and storage directory on the same filesystem) sends it with storescu over one
association, and over four associations in parallel (the study split in four).
Prints files/s, MB/s, the receiver's peak RSS and the ratios node/Orthanc and
node/storescp.

Every DCMTK tool and Orthanc runs with TCP_NODELAY=1: Debian's builds leave
Nagle's algorithm on, which costs ~45 ms per file on loopback and would
flatter the node. storescp does not fsync; Orthanc and the node do (the node
answers Success only once the file and its database row are on disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dicom_factory import write_study

TRIAGENODE = str(Path(sys.executable).parent / "triagenode")
ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"receiver exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} never opened")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Receiver:
    name: str
    ae_title: str
    start: Callable[[Path, int], subprocess.Popen[bytes]]


def start_node(root: Path, port: int) -> subprocess.Popen[bytes]:
    config = root / "triagenode.toml"
    config.write_text(
        f'[node]\nae_title = "TRIAGENODE"\nhost = "127.0.0.1"\nport = {port}\n'
        f'data_dir = "{root / "data"}"\nmin_free_disk_mb = 100\n[study]\nstable_seconds = 600\n'
    )
    return subprocess.Popen(
        [TRIAGENODE, "serve", "--config", str(config), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "node.log", "wb"),
    )


def start_storescp(root: Path, port: int) -> subprocess.Popen[bytes]:
    out = root / "storescp"
    out.mkdir()
    return subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "--output-directory", str(out), str(port)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_orthanc(root: Path, port: int) -> subprocess.Popen[bytes]:
    storage = root / "orthanc"
    storage.mkdir()
    config = root / "orthanc.json"
    config.write_text(
        json.dumps(
            {
                "Name": "bench",
                "StorageDirectory": str(storage),
                "IndexDirectory": str(storage),
                "DicomAet": "ORTHANC",
                "DicomPort": port,
                "HttpPort": free_port(),
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "DicomCheckCalledAet": False,
                "Plugins": [],
            }
        )
    )
    return subprocess.Popen(["Orthanc", str(config)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


RECEIVERS = [
    Receiver("node", "TRIAGENODE", start_node),
    Receiver("storescp", "STORESCP", start_storescp),
    Receiver("orthanc", "ORTHANC", start_orthanc),
]


def run_once(receiver: Receiver, files: list[Path], associations: int, scratch: Path) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix=f"{receiver.name}-", dir=scratch))
    port = free_port()
    process = receiver.start(root, port)
    try:
        wait_for_port(port, process)
        time.sleep(0.5)
        chunks = [files[i::associations] for i in range(associations)]
        started = time.perf_counter()
        senders = [
            subprocess.Popen(
                ["storescu", "-aec", receiver.ae_title, "-aet", "BENCH", "127.0.0.1", str(port), *map(str, chunk)],
                env=ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for chunk in chunks
        ]
        for sender in senders:
            _, err = sender.communicate(timeout=900)
            if sender.returncode != 0:
                raise RuntimeError(f"storescu to {receiver.name} failed: {err.decode()[-500:]}")
        elapsed = time.perf_counter() - started
        rss = peak_rss_mb(process.pid)
    finally:
        stop_receiver(process, root)
    size = sum(path.stat().st_size for path in files)
    return {"files_s": len(files) / elapsed, "mb_s": size / elapsed / 1e6, "rss_mb": rss, "seconds": elapsed}


def stop_receiver(process: subprocess.Popen[bytes], root: Path) -> None:
    """SIGTERM (SIGKILL after a minute) and remove its storage."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="runs per receiver and mode; the best is shown")
    parser.add_argument("--receivers", default="node,storescp,orthanc", help="comma-separated subset to run")
    parser.add_argument("--associations", default="1,4", help="comma-separated association counts")
    parser.add_argument("--scratch", type=Path, default=None, help="directory for study and receivers' storage")
    args = parser.parse_args()
    for tool in ("storescu", "storescp", "Orthanc"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: install Debian's dcmtk and orthanc (.ci/run does)")

    scratch = Path(tempfile.mkdtemp(prefix="triagenode-bench-", dir=args.scratch))
    try:
        study = write_study(scratch / "study", slices=args.slices, rows=args.matrix, columns=args.matrix)
        files = study.files
        total_mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"study: {len(files)} CT slices {args.matrix}x{args.matrix}, {total_mb:.0f} MB; storage in {scratch}")
        print(f"{'receiver':10} {'assocs':>6} {'files/s':>8} {'MB/s':>7} {'peak RSS MB':>12}")
        results: dict[tuple[str, int], dict[str, float]] = {}
        chosen = [r for r in RECEIVERS if r.name in args.receivers.split(",")]
        counts = [int(n) for n in args.associations.split(",")]
        for associations in counts:
            # Rounds interleave the receivers, so that a slow spell of the disk hits them all alike.
            runs: dict[str, list[dict[str, float]]] = {r.name: [] for r in chosen}
            for _ in range(args.repeat):
                for receiver in chosen:
                    runs[receiver.name].append(run_once(receiver, files, associations, scratch))
            for receiver in chosen:
                best = max(runs[receiver.name], key=lambda r: r["files_s"])
                results[(receiver.name, associations)] = best
                print(
                    f"{receiver.name:10} {associations:>6} {best['files_s']:>8.1f} {best['mb_s']:>7.1f} "
                    f"{best['rss_mb']:>12.0f}"
                )
        for associations in counts:
            if not {("node", associations), ("orthanc", associations), ("storescp", associations)} <= set(results):
                continue
            node = results[("node", associations)]["files_s"]
            print(
                f"{associations} association(s): node/orthanc = "
                f"{node / results[('orthanc', associations)]['files_s']:.2f}, node/storescp = "
                f"{node / results[('storescp', associations)]['files_s']:.2f}"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
