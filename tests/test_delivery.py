"""Report delivery with real peers on loopback: destinations are independent of each other.

These tests drive :class:`daemon.delivery.ReportDelivery` the way the node's
scheduler does (``run_due`` every fraction of a second) on a real queue
database, with studies brought to ``reported`` through the queue's own API,
and real DICOM destinations: pynetdicom Storage SCPs, a port nobody listens
on, and a TCP listener that accepts and never answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom.sop_class import Comprehensive3DSRStorage
from sqlalchemy import Engine

from triagenode.config.settings import DeliverySettings, Destination, NodeSettings, Settings
from triagenode.daemon.delivery import ReportDelivery
from triagenode.inference.phantom import dicom_instance
from triagenode.storage.database import open_for_daemon
from triagenode.storage.overview import QueueOverview
from triagenode.storage.queue import ReceivedInstance, StudyQueue
from triagenode.storage.reports import NoReportError, Outcome, ReportBook
from triagenode.storage.timeutil import utcnow

from nodes import free_port, wait_until


def write_sr(data_dir: Path, study_uid: str) -> tuple[str, str]:
    """A small SR file under ``reports/`` the way a worker stores one: (relative path, SOP Instance UID)."""
    ds = dicom_instance(Comprehensive3DSRStorage, generate_uid())
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    relative = Path("reports") / study_uid / f"{ds.SOPInstanceUID}.dcm"
    (data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(data_dir / relative, enforce_file_format=True)
    return str(relative), str(ds.SOPInstanceUID)


class Bench:
    """A queue database, a report book and a ReportDelivery run by a scheduler-like thread."""

    def __init__(self, root: Path, destinations: dict[str, int], **delivery: Any) -> None:
        self.data_dir = root / "data"
        self.engine: Engine = open_for_daemon(self.data_dir / "triagenode.db")
        self.queue, self.book = StudyQueue(self.engine), ReportBook(self.engine)
        self.overview = QueueOverview(self.engine)
        self.settings = Settings(
            node=NodeSettings(data_dir=self.data_dir),
            delivery=DeliverySettings(**{"initial_backoff_s": 0.2, "max_backoff_s": 0.5, **delivery}),
            destinations=tuple(
                Destination(name=name, ae_title=name.upper(), host="127.0.0.1", port=port)
                for name, port in destinations.items()
            ),
        )
        self.delivery = ReportDelivery(self.settings, self.book)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)

    def _tick(self) -> None:
        while not self._stop.wait(0.1):
            self.delivery.run_due()

    def start(self) -> Bench:
        self._ticker.start()
        return self

    def reported_study(self, destinations: list[str] | None = None) -> str:
        """A study taken through receiving, queued and processing to ``reported`` with an SR on disk."""
        study_uid = generate_uid()
        self.queue.record_instance(
            ReceivedInstance(study_uid, generate_uid(), generate_uid(), "1.2.840.10008.5.1.4.1.1.2",
                             "1.2.840.10008.1.2.1", f"studies/{study_uid}/x.dcm", 1000, "CT1", "CT")
        )
        self.queue.complete_stable_studies(0, now=utcnow() + timedelta(seconds=1))
        claim = self.queue.claim("worker-test", 60)
        assert claim is not None and claim.study_uid == study_uid
        sr_path, sr_uid = write_sr(self.data_dir, study_uid)
        result = Outcome(model="m", model_version="1", finding=True, probability=0.9, threshold=0.5,
                         timings_ms={"total": 1.0})
        names = destinations if destinations is not None else [d.name for d in self.settings.destinations]
        assert self.book.record_result(claim, result, names, sr_path, sr_uid)
        return study_uid

    def study(self, study_uid: str) -> dict[str, Any]:
        return self.overview.study_details(study_uid)

    def delivery_of(self, study_uid: str, destination: str) -> dict[str, Any]:
        return next(d for d in self.study(study_uid)["deliveries"] if d["destination"] == destination)

    def close(self) -> None:
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join(5)
        self.delivery.stop(1)
        self.engine.dispose()


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Callable[..., Bench]]:
    made: list[Bench] = []

    def factory(destinations: dict[str, int], **delivery: Any) -> Bench:
        made.append(Bench(tmp_path / f"bench{len(made)}", destinations, **delivery))
        return made[-1]

    yield factory
    for bench in made:
        bench.close()


def test_a_hanging_destination_delays_no_other(
    bench: Callable[..., Bench], make_pacs, make_hanging_peer
) -> None:
    """B accepts TCP and never answers (30 s per attempt); A gets every report at once all the same."""
    pacs, hanging = make_pacs("A"), make_hanging_peer()
    node = bench({"a": pacs.port, "b": hanging.port})
    studies = [node.reported_study() for _ in range(3)]
    started = time.monotonic()
    node.start()
    wait_until(lambda: sorted(pacs.study_uids()) == sorted(studies), 10, "A has every report while B hangs")
    elapsed = max(pacs.arrived_at) - started
    assert elapsed < 5, f"A waited {elapsed:.1f} s behind B"
    wait_until(lambda: all(node.delivery_of(s, "a")["state"] == "sent" for s in studies), 5, "A's sent")
    assert hanging.accepted == 1, "B is tried once at a time, never twice at once"
    for study_uid in studies:
        details = node.study(study_uid)
        assert details["state"] == "reported", "B's delivery is still pending"
        assert node.delivery_of(study_uid, "b")["state"] == "pending"
    print(f"\nA had all 3 reports {elapsed:.2f} s after the first tick while B hung")


def test_a_destination_that_gives_up_stops_no_other(
    bench: Callable[..., Bench], make_pacs, make_hanging_peer
) -> None:
    """B is down and exhausts its attempts; A, which was hanging meanwhile, still gets the report once up."""
    a_port, b_port = free_port(), free_port()
    hanging = make_hanging_peer(a_port)
    node = bench({"a": a_port, "b": b_port}, max_attempts=2)
    study_uid = node.reported_study()
    node.start()
    wait_until(lambda: node.delivery_of(study_uid, "b")["state"] == "failed", 10, "B gives up")
    details = node.study(study_uid)
    assert details["state"] == "reported", "A is still pending, so the study is not failed yet"
    assert node.delivery_of(study_uid, "a")["state"] == "pending"
    assert any("gave up delivering the report to b after 2 attempts" in e["reason"] for e in details["events"])
    hanging.stop()  # A's attempt in flight fails now: it retries later
    wait_until(lambda: node.delivery_of(study_uid, "a")["attempts"] >= 1, 10, "A's first attempt failed")
    pacs = make_pacs("A", a_port)
    wait_until(lambda: pacs.study_uids() == [study_uid], 10, "A gets the report once it is back")
    wait_until(lambda: node.delivery_of(study_uid, "a")["state"] == "sent", 5, "A's delivery sent")
    details = node.study(study_uid)
    assert details["state"] == "failed", "B gave up and nothing is pending any more"
    assert "report not delivered to b" in details["events"][-1]["reason"]

    node.queue.retry(study_uid)  # B's delivery starts again; A has its report
    assert node.study(study_uid)["state"] == "reported"
    b_pacs = make_pacs("B", b_port)
    wait_until(lambda: node.study(study_uid)["state"] == "sent", 10, "sent once B has it too")
    assert b_pacs.study_uids() == [study_uid] and pacs.study_uids() == [study_uid], "nobody got it twice"


def test_a_report_is_sent_again_to_one_destination_or_all(bench: Callable[..., Bench], make_pacs) -> None:
    a, b = make_pacs("A"), make_pacs("B")
    node = bench({"a": a.port, "b": b.port}).start()
    study_uid = node.reported_study()
    node_sent = lambda: node.study(study_uid)["state"] == "sent"  # noqa: E731
    wait_until(node_sent, 10, "sent")
    assert node.book.resend(study_uid, ["b"]) == ["b"]
    wait_until(lambda: len(b.received) == 2, 10, "B has it twice")
    wait_until(lambda: node.delivery_of(study_uid, "b")["state"] == "sent", 5, "B's delivery sent again")
    assert len(a.received) == 1
    node.book.resend(study_uid, ["a", "b"])
    wait_until(lambda: (len(a.received), len(b.received)) == (2, 3), 10, "both again")
    wait_until(node_sent, 5, "still sent")
    reasons = [e["reason"] for e in node.study(study_uid)["events"]]
    assert "report to be sent again to b (requested by an administrator)" in reasons


def test_a_study_without_a_report_cannot_be_resent(bench: Callable[..., Bench]) -> None:
    node = bench({"a": free_port()})
    study_uid = generate_uid()
    node.queue.record_instance(
        ReceivedInstance(study_uid, generate_uid(), generate_uid(), "1.2.840.10008.5.1.4.1.1.2",
                         "1.2.840.10008.1.2.1", "x.dcm", 10, "CT1", "CT")
    )
    node.queue.complete_stable_studies(0, now=utcnow() + timedelta(seconds=1))
    claim = node.queue.claim("w", 60)
    assert claim is not None
    not_applicable = Outcome.not_applicable("m", "1", "only a localiser")
    node.book.record_result(claim, not_applicable, ["a"])
    with pytest.raises(NoReportError, match="has no report to send"):
        node.book.resend(study_uid, ["a"])


def test_a_destination_removed_from_the_config_fails_at_once_and_holds_nothing_up(
    bench: Callable[..., Bench], make_pacs
) -> None:
    pacs = make_pacs("A")
    node = bench({"a": pacs.port})
    study_uid = node.reported_study(["a", "gone"])
    node.start()
    wait_until(lambda: node.delivery_of(study_uid, "gone")["state"] == "failed", 10, "gone gives up")
    assert "no longer configured" in node.delivery_of(study_uid, "gone")["last_error"]
    wait_until(lambda: node.study(study_uid)["state"] == "failed", 10, "failed once A is sent")
    assert pacs.study_uids() == [study_uid]


def test_a_retry_scheduled_before_the_clock_stepped_back_is_not_held_for_the_step(
    bench: Callable[..., Bench], make_pacs
) -> None:
    from sqlalchemy import text

    port = free_port()
    node = bench({"pacs": port}, max_attempts=50).start()
    study_uid = node.reported_study()
    wait_until(lambda: node.delivery_of(study_uid, "pacs")["attempts"] >= 1, 10, "a failed attempt")
    with node.engine.begin() as connection:  # as if the clock had just been stepped back an hour
        connection.execute(text("UPDATE task_deliveries SET next_attempt_at = datetime('now', '+1 hour')"))
    pacs = make_pacs("PACS", port)
    wait_until(lambda: node.study(study_uid)["state"] == "sent", 10, "sent without waiting an hour")
    assert len(pacs.received) == 1
