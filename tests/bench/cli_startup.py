"""How fast the admin CLI starts: what an administrator (or a monitoring probe) waits for.

    .venv/bin/python tests/bench/cli_startup.py [--runs 15] [--live]

Times whole processes, interpreter start included, the way a shell or a
monitoring check runs them: ``triagenode --help``, ``triagenode status``,
``triagenode queue ls`` and ``triagenode echo`` to a port where nothing
listens. It prepares a data directory with the node's own storage API (the
daemon's migrations create the database, a few studies fill it); with
``--live`` a ``triagenode serve`` (``workers = 0``) runs on it meanwhile, so
``status`` takes its "running" path (the lock, the heartbeat). Prints the
median and the slowest run of each, and, per command, which of the heavy
libraries the process imported (``python -X importtime``), so a regression
names its cause. Target: ``--help`` and ``status`` under 0.3 s.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

TRIAGENODE = str(Path(sys.executable).parent / "triagenode")
HEAVY = ("sqlalchemy", "pynetdicom", "pydicom", "torch", "numpy", "pydantic", "apscheduler", "highdicom")
"""Libraries whose import is worth knowing about when a command starts slowly."""


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare(root: Path, port: int) -> Path:
    """A config file and a data directory whose database the node's own migrations created, with a few studies."""
    from sqlalchemy import insert

    from triagenode.storage.database import open_for_daemon
    from triagenode.storage.models import Study, StudyState
    from triagenode.storage.timeutil import utcnow

    data = root / "data"
    data.mkdir()
    config = root / "triagenode.toml"
    config.write_text(f'[node]\ndata_dir = "{data}"\nport = {port}\n[inference]\nworkers = 0\n')
    engine = open_for_daemon(data / "triagenode.db")
    now = utcnow()
    states = list(StudyState)
    with engine.begin() as connection:
        connection.execute(
            insert(Study),
            [
                {"study_uid": f"1.2.826.0.1.3680043.10.511.{i}", "state": states[i % len(states)].value,
                 "modality": "CT", "study_date": "20261127", "description": "CT THORAX", "series_count": 1,
                 "instance_count": 100, "byte_count": 100 * 525_000, "received_at": now - timedelta(minutes=i),
                 "last_instance_at": now - timedelta(minutes=i), "updated_at": now - timedelta(minutes=i),
                 "processing_attempts": 0}
                for i in range(200)
            ],
        )
    engine.dispose()
    return config


def start_node(config: Path) -> subprocess.Popen[bytes]:
    """``triagenode serve`` on the prepared data directory, until ``status`` says it runs."""
    node = subprocess.Popen(
        [TRIAGENODE, "serve", "--config", str(config), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if subprocess.run([TRIAGENODE, "status", "--config", str(config)], capture_output=True).returncode == 0:
            return node
        time.sleep(0.2)
    node.kill()
    raise SystemExit("triagenode serve did not come up within 60 s")


def heavy_imports(command: list[str]) -> list[str]:
    """Which of :data:`HEAVY` the command's process imports, read from ``-X importtime``."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    stderr = subprocess.run(command, capture_output=True, text=True, env=env).stderr
    seen = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in stderr.splitlines() if "import time:" in line}
    return [name for name in HEAVY if name in seen]


def timed(command: list[str], runs: int) -> tuple[list[float], int]:
    """Wall times of ``runs`` runs of ``command`` and its exit status (one warm-up run first, not counted)."""
    code = subprocess.run(command, capture_output=True).returncode
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True)
        times.append(time.perf_counter() - started)
    return times, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="Runs per command (median and max are printed).")
    parser.add_argument("--live", action="store_true", help="Run `triagenode serve` (workers = 0) meanwhile.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = prepare(Path(tmp), free_port())
        node = start_node(config) if args.live else None
        closed = free_port()
        try:
            baseline = [sys.executable, "-c", "pass"]
            commands = [
                ("python -c pass (floor)", baseline),
                ("triagenode --help", [TRIAGENODE, "--help"]),
                ("triagenode status", [TRIAGENODE, "status", "--config", str(config)]),
                ("triagenode queue ls", [TRIAGENODE, "queue", "ls", "--config", str(config)]),
                ("triagenode echo (closed port)",
                 [TRIAGENODE, "echo", f"NOBODY@127.0.0.1:{closed}", "--timeout", "2", "--config", str(config)]),
            ]
            print(f"{args.runs} runs each{' (node running)' if node else ''}; exit status, then wall time")
            for label, command in commands:
                times, code = timed(command, args.runs)
                loaded = ", ".join(heavy_imports(command)) or "-"
                print(
                    f"{label:32} exit {code}  median {statistics.median(times) * 1000:6.0f} ms   "
                    f"max {max(times) * 1000:6.0f} ms   imports: {loaded}"
                )
        finally:
            if node is not None:
                os.killpg(node.pid, signal.SIGTERM)
                node.wait(timeout=60)


if __name__ == "__main__":
    main()
