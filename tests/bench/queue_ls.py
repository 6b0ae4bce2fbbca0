"""How fast `triagenode queue ls` answers with 100,000 studies in the queue.

    .venv/bin/python tests/bench/queue_ls.py [--studies 100000]

Fills a fresh database (through the node's own migrations) with studies in
every state, then times the query in-process and the whole CLI command as an
administrator runs it (process start included). Target: under 0.5 s.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert

from triagenode.storage.database import open_for_daemon
from triagenode.storage.models import Study, StudyState
from triagenode.storage.overview import QueueOverview
from triagenode.storage.snapshot import read_snapshot
from triagenode.storage.timeutil import utcnow

TRIAGENODE = str(Path(sys.executable).parent / "triagenode")


def fill(database: Path, count: int) -> None:
    engine = open_for_daemon(database)
    rng = random.Random(7)
    now = utcnow()
    states = list(StudyState)
    rows = []
    for index in range(count):
        at = now - timedelta(seconds=rng.randint(0, 90 * 86400))
        rows.append(
            {
                "study_uid": f"1.2.826.0.1.3680043.10.511.{index}",
                "state": rng.choice(states).value,
                "modality": "CT",
                "study_date": "20261127",
                "description": "CT THORAX",
                "series_count": 3,
                "instance_count": 300,
                "byte_count": 300 * 525_000,
                "received_at": at,
                "last_instance_at": at,
                "updated_at": at,
                "processing_attempts": 0,
            }
        )
    with engine.begin() as connection:
        for start in range(0, count, 10_000):
            connection.execute(insert(Study), rows[start : start + 10_000])
    engine.dispose()


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        config = root / "triagenode.toml"
        config.write_text(f'[node]\ndata_dir = "{root / "data"}"\n')
        started = time.perf_counter()
        fill(root / "data" / "triagenode.db", args.studies)
        print(f"filled {args.studies} studies in {time.perf_counter() - started:.1f} s")

        from triagenode.storage.database import open_for_cli

        overview = QueueOverview(open_for_cli(root / "data" / "triagenode.db"))
        for label, fn in [
            ("query: ls (50 newest)", lambda: overview.list_studies(limit=50)),
            ("query: ls --state queued", lambda: overview.list_studies(StudyState.QUEUED, 50)),
            ("query: ls --limit 1000", lambda: overview.list_studies(limit=1000)),
            ("query: status snapshot", lambda: read_snapshot(root / "data" / "triagenode.db", utcnow())),
        ]:
            times = timed(fn, 20)
            print(f"{label:32} median {statistics.median(times) * 1000:7.2f} ms   max {max(times) * 1000:7.2f} ms")

        for label, extra in [
            ("cli: triagenode queue ls", []),
            ("cli: queue ls --state failed", ["--state", "failed"]),
            ("cli: queue ls --json", ["--json"]),
            ("cli: triagenode status --json", None),
        ]:
            command = (
                [TRIAGENODE, "status", "--json", "--config", str(config)]
                if extra is None
                else [TRIAGENODE, "queue", "ls", *extra, "--config", str(config)]
            )
            times = timed(lambda command=command: subprocess.run(command, capture_output=True, check=False), 5)
            print(f"{label:32} median {statistics.median(times) * 1000:7.1f} ms   max {max(times) * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
