"""Two models on one worker: studies per minute, and how long a STAT study waits behind a full queue.

    .venv/bin/python tests/bench/models.py [--studies 10] [--slices 32] [--matrix 256] [--device auto]

Starts a node (one worker, ``stable_seconds`` 1) with two ``[[models]]``
entries that both take every CT study (the demo package twice: two tasks,
two SRs per study) and a recording destination. Then:

1. throughput: sends ``--studies`` CT studies and times from the first
   C-STORE to the last SR's arrival (sending, completion, both models'
   runs and deliveries overlap); prints studies and tasks per minute;
2. STAT: pauses both models, queues ``--studies`` more studies and then a
   STAT one (Requested Procedure Priority), resumes, and prints how long
   the STAT study's tasks waited from resume to their first lease, and
   how many tasks the worker took before them (0 is what urgent means).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' helpers
from dicom_factory import ct_slice  # noqa: E402
from nodes import NodeProcess, free_port, send, wait_until  # noqa: E402
from peers import RecordingPacs  # noqa: E402


def study(slices: int, matrix: int, stat: bool = False) -> list:
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for index in range(slices):
        ds = ct_slice(study_uid, series_uid, index, rows=matrix, columns=matrix)
        if stat:
            ds.RequestedProcedurePriority = "STAT"
        out.append(ds)
    return out


def taken(node: NodeProcess) -> list[tuple[str, str, str]]:
    """(time, study, model) of every lease taken, from the node's log, in order."""
    rows = []
    for line in node.log().splitlines():
        if "task.state" in line and "to=processing" in line:
            rows.append((line[:23], line.split("study_uid=")[1].split()[0], line.split("model=")[1].split()[0]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pacs = RecordingPacs(free_port(), "PACS").start()
        node = NodeProcess(
            Path(tmp) / "node",
            inference={"workers": 1, "device": args.device},
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        )
        node.config_path.write_text(
            node.config_path.read_text()
            + '\n[[models]]\nname = "first"\npackage = "demo"\npriority = 1\n'
            + '\n[[models]]\nname = "second"\npackage = "demo"\n'
        )
        node.start()
        try:
            wait_until(lambda: "worker.ready" in node.log(), 120, "the worker loaded its models")
            batch = [study(args.slices, args.matrix) for _ in range(args.studies)]
            started = time.perf_counter()
            for series in batch:
                assert send(node.port, series) == [0] * len(series)
            sent = time.perf_counter()
            wait_until(lambda: len(pacs.received) >= 2 * args.studies, 600, "every SR at the destination")
            elapsed = time.perf_counter() - started
            print(f"throughput: {args.studies} studies x 2 models ({args.slices} slices of {args.matrix}^2) from the "
                  f"first C-STORE to the last SR at the PACS: {elapsed:.1f} s (sending took {sent - started:.1f} s, "
                  f"stable_seconds {node.stable_seconds:g}): {args.studies / elapsed * 60:.1f} studies/min, "
                  f"{2 * args.studies / elapsed * 60:.1f} tasks/min")

            node.cli("model", "pause", "first")
            node.cli("model", "pause", "second")
            queued = [study(args.slices, args.matrix) for _ in range(args.studies)]
            urgent = study(args.slices, args.matrix, stat=True)
            for series in [*queued, urgent]:
                assert send(node.port, series) == [0] * len(series)
            uid = str(urgent[0].StudyInstanceUID)
            wait_until(lambda: node.study(uid)["state"] == "queued", 60, "the STAT study queued")
            before = len(taken(node))
            resumed = time.perf_counter()
            node.cli("model", "resume", "first")
            node.cli("model", "resume", "second")
            wait_until(lambda: [t for t in taken(node)[before:] if t[1] == uid], 120, "the STAT study taken")
            waited = time.perf_counter() - resumed
            ahead = next(i for i, t in enumerate(taken(node)[before:]) if t[1] == uid)
            print(f"STAT: sent after {args.studies} queued studies ({2 * args.studies} tasks); its first task was "
                  f"leased {waited:.2f} s after resume, with {ahead} task(s) taken before it")
            wait_until(lambda: len(pacs.received) >= 4 * args.studies + 2, 900, "every other SR")
        finally:
            node.stop()
            pacs.stop()


if __name__ == "__main__":
    main()
