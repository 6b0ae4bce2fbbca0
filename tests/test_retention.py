"""Retention on a real queue database and real files: what goes after keep_days, what never goes, and races.

Studies are brought to their states through the queue's own API (the
receiver's, the scheduler's, a worker's and delivery's calls), with their
times set in the past; their instances are real DICOM files stored the way
the receiver stores them. The CLI runs as the administrator runs it, on the
same data directory (no node needs to run for it).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from lxml import etree
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom.sop_class import Comprehensive3DSRStorage, MammographyCADSRStorage
from sqlalchemy import func, select, text

from triagenode.inference.phantom import dicom_instance
from triagenode.storage.database import open_for_daemon
from triagenode.storage.filestore import FileStore
from triagenode.storage.models import Instance, Series, Study, StudyState, TaskState
from triagenode.storage.overview import QueueOverview
from triagenode.storage.queue import (
    ReceivedInstance,
    Registration,
    StudyBeingPurgedError,
    StudyQueue,
    TransitionError,
    UnknownStudyError,
)
from triagenode.storage.reports import Outcome, ReportBook, ReportObject
from triagenode.storage.retention import ADMINISTRATOR_REASON, Retention, StudyInWorkError
from triagenode.storage.routes import RouteDecision
from triagenode.storage.snapshot import read_snapshot
from triagenode.storage.timeutil import utcnow

from dicom_factory import ACCESSION_NUMBER, PATIENT_ID, PATIENT_IDENTIFIERS, PATIENT_NAME, write_study
from nodes import NodeProcess, send, wait_until
from test_audit import SCHEMA

KEEP_DAYS = 1.0
NOW = utcnow()
OLD = NOW - timedelta(days=10)
YOUNG = NOW - timedelta(hours=2)
CT = "1.2.840.10008.5.1.4.1.1.2"
TABLES = ("series", "instances", "study_events", "tasks", "task_results", "task_deliveries")


class Bench:
    """A node's data directory and queue database (no node running), and the queue's writers."""

    def __init__(self, root: Path, keep_days: float = KEEP_DAYS) -> None:
        self.root = root
        self.node = NodeProcess(root / "node")  # only its config file, for the CLI; never started
        self.data_dir = self.node.data_dir
        self.engine = open_for_daemon(self.data_dir / "triagenode.db")
        self.store = FileStore(self.data_dir)
        self.store.prepare()
        self.queue = StudyQueue(self.engine)
        self.book = ReportBook(self.engine)
        self.overview = QueueOverview(self.engine)
        self.retention = Retention(self.engine, self.data_dir, keep_days)
        self._made = 0

    def close(self) -> None:
        self.engine.dispose()

    # -- building studies ------------------------------------------------------------------------------------

    def receive(self, files: list[Path], at: datetime, study_uid: str | None = None) -> list[Registration]:
        """Store and record instances as the receiver does (file durable, row committed, then renamed)."""
        done = []
        for file in files:
            ds = dcmread(file, stop_before_pixels=True)
            uid = study_uid or str(ds.StudyInstanceUID)
            relative = self.store.relative_path(uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            spool = self.store.spool_dir / f"{generate_uid()}.dcm"
            shutil.copyfile(file, spool)
            self.store.make_durable(spool)
            self.store.make_room(relative)
            done.append(self.queue.record_instance(self.received(ds, uid, relative, spool.stat().st_size), now=at))
            self.store.place(spool, relative)
        return done

    @staticmethod
    def received(ds, study_uid: str, relative: Path, size: int) -> ReceivedInstance:
        return ReceivedInstance(
            study_uid=study_uid, series_uid=str(ds.SeriesInstanceUID), sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID), transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            path=str(relative), size=size, calling_ae="CT1", modality="CT",
        )

    def receiving(self, at: datetime, slices: int = 2) -> str:
        self._made += 1
        study = write_study(self.root / "sources" / str(self._made), slices=slices)
        self.receive(study.files, at)
        return study.study_uid

    def queued(self, at: datetime, models: tuple[str, ...] = (), slices: int = 2) -> str:
        uid = self.receiving(at, slices)
        router = (lambda _: [RouteDecision(model, True, "test route") for model in models]) if models else None
        assert uid in self.queue.complete_stable_studies(0, now=at, router=router)
        return uid

    def processing(self, at: datetime, slices: int = 2):
        uid = self.queued(at, slices=slices)
        claim = self.queue.claim("worker-1", 60, now=at)
        assert claim is not None and claim.study_uid == uid
        return uid, claim

    def reported(self, at: datetime, destinations: tuple[str, ...] = ("pacs",), slices: int = 2) -> str:
        """Processed, with a report of two objects (a TID 1500 SR and a Mammography CAD SR) as a worker keeps them."""
        uid, claim = self.processing(at, slices)
        primary, extra = self.report_file(uid, Comprehensive3DSRStorage), self.report_file(uid, MammographyCADSRStorage)
        outcome = Outcome(model="lung", model_version="1.0", finding=True, probability=0.9, threshold=0.5)
        assert self.book.record_result(claim, outcome, list(destinations), primary.path, primary.sop_instance_uid,
                                       now=at, extra_objects=[extra], sr_sop_class_uid=primary.sop_class_uid)
        return uid

    def sent(self, at: datetime, slices: int = 2) -> str:
        uid = self.reported(at, slices=slices)
        for delivery in self.deliveries(uid, at):
            assert self.book.succeeded(delivery, now=at)
        assert self.state(uid) == StudyState.SENT
        return uid

    def failed(self, at: datetime) -> str:
        uid, claim = self.processing(at)
        assert self.queue.finish(claim, TaskState.FAILED, "the series cannot be read", now=at)
        return uid

    def cancelled(self, at: datetime) -> str:
        uid = self.queued(at)
        self.queue.cancel(uid, now=at)
        return uid

    def report_file(self, study_uid: str, sop_class: str) -> ReportObject:
        ds = dicom_instance(sop_class, generate_uid())
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, generate_uid(), "SR"
        ds.PatientID, ds.PatientName = PATIENT_ID, PATIENT_NAME
        relative = Path("reports") / study_uid / f"{ds.SOPInstanceUID}.dcm"
        spool = self.store.spool_dir / f"{ds.SOPInstanceUID}.sr"
        ds.save_as(spool, enforce_file_format=True)
        self.store.commit_file(spool, relative)
        return ReportObject(str(relative), str(ds.SOPInstanceUID), sop_class)

    def deliveries(self, study_uid: str, at: datetime) -> list[int]:
        return [d.id for d in self.book.due(now=at + timedelta(seconds=1)) if d.study_uid == study_uid]

    # -- looking ---------------------------------------------------------------------------------------------

    def state(self, study_uid: str) -> str:
        return self.overview.study_details(study_uid)["state"]

    def files(self, study_uid: str) -> list[Path]:
        return sorted(
            path
            for top in ("studies", "reports")
            if (self.data_dir / top / study_uid).exists()
            for path in (self.data_dir / top / study_uid).rglob("*")
        )

    def rows(self, study_uid: str) -> int:
        with self.engine.connect() as connection:
            return connection.scalar(select(func.count()).select_from(Study).where(Study.study_uid == study_uid))

    def orphans(self) -> dict[str, int]:
        """Rows whose study is gone, per table (the cascade must leave none)."""
        queries = {
            "series": "SELECT COUNT(*) FROM series WHERE study_id NOT IN (SELECT id FROM studies)",
            "instances": "SELECT COUNT(*) FROM instances WHERE series_id NOT IN (SELECT id FROM series)",
            "study_events": "SELECT COUNT(*) FROM study_events WHERE study_id NOT IN (SELECT id FROM studies)",
            "tasks": "SELECT COUNT(*) FROM tasks WHERE study_id NOT IN (SELECT id FROM studies)",
            "task_results": "SELECT COUNT(*) FROM task_results WHERE task_id NOT IN (SELECT id FROM tasks)",
            "task_deliveries": "SELECT COUNT(*) FROM task_deliveries WHERE task_id NOT IN (SELECT id FROM tasks)",
        }
        with self.engine.connect() as connection:
            counts = {table: connection.scalar(text(sql)) for table, sql in queries.items()}
        return {table: count for table, count in counts.items() if count}


@pytest.fixture
def bench(tmp_path: Path):
    made = Bench(tmp_path)
    yield made
    made.close()


def test_a_study_final_for_longer_than_keep_days_goes_with_its_files_and_rows_a_younger_one_stays(
    bench: Bench, caplog: pytest.LogCaptureFixture
) -> None:
    old, young = bench.sent(OLD), bench.sent(YOUNG)
    old_files, young_files = bench.files(old), bench.files(young)
    old_bytes = sum(path.stat().st_size for path in old_files if path.is_file())
    assert len(old_files) == 1 + 2 + 2, "a series folder with two instances, two report objects"
    assert bench.retention.due(NOW) == [old]

    with caplog.at_level(logging.INFO, logger="triagenode"):
        [purged] = bench.retention.purge_due(NOW)

    assert (purged.study_uid, purged.instances, purged.reports_removed, purged.resumed) == (old, 2, 2, False)
    assert (purged.patient_id, purged.patient_name, purged.accession_number) == (
        PATIENT_ID, PATIENT_NAME, ACCESSION_NUMBER
    ), "read from a stored instance before the files went, for the audit trail"
    assert purged.sop_classes == {CT: 2}
    assert purged.bytes_freed == old_bytes > 0
    assert purged.final_since == OLD and "keep_days" in purged.reason
    assert not (bench.data_dir / "studies" / old).exists() and not (bench.data_dir / "reports" / old).exists()
    assert (bench.data_dir / "studies").is_dir() and (bench.data_dir / "reports").is_dir(), "the tops stay"
    assert bench.rows(old) == 0 and bench.orphans() == {}
    with pytest.raises(UnknownStudyError):
        bench.overview.study_details(old)

    assert bench.files(young) == young_files and bench.state(young) == "sent", "younger than keep_days: kept"
    assert bench.retention.due(NOW) == [] and bench.retention.purge_due(NOW) == []
    assert bench.retention.due(YOUNG + timedelta(days=KEEP_DAYS, seconds=1)) == [young], "due once its time is up"

    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("retention.purged"))
    assert line.startswith(f"retention.purged study_uid={old} instances=2 reports=2 bytes={purged.bytes_freed} "
                           f"final_since={OLD.isoformat(timespec='seconds')}Z")
    assert not any(identifier in caplog.text for identifier in PATIENT_IDENTIFIERS), "no patient data in the log"


def test_every_final_state_goes_and_keep_days_0_keeps_everything(tmp_path: Path) -> None:
    forever = Bench(tmp_path, keep_days=0)
    try:
        final = {
            "sent": forever.sent(OLD),
            "reported, no destination": forever.reported(OLD, destinations=()),
            "failed": forever.failed(OLD),
            "cancelled": forever.cancelled(OLD),
        }
        assert forever.state(final["reported, no destination"]) == "reported"
        assert forever.retention.due(NOW) == [] and forever.retention.purge_due(NOW) == [], "0 keeps everything"
        timed = Retention(forever.engine, forever.data_dir, KEEP_DAYS)
        assert sorted(timed.due(NOW)) == sorted(final.values())
        assert timed.purge_due(NOW, budget_s=0) == [], "a spent budget starts no purge: the next run goes on"
        assert [p.study_uid for p in timed.purge_due(NOW, limit=1)] == [final["sent"]], "longest final, first made"
        assert sorted(p.study_uid for p in timed.purge_due(NOW)) == sorted(list(final.values())[1:])
        assert all(forever.rows(uid) == 0 and forever.files(uid) == [] for uid in final.values())
    finally:
        forever.close()


def test_a_study_in_work_is_never_removed_however_old(bench: Bench) -> None:
    in_work = {"processing": bench.processing(OLD)[0], "delivering": bench.reported(OLD)}
    in_work["retrying"] = bench.reported(OLD)
    [delivery] = bench.deliveries(in_work["retrying"], OLD)
    assert not bench.book.failed_attempt(delivery, "association rejected", OLD + timedelta(seconds=10), 8, now=OLD)
    in_work["queued"] = bench.queued(OLD)
    two_models = bench.queued(OLD, models=("lung", "brain"))
    claim = bench.queue.claim("worker-2", 60, now=OLD, models=["lung"])
    assert claim is not None and claim.study_uid == two_models
    assert bench.queue.finish(claim, TaskState.FAILED, "worker error", now=OLD)
    in_work["failed, with a task still queued"] = two_models
    in_work["receiving"] = bench.receiving(OLD)  # last: completing the others would have completed it
    states = {name: bench.state(uid) for name, uid in in_work.items()}
    assert states == {"receiving": "receiving", "processing": "processing", "delivering": "reported",
                      "retrying": "reported", "queued": "queued", "failed, with a task still queued": "failed"}
    files = {uid: bench.files(uid) for uid in in_work.values()}

    assert bench.retention.due(NOW) == [] and bench.retention.purge_due(NOW) == []
    reasons = {}
    for name, uid in in_work.items():
        with pytest.raises(StudyInWorkError) as refused:
            bench.retention.purge(uid, now=NOW)
        reasons[name] = str(refused.value)
        assert str(refused.value).endswith(f"cancel it first with `triagenode queue cancel {uid}`"), name
    assert reasons["queued"] == (f"study {in_work['queued']} is queued, still in work; cancel it first with "
                                 f"`triagenode queue cancel {in_work['queued']}`")
    assert "has brain queued, still in work" in reasons["failed, with a task still queued"]
    assert "has a report still on its way to pacs; wait until it is sent" in reasons["retrying"]
    assert {uid: bench.files(uid) for uid in in_work.values()} == files, "not a file touched"
    assert {name: bench.state(uid) for name, uid in in_work.items()} == states, "nor a state"

    bench.queue.cancel(in_work["delivering"], now=OLD)  # what the refusal says to do: then it can go
    assert bench.retention.purge(in_work["delivering"], now=NOW).instances == 2


def test_a_study_that_re_opens_after_the_sweep_looked_is_not_purged(bench: Bench) -> None:
    sent, cancelled = bench.sent(OLD), bench.cancelled(OLD)
    assert sorted(bench.retention.due(NOW)) == sorted([sent, cancelled])
    # A PACS sends one more instance of each before the sweep gets to them.
    for uid in (sent, cancelled):
        extra = write_study(bench.root / "late" / uid, slices=1, study_uid=uid)
        bench.receive(extra.files, NOW)
    assert bench.retention.purge_due(NOW) == []
    assert bench.state(sent) == "receiving", "re-opened: in work again"
    assert bench.state(cancelled) == "cancelled" and bench.retention.due(NOW) == [], "its clock starts again"
    assert [len([p for p in bench.files(uid) if p.suffix == ".dcm"]) for uid in (sent, cancelled)] == [3 + 2, 3]


def test_an_instance_for_a_study_being_purged_is_refused_then_makes_a_new_study(bench: Bench) -> None:
    uid = bench.sent(OLD)
    stored = [dcmread(path, stop_before_pixels=True) for path in bench.files(uid) if path.match("studies/*/*/*.dcm")]
    late = write_study(bench.root / "late", slices=1, study_uid=uid)
    with bench.retention.exclusive():
        plan = bench.retention.mark(uid, now=NOW)
    assert plan is not None and bench.state(uid) == "purging"

    new = dcmread(late.files[0], stop_before_pixels=True)
    for ds in (new, stored[0]):  # a new instance, and one the study has (a PACS re-sending it)
        relative = bench.store.relative_path(uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        with pytest.raises(StudyBeingPurgedError) as refused:
            bench.queue.record_instance(bench.received(ds, uid, relative, 1000), now=NOW)
        assert isinstance(refused.value, TransitionError) and uid in str(refused.value)
    assert bench.overview.study_details(uid)["instances"] == 2, "nothing recorded"
    for change in (bench.queue.retry, bench.queue.cancel, bench.queue.prioritize):
        with pytest.raises(StudyBeingPurgedError):
            change(uid)
    with pytest.raises(TransitionError):
        bench.book.resend(uid, ["pacs"])

    with bench.retention.exclusive():
        bench.retention.remove_files(plan)
        bench.retention.forget(plan)
    assert bench.receive(late.files, NOW) == [Registration.NEW_STUDY], "after the purge: a new study"
    resent = [path for path in (bench.root / "sources").rglob("*.dcm")]
    assert bench.receive(resent, NOW) == [Registration.ADDED] * 2, "its old instances are new to the node"
    assert bench.state(uid) == "receiving" and len([p for p in bench.files(uid) if p.is_file()]) == 3


def test_a_purge_cut_short_is_finished_by_the_next_sweep_and_purging_again_is_harmless(bench: Bench) -> None:
    files_gone, marked_only = bench.sent(OLD), bench.cancelled(OLD)
    with bench.retention.exclusive():  # a crash after the files went, before the rows; another after the mark
        plan = bench.retention.mark(files_gone, now=NOW)
        assert plan is not None and bench.retention.remove_files(plan) > 0
        assert bench.retention.mark(marked_only, now=NOW) is not None
    assert bench.files(files_gone) == [] and bench.rows(files_gone) == 1
    assert [s["study_uid"] for s in bench.overview.list_studies(StudyState.PURGING)] == [marked_only, files_gone]
    counts = read_snapshot(bench.data_dir / "triagenode.db", utcnow()).counts
    assert counts["purging"] == 2 and counts["sent"] == counts["cancelled"] == 0
    assert bench.queue.claim("worker-1", 60) is None

    forever = Retention(bench.engine, bench.data_dir, keep_days=0)
    assert sorted(forever.unfinished()) == sorted([files_gone, marked_only])
    finished = {p.study_uid: p for p in forever.purge_due(NOW)}
    assert set(finished) == {files_gone, marked_only}, "finished even with keep_days 0"
    assert all(p.resumed and p.reason == ADMINISTRATOR_REASON for p in finished.values())
    assert (finished[files_gone].bytes_freed, finished[files_gone].patient_id) == (0, ""), "no file left to read"
    assert finished[files_gone].instances == 2 and finished[files_gone].final_since == OLD
    assert finished[marked_only].patient_id == PATIENT_ID and finished[marked_only].bytes_freed > 0
    assert all(bench.rows(uid) == 0 and bench.files(uid) == [] for uid in finished)
    assert bench.orphans() == {}

    with bench.retention.exclusive():  # each step again, on a study that is gone: nothing happens
        assert bench.retention.remove_files(plan) == 0
        bench.retention.forget(plan)
    with pytest.raises(UnknownStudyError):
        bench.retention.purge(files_gone, now=NOW)
    assert forever.purge_due(NOW) == []


def test_a_file_that_cannot_be_removed_holds_up_its_study_only_until_it_can(
    bench: Bench, caplog: pytest.LogCaptureFixture
) -> None:
    stuck, other = bench.sent(OLD), bench.sent(OLD + timedelta(minutes=1))
    [first, *_] = [path for path in bench.files(stuck) if path.match("studies/*/*/*.dcm")]
    first.unlink()
    (first / "in the way").mkdir(parents=True)  # the instance's path is now a folder: unlink fails
    with caplog.at_level(logging.INFO, logger="triagenode"):
        assert [p.study_uid for p in bench.retention.purge_due(NOW)] == [other]
    assert f"retention.failed study_uid={stuck} error=IsADirectoryError" in caplog.text
    assert bench.state(stuck) == "purging" and bench.rows(stuck) == 1, "kept for the next run"

    shutil.rmtree(first)
    [finished] = bench.retention.purge_due(NOW)
    assert (finished.study_uid, finished.resumed) == (stuck, True)
    assert bench.files(stuck) == [] and bench.rows(stuck) == 0


def test_a_pacs_re_sending_a_study_while_it_is_purged_loses_no_acknowledged_instance(bench: Bench) -> None:
    """The receiver's steps (durable spool file, room, row, rename) in a thread, again and again, while the
    study is purged, step by step with pauses between the steps: every instance acknowledged by a call that
    began once the purge had marked the study is there at the end, row and file (the study came back as a new
    one); those acknowledged before were the study being purged, a duplicate of what the node had."""
    uid = bench.sent(OLD, slices=12)
    sources = sorted((bench.root / "sources").rglob("*.dcm"))
    acknowledged: list[tuple[float, str, Registration]] = []
    refused = 0
    sending, purged = threading.Event(), threading.Event()

    def resend_until_purged_and_twice_more() -> None:
        nonlocal refused
        rounds_after = 0
        while rounds_after < 2:
            after = purged.is_set()
            for file in sources:
                ds = dcmread(file, stop_before_pixels=True)
                relative = bench.store.relative_path(uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
                spool = bench.store.spool_dir / f"{generate_uid()}.dcm"
                shutil.copyfile(file, spool)
                bench.store.make_durable(spool)
                bench.store.make_room(relative)
                began = time.monotonic()
                try:
                    registration = bench.queue.record_instance(bench.received(ds, uid, relative, 1000))
                except StudyBeingPurgedError:  # the receiver answers a transient refusal: no Success
                    refused += 1
                    spool.unlink()
                    continue
                if registration is Registration.DUPLICATE and bench.store.holds(relative):
                    spool.unlink()
                else:
                    try:
                        bench.store.place(spool, relative)
                    except FileNotFoundError:  # the purge removed the folder after make_room: a failure status
                        spool.unlink()
                        continue
                acknowledged.append((began, str(ds.SOPInstanceUID), registration))
                sending.set()
            rounds_after += after

    sender = threading.Thread(target=resend_until_purged_and_twice_more)
    sender.start()
    try:
        assert sending.wait(10), "the PACS is re-sending the study when the purge starts"
        with bench.retention.exclusive():
            plan = bench.retention.mark(uid, now=NOW)
            marked = time.monotonic()
            assert plan is not None and len(plan.instance_paths) == 12
            time.sleep(0.2)  # a slow disk: re-sends arrive between the steps
            bench.retention.remove_files(plan)
            time.sleep(0.1)
            bench.retention.forget(plan)
    finally:
        purged.set()
        sender.join(30)
    assert not sender.is_alive() and refused > 0

    since_marked = {sop for began, sop, _ in acknowledged if began > marked}
    assert len(since_marked) == 12, "the study came back as a new one"
    assert {r for began, _, r in acknowledged if began > marked} >= {Registration.NEW_STUDY, Registration.ADDED}
    with bench.engine.connect() as connection:
        kept = dict(connection.execute(
            select(Instance.sop_instance_uid, Instance.path).join(Series).join(Study).where(Study.study_uid == uid)
        ).all())
    assert set(kept) == since_marked
    assert all((bench.data_dir / path).is_file() for path in kept.values()), "every acknowledged file is there"


@pytest.mark.slow
def test_queue_purge_on_the_command_line(bench: Bench) -> None:
    """One line per study purged or refused; exit 1 when any was refused; a purge cut short is finished."""
    first, second, busy, unknown = bench.sent(OLD), bench.sent(YOUNG), bench.queued(OLD), "1.2.3.4.5"

    refused = bench.node.cli("queue", "purge", busy, check=False)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr == (f"triagenode: study {busy} is queued, still in work; cancel it first with "
                              f"`triagenode queue cancel {busy}`\n")

    mixed = bench.node.cli("queue", "purge", first, unknown, busy, second, check=False)
    assert mixed.returncode == 1
    assert mixed.stderr.splitlines() == [
        f"triagenode: no study {unknown} on this node; `triagenode queue ls` lists them",
        f"triagenode: study {busy} is queued, still in work; cancel it first with `triagenode queue cancel {busy}`",
    ]
    lines = mixed.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [first, second], "keep_days does not hold back a purge asked for"
    assert lines[0].startswith(f"{first}: purged (2 instances, 2 report objects, ") and lines[0].endswith(" freed)")
    shown = bench.node.cli("queue", "show", first, check=False)
    assert (shown.returncode, shown.stderr) == (
        1, f"triagenode: no study {first} on this node; `triagenode queue ls` lists them\n"
    )

    cut_short = bench.cancelled(OLD)
    with bench.retention.exclusive():
        assert bench.retention.mark(cut_short, now=NOW) is not None
    assert "state:         purging" in bench.node.cli("queue", "show", cut_short).stdout
    retried = bench.node.cli("queue", "retry", cut_short, check=False)
    assert retried.returncode == 1 and f"study {cut_short} is being purged" in retried.stderr
    finished = bench.node.cli("queue", "purge", cut_short)
    assert finished.stdout.startswith(f"{cut_short}: purged (2 instances, 0 report objects, ")
    assert finished.stdout.rstrip().endswith(", finishing a purge that was cut short)")
    assert bench.rows(cut_short) == 0 and bench.files(cut_short) == []


def test_a_running_node_purges_a_finished_study_after_keep_days_and_audits_it(make_node, tmp_path: Path) -> None:
    """The daemon's own sweep: a cancelled study goes after keep_days with a Study Deleted audit message naming
    its patient; a study still in work stays."""
    node = make_node(storage={"keep_days": 3 / 86400})  # three seconds
    finished, working = write_study(tmp_path / "finished", slices=2), write_study(tmp_path / "working", slices=2)
    assert send(node.port, finished.files) == [0, 0]
    node.wait_for_state(finished.study_uid, "queued")
    node.cli("queue", "cancel", finished.study_uid)
    assert send(node.port, working.files) == [0, 0]
    wait_until(lambda: node.study(finished.study_uid) is None, 30, "the sweep to purge the cancelled study")
    assert not (node.data_dir / "studies" / finished.study_uid).exists()
    assert node.study(working.study_uid)["state"] in ("receiving", "queued"), "nothing in work is removed"
    assert f"retention.purged study_uid={finished.study_uid}" in node.log()
    lines = [line for path in (node.data_dir / "audit").glob("*.log") for line in path.read_text().splitlines()]
    [deleted] = [etree.fromstring(line.encode()) for line in lines if 'csd-code="110105"' in line]
    assert SCHEMA.validate(deleted), SCHEMA.error_log
    objects = [o.get("ParticipantObjectID") for o in deleted.findall("ParticipantObjectIdentification")]
    assert objects == [finished.study_uid, PATIENT_ID]
    assert PATIENT_ID not in node.log()


def test_a_running_node_refuses_even_a_duplicate_of_a_study_being_purged(make_node, tmp_path: Path) -> None:
    """A re-sent instance of a study whose purge has begun is not "already stored": its file is about to go."""
    from triagenode.storage.database import open_for_cli

    node = make_node()
    study = write_study(tmp_path / "study", slices=2)
    assert send(node.port, study.files) == [0, 0]
    node.wait_for_state(study.study_uid, "queued")
    node.cli("queue", "cancel", study.study_uid)
    engine = open_for_cli(node.data_dir / "triagenode.db")
    try:
        retention = Retention(engine, node.data_dir)
        with retention.exclusive():
            plan = retention.mark(study.study_uid, now=utcnow())
            assert plan is not None
            assert send(node.port, study.files[:1]) == [0xA702], "a duplicate of a purging study"
            retention.remove_files(plan)
            retention.forget(plan)
    finally:
        engine.dispose()
    assert send(node.port, study.files[:1]) == [0], "after the purge it is a new instance of a new study"
    assert node.wait_for_state(study.study_uid, "queued")["instances"] == 1
