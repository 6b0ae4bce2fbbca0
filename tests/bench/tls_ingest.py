"""Ingest over DICOM TLS against plain TCP: the same CT study into the node, and into DCMTK's storescp for scale.

    .venv/bin/python tests/bench/tls_ingest.py [--slices 300] [--matrix 512] [--repeat 3] [--associations 1,4]

Makes a CA, a server certificate for the receivers and a client certificate
for storescu (tests/pki.py; ECDSA P-256, the BCP 195 suites), generates a CT
study (300 slices of 512x512, ~0.5 MB each) and sends it with storescu over
plain TCP and over mutual TLS (``+tls``), to a fresh node listening on both
ports and to a fresh storescp each time. Prints files/s and MB/s for each and
TLS's cost as a ratio. Every DCMTK tool runs with TCP_NODELAY=1 (Debian's
builds leave Nagle's algorithm on).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dicom_factory import write_study
from ingest import ENV, TRIAGENODE, free_port, peak_rss_mb, stop_receiver, wait_for_port
from pki import Issued, TestCA


def start_node(root: Path, plain_port: int, tls_port: int, server: Issued, ca: Path) -> subprocess.Popen[bytes]:
    config = root / "triagenode.toml"
    config.write_text(
        f'[node]\nae_title = "TRIAGENODE"\nhost = "127.0.0.1"\nport = {plain_port}\n'
        f'data_dir = "{root / "data"}"\nmin_free_disk_mb = 100\n[study]\nstable_seconds = 600\n'
        f'[inference]\nworkers = 0\n'
        f'[tls]\nport = {tls_port}\ncertificate = "{server.certificate}"\nprivate_key = "{server.private_key}"\n'
        f'ca_certificates = "{ca}"\n'
    )
    return subprocess.Popen(
        [TRIAGENODE, "serve", "--config", str(config), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "node.log", "wb"),
    )


def start_storescp(root: Path, port: int, tls: bool, server: Issued, ca: Path) -> subprocess.Popen[bytes]:
    out = root / "storescp"
    out.mkdir()
    secure = ["+tls", str(server.private_key), str(server.certificate), "-pw", "+cf", str(ca)] if tls else []
    return subprocess.Popen(
        ["storescp", *secure, "-aet", "STORESCP", "--output-directory", str(out), str(port)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def send(files: list[Path], ae_title: str, port: int, associations: int, client: Issued | None, ca: Path) -> float:
    """Seconds to send ``files`` with storescu over ``associations`` parallel associations."""
    secure = ["+tls", str(client.private_key), str(client.certificate), "-pw", "+cf", str(ca)] if client else []
    chunks = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    senders = [
        subprocess.Popen(["storescu", *secure, "-aec", ae_title, "-aet", "BENCH", "127.0.0.1", str(port),
                          *map(str, chunk)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for chunk in chunks
    ]
    for sender in senders:
        _, err = sender.communicate(timeout=900)
        if sender.returncode != 0:
            raise RuntimeError(f"storescu to {ae_title} failed: {err.decode()[-500:]}")
    return time.perf_counter() - started


def run_once(receiver: str, tls: bool, files: list[Path], associations: int, scratch: Path,
             pki: tuple[Issued, Issued, Path]) -> dict[str, float]:
    server, client, ca = pki
    root = Path(tempfile.mkdtemp(prefix=f"{receiver}-", dir=scratch))
    plain_port, tls_port = free_port(), free_port()
    if receiver == "node":
        process, ae_title, port = start_node(root, plain_port, tls_port, server, ca), "TRIAGENODE", plain_port
        target = tls_port if tls else plain_port
    else:
        process, ae_title = start_storescp(root, plain_port, tls, server, ca), "STORESCP"
        port = target = plain_port
    try:
        wait_for_port(port, process)
        time.sleep(0.5)
        elapsed = send(files, ae_title, target, associations, client if tls else None, ca)
        rss = peak_rss_mb(process.pid)
    finally:
        stop_receiver(process, root)
    size = sum(path.stat().st_size for path in files)
    return {"files_s": len(files) / elapsed, "mb_s": size / elapsed / 1e6, "rss_mb": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="runs per receiver and mode; the best is shown")
    parser.add_argument("--associations", default="1,4", help="comma-separated association counts")
    parser.add_argument("--receivers", default="node,storescp")
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: install Debian's dcmtk (.ci/run does)")
    scratch = Path(tempfile.mkdtemp(prefix="triagenode-tls-bench-"))
    try:
        ca = TestCA(scratch / "pki")
        pki = (ca.issue("localhost"), ca.issue("BENCH"), ca.certificate)
        study = write_study(scratch / "study", slices=args.slices, rows=args.matrix, columns=args.matrix)
        files = study.files
        total_mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"study: {len(files)} CT slices {args.matrix}x{args.matrix}, {total_mb:.0f} MB")
        print(f"{'receiver':10} {'transport':9} {'assocs':>6} {'files/s':>8} {'MB/s':>7} {'peak RSS MB':>12}")
        best: dict[tuple[str, bool, int], float] = {}
        for associations in (int(n) for n in args.associations.split(",")):
            for receiver in args.receivers.split(","):
                for tls in (False, True):
                    runs = [run_once(receiver, tls, files, associations, scratch, pki) for _ in range(args.repeat)]
                    top = max(runs, key=lambda r: r["files_s"])
                    best[(receiver, tls, associations)] = top["files_s"]
                    print(f"{receiver:10} {'TLS' if tls else 'TCP':9} {associations:>6} {top['files_s']:>8.1f} "
                          f"{top['mb_s']:>7.1f} {top['rss_mb']:>12.0f}")
        for (receiver, tls, associations), files_s in best.items():
            if tls:
                plain = best[(receiver, False, associations)]
                print(f"{receiver} over TLS, {associations} association(s): {files_s / plain:.2f}x plain TCP")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
