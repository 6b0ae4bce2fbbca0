"""A report of several DICOM objects, and a detector's lesion marks: stored, shown, delivered, upgraded.

A mammography detector's report may be a TID 1500 SR and a Mammography CAD
SR; next a brain model's will be a SEG and an SR. These tests bring tasks to
``reported`` through the queue's own API on a real SQLite file, drive the
delivery the way the scheduler does (``run_due``) against real pynetdicom
peers on loopback, and run ``queue show`` and ``queue resend`` in-process.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComprehensiveSRStorage, MammographyCADSRStorage
from sqlalchemy import text

from triagenode.daemon.cli_queue import queue as queue_cli
from triagenode.daemon.delivery import rebuild_report
from triagenode.inference.phantom import dicom_instance
from triagenode.storage.database import open_for_daemon
from triagenode.storage.migrations import LATEST_VERSION, MIGRATIONS
from triagenode.storage.overview import QueueOverview
from triagenode.storage.queue import ReceivedInstance
from triagenode.storage.reports import Outcome, ReportObject
from triagenode.storage.timeutil import utcnow

from nodes import free_port, wait_until
from test_delivery import Bench

MAMMO_CAD = str(MammographyCADSRStorage)
SR_3D = str(Comprehensive3DSRStorage)
LESIONS = (
    {"sop_instance_uid": "1.2.826.0.1.3680043.10.7.1", "series_uid": "1.2.826.0.1.3680043.10.7", "type": "mass",
     "box": [120.0, 88.5, 160.0, 130.0], "certainty": 0.913, "laterality": "L", "view": "CC"},
    {"sop_instance_uid": "1.2.826.0.1.3680043.10.7.2", "series_uid": "1.2.826.0.1.3680043.10.7",
     "type": "calcification", "box": [10.0, 20.0, 14.5, 26.0], "certainty": 0.61, "laterality": "R", "view": "MLO"},
)
SKIPPED = ("1.2.826.0.1.3680043.10.7.3: a magnified view (Partial View YES); the model reads full-field views",)
DETECTION = Outcome(model="mammo", model_version="1.0", finding=True, probability=0.913, threshold=0.5,
                    series_uid="1.2.826.0.1.3680043.10.7", lesions=LESIONS, skipped=SKIPPED)


class SelectivePacs:
    """A Storage SCP that answers 0xA700 (Out of Resources) for the SOP Instance UIDs in ``refuse``.

    It stores everything else, and notes every C-STORE it answers as
    (association number, SOP Instance UID, status), so a test sees which
    association brought which object, in which order.
    """

    def __init__(self, port: int, classes: tuple[str, ...] = (SR_3D, MAMMO_CAD)) -> None:
        self.port, self.classes = port, classes
        self.refuse: set[str] = set()
        self.answered: list[tuple[int, str, int]] = []
        self._associations: dict[int, int] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def start(self) -> SelectivePacs:
        ae = AE(ae_title="SELECTIVE")
        for sop_class in self.classes:
            ae.add_supported_context(sop_class)

        def on_store(event: evt.Event) -> int:
            uid = str(event.request.AffectedSOPInstanceUID)
            with self._lock:
                number = self._associations.setdefault(id(event.assoc), len(self._associations) + 1)
                status = 0xA700 if uid in self.refuse else 0x0000
                self.answered.append((number, uid, status))
            return status

        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, on_store)])
        return self

    def stored(self) -> list[tuple[int, str]]:
        with self._lock:
            return [(number, uid) for number, uid, status in self.answered if status == 0]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Callable[..., Bench]]:
    made: list[Bench] = []

    def factory(destinations: dict[str, int], **delivery: Any) -> Bench:
        made.append(Bench(tmp_path / f"bench{len(made)}", destinations, **delivery))
        return made[-1]

    yield factory
    for node in made:
        node.close()


@pytest.fixture
def make_selective_pacs(stop_after_test: Any) -> Callable[[], SelectivePacs]:
    return lambda: stop_after_test(SelectivePacs(free_port()), SelectivePacs.stop).start()


def write_object(data_dir: Path, study_uid: str, sop_class: str) -> ReportObject:
    """A small report object of ``sop_class`` under ``reports/``, the way a worker stores one."""
    ds = dicom_instance(sop_class, generate_uid())
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, generate_uid(), "SR"
    relative = Path("reports") / study_uid / f"{ds.SOPInstanceUID}.dcm"
    (data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(data_dir / relative, enforce_file_format=True)
    return ReportObject(str(relative), str(ds.SOPInstanceUID), sop_class)


def report_with_objects(
    node: Bench, outcome: Outcome = DETECTION, primary_class: str = SR_3D, extra_classes: tuple[str, ...] = (MAMMO_CAD,)
) -> tuple[str, ReportObject, list[ReportObject]]:
    """A study brought to ``reported`` with a primary report and ``extra_classes`` objects beside it."""
    study_uid = generate_uid()
    node.queue.record_instance(
        ReceivedInstance(study_uid, generate_uid(), generate_uid(), "1.2.840.10008.5.1.4.1.1.1.2",
                         "1.2.840.10008.1.2.1", f"studies/{study_uid}/x.dcm", 1000, "MG1", "MG")
    )
    node.queue.complete_stable_studies(0, now=utcnow() + timedelta(seconds=1))
    claim = node.queue.claim("worker-test", 60)
    assert claim is not None and claim.study_uid == study_uid
    primary = write_object(node.data_dir, study_uid, primary_class)
    extras = [write_object(node.data_dir, study_uid, sop_class) for sop_class in extra_classes]
    assert node.book.record_result(
        claim, outcome, [d.name for d in node.settings.destinations], primary.path, primary.sop_instance_uid,
        extra_objects=extras, sr_sop_class_uid=primary.sop_class_uid,
    )
    return study_uid, primary, extras


def stored_columns(node: Bench, study_uid: str) -> tuple[str | None, str | None]:
    """``task_results.details`` and ``extra_objects`` as SQLite holds them."""
    with node.engine.connect() as connection:
        return connection.execute(
            text("SELECT r.details, r.extra_objects FROM task_results r JOIN tasks t ON t.id = r.task_id "
                 "JOIN studies s ON s.id = t.study_id WHERE s.study_uid = :uid"), {"uid": study_uid}
        ).one()


def cli(node: Bench, tmp_path: Path, *args: str, sr_sop_class: str = "comprehensive3d") -> str:
    """``triagenode queue ARGS`` in-process, on the bench's data directory and destinations; its stdout."""
    config = tmp_path / "node.toml"
    lines = [f'[node]\ndata_dir = "{node.data_dir}"', f'[inference]\nworkers = 0\nsr_sop_class = "{sr_sop_class}"']
    lines += [f'[[destinations]]\nname = "{d.name}"\nae_title = "{d.ae_title}"\nhost = "{d.host}"\nport = {d.port}'
              for d in node.settings.destinations]
    config.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(queue_cli, [*args, "--config", str(config)])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result.stdout


def deliver_once(node: Bench) -> None:
    """One scheduler tick, and the senders' work finished."""
    assert node.delivery.run_due() >= 1
    wait_until(node.delivery.idle, 10, "the senders are done")


def test_lesions_skipped_images_and_report_objects_are_stored_and_shown(bench: Callable[..., Bench],
                                                                         tmp_path: Path) -> None:
    node = bench({"a": free_port()})
    study_uid, primary, [cad] = report_with_objects(node)
    details, extras = stored_columns(node, study_uid)
    assert details is not None and json.loads(details) == {"lesions": list(LESIONS), "skipped": list(SKIPPED)}
    assert extras is not None and json.loads(extras) == [
        {"path": cad.path, "sop_instance_uid": cad.sop_instance_uid, "sop_class_uid": MAMMO_CAD}]

    shown = json.loads(cli(node, tmp_path, "show", study_uid, "--json"))
    [task] = shown["tasks"]
    assert task["result"]["lesions"] == list(LESIONS) and task["result"]["skipped"] == list(SKIPPED)
    assert [(o["sop_instance_uid"], o["sop_class_uid"], o["primary"]) for o in task["report_objects"]] == [
        (primary.sop_instance_uid, SR_3D, True), (cad.sop_instance_uid, MAMMO_CAD, False)]
    assert shown["result"] == task["result"], "a one-task study's compat result carries the same keys"
    assert shown["report_objects"] == task["report_objects"]
    assert "finding present, probability 0.913, 2 lesions marked (mammo 1.0)" in [
        e["reason"] for e in shown["events"]]

    printed = cli(node, tmp_path, "show", study_uid)
    for line in (
        "lesions:       2 marked",
        "  lesion 1: mass, L CC, box 120.0 88.5 160.0 130.0, certainty 0.913 (image 1.2.826.0.1.3680043.10.7.1)",
        "  lesion 2: calcification, R MLO, box 10.0 20.0 14.5 26.0, certainty 0.610 (image 1.2.826.0.1.3680043.10.7.2)",
        "not read:      1 image(s)",
        f"  {SKIPPED[0]}",
        f"report:        {primary.sop_instance_uid} (Comprehensive 3D SR)",
        f"  and:         {cad.sop_instance_uid} (Mammography CAD SR)",
    ):
        assert line in printed.splitlines(), (line, printed)


def test_a_classifier_result_stores_no_details_and_shows_empty_lists(bench: Callable[..., Bench]) -> None:
    node = bench({"a": free_port()})
    study_uid = node.reported_study()
    assert stored_columns(node, study_uid) == (None, None)
    shown = node.study(study_uid)
    assert (shown["result"]["lesions"], shown["result"]["skipped"]) == ([], [])
    [primary] = shown["tasks"][0]["report_objects"]
    assert primary["primary"] and primary["sop_instance_uid"] == shown["result"]["sr_sop_instance_uid"]
    reasons = [e["reason"] for e in shown["events"]]
    assert "finding present, probability 0.900 (m 1)" in reasons, ("the classifier's wording stays", reasons)
    assert replace(DETECTION, lesions=LESIONS[:1]).event_reason() == (
        "finding present, probability 0.913, 1 lesion marked (mammo 1.0)")
    assert replace(DETECTION, lesions=()).event_reason() == "finding present, probability 0.913 (mammo 1.0)"


def test_every_object_goes_to_the_destination_and_the_task_is_sent(bench: Callable[..., Bench], make_pacs) -> None:
    pacs = make_pacs("A", sr_classes=(Comprehensive3DSRStorage, ComprehensiveSRStorage, MammographyCADSRStorage))
    node = bench({"a": pacs.port})
    study_uid, primary, [cad] = report_with_objects(node)
    [due] = node.book.due(utcnow() + timedelta(seconds=1))
    assert (due.sr_path, due.extra_paths) == (primary.path, (cad.path,))
    node.start()
    wait_until(lambda: node.study(study_uid)["state"] == "sent", 10, "sent once both objects are stored")
    assert sorted(str(ds.SOPInstanceUID) for ds in pacs.received) == sorted(
        [primary.sop_instance_uid, cad.sop_instance_uid]), "each object once"
    assert [str(ds.SOPClassUID) for ds in pacs.received] == [SR_3D, MAMMO_CAD], "the primary first"
    assert [(d["state"], d["attempts"]) for d in node.study(study_uid)["deliveries"]] == [("sent", 1)]


def test_a_refused_object_fails_the_attempt_naming_it_and_the_retry_sends_all_again(
    bench: Callable[..., Bench], make_selective_pacs
) -> None:
    pacs = make_selective_pacs()
    node = bench({"a": pacs.port}, max_attempts=5, initial_backoff_s=0.2, max_backoff_s=0.2)
    study_uid, primary, [cad] = report_with_objects(node)
    pacs.refuse = {cad.sop_instance_uid}
    deliver_once(node)
    [delivery] = node.study(study_uid)["deliveries"]
    assert (delivery["state"], delivery["attempts"]) == ("pending", 1)
    assert delivery["next_attempt_at"] is not None, "a retry is scheduled"
    assert "C-STORE status 0xA700" in delivery["last_error"]
    assert f"Mammography CAD SR {cad.sop_instance_uid}, object 2 of 2" in delivery["last_error"]
    assert node.study(study_uid)["state"] == "reported", "not sent while an object is missing"
    assert pacs.stored() == [(1, primary.sop_instance_uid)]

    pacs.refuse = set()
    node.start()
    wait_until(lambda: node.study(study_uid)["state"] == "sent", 10, "the retry sends every object")
    assert pacs.stored() == [(1, primary.sop_instance_uid), (2, primary.sop_instance_uid),
                             (2, cad.sop_instance_uid)], "the retry sends all again, on one association"
    [delivery] = node.study(study_uid)["deliveries"]
    assert (delivery["state"], delivery["attempts"], delivery["last_error"]) == ("sent", 2, None)


def test_a_destination_without_the_objects_class_is_told_which_one(bench: Callable[..., Bench], make_pacs) -> None:
    pacs = make_pacs("A", sr_classes=(Comprehensive3DSRStorage, ComprehensiveSRStorage))  # no Mammography CAD SR
    node = bench({"a": pacs.port})
    study_uid, _, [cad] = report_with_objects(node)
    deliver_once(node)
    [delivery] = node.study(study_uid)["deliveries"]
    assert delivery["state"] == "pending"
    assert f"A accepts no presentation context for Mammography CAD SR {cad.sop_instance_uid}" in delivery[
        "last_error"]
    assert f"accept Mammography CAD SR Storage ({MAMMO_CAD})" in delivery["last_error"]


def test_resend_sends_a_mammography_cad_primary_as_it_is_with_its_objects(
    bench: Callable[..., Bench], make_selective_pacs, tmp_path: Path
) -> None:
    """sr_sop_class chooses between the Comprehensive classes: a Mammography CAD SR is never converted."""
    pacs = make_selective_pacs()
    node = bench({"a": pacs.port})
    study_uid, primary, [sr] = report_with_objects(node, primary_class=MAMMO_CAD, extra_classes=(SR_3D,))
    deliver_once(node)
    assert node.study(study_uid)["state"] == "sent"

    settings = node.settings.model_copy(
        update={"inference": node.settings.inference.model_copy(update={"sr_sop_class": "comprehensive"})})
    assert rebuild_report(settings, node.book, study_uid) is None
    printed = cli(node, tmp_path, "resend", study_uid, sr_sop_class="comprehensive")
    assert printed.splitlines()[0] == f"{study_uid}: report scheduled for a", printed
    deliver_once(node)
    assert node.study(study_uid)["state"] == "sent"
    assert pacs.stored() == [(1, primary.sop_instance_uid), (1, sr.sop_instance_uid),
                             (2, primary.sop_instance_uid), (2, sr.sop_instance_uid)], "the same objects again"
    previous = node.book.previous_report(study_uid, "default")
    assert previous is not None and previous.sr_sop_instance_uid == primary.sop_instance_uid


def test_a_rebuilt_primary_keeps_the_objects_that_go_with_it(bench: Callable[..., Bench]) -> None:
    node = bench({"a": free_port()})
    study_uid, primary, [cad] = report_with_objects(node)
    node.book.replace_report(study_uid, "reports/x/rebuilt.dcm", "2.25.77", "rebuilt", sr_sop_class_uid="1.2.3")
    [task] = node.study(study_uid)["tasks"]
    assert [(o["sop_instance_uid"], o["sop_class_uid"]) for o in task["report_objects"]] == [
        ("2.25.77", "1.2.3"), (cad.sop_instance_uid, MAMMO_CAD)]
    [due] = node.book.due(utcnow() + timedelta(seconds=1))
    assert (due.sr_path, due.extra_paths) == ("reports/x/rebuilt.dcm", (cad.path,))


def test_a_schema_3_database_is_upgraded_keeping_its_rows(tmp_path: Path) -> None:
    """Schema 3 (tasks, one SR per result) gains details and extra objects, NULL in every row it had."""
    from triagenode.storage.engine import make_engine
    from triagenode.storage.reports import ReportBook

    path = tmp_path / "old.db"
    engine = make_engine(path)
    t = "2026-01-05 10:00:00.000000"
    with engine.begin() as connection:  # what a node of schema version 3 wrote
        connection.exec_driver_sql(
            "CREATE TABLE schema_version (version INTEGER NOT NULL PRIMARY KEY, description VARCHAR NOT NULL, "
            "applied_at DATETIME NOT NULL)"
        )
        for migration in MIGRATIONS[:3]:
            for statement in migration.statements:
                connection.exec_driver_sql(statement)
            connection.exec_driver_sql("INSERT INTO schema_version VALUES (?, 'old', ?)", (migration.version, t))
        for study_id, state in ((1, "reported"), (2, "sent")):
            connection.exec_driver_sql(
                "INSERT INTO studies (id, study_uid, state, received_at, last_instance_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?)", (study_id, f"1.2.{study_id}", state, t, t, t)
            )
            connection.exec_driver_sql(
                "INSERT INTO tasks (id, study_id, model, state, queued_at, updated_at) VALUES (?, ?, 'lung', ?, ?, ?)",
                (study_id, study_id, state, t, t),
            )
            connection.exec_driver_sql(
                "INSERT INTO task_results (task_id, applicable, finding, probability, threshold, model, "
                "model_version, timings_ms, sr_path, sr_sop_instance_uid, created_at) "
                "VALUES (?, 1, 1, 0.8, 0.5, 'lung', '2.0', '{\"total\": 5.0}', ?, ?, ?)",
                (study_id, f"reports/x/{study_id}.dcm", f"2.25.{study_id}", t),
            )
        connection.exec_driver_sql(
            "INSERT INTO task_deliveries (task_id, destination, state, attempts, next_attempt_at) "
            "VALUES (1, 'pacs', 'pending', 2, ?), (2, 'pacs', 'sent', 1, ?)", (t, t)
        )
    engine.dispose()

    upgraded = open_for_daemon(path)
    try:
        with upgraded.connect() as connection:
            versions = [row[0] for row in connection.exec_driver_sql("SELECT version FROM schema_version ORDER BY 1")]
            rows = connection.exec_driver_sql(
                "SELECT task_id, probability, sr_path, details, extra_objects, sr_sop_class_uid FROM task_results "
                "ORDER BY task_id").all()
        assert versions == list(range(1, LATEST_VERSION + 1)) and LATEST_VERSION == 4
        assert [tuple(row) for row in rows] == [(1, 0.8, "reports/x/1.dcm", None, None, None),
                                                (2, 0.8, "reports/x/2.dcm", None, None, None)]
        overview = QueueOverview(upgraded)
        for uid, state in (("1.2.1", "reported"), ("1.2.2", "sent")):
            shown = overview.study_details(uid)
            assert [(t["model"], t["state"]) for t in shown["tasks"]] == [("lung", state)]
            assert (shown["result"]["lesions"], shown["result"]["skipped"]) == ([], [])
            assert shown["result"]["timings_ms"] == {"total": 5.0}
            assert shown["report_objects"] == [
                {"sop_instance_uid": f"2.25.{uid[-1]}", "sop_class_uid": None, "primary": True, "model": "lung"}]
        [due] = ReportBook(upgraded).due(utcnow())
        assert (due.study_uid, due.sr_path, due.extra_paths, due.attempts) == ("1.2.1", "reports/x/1.dcm", (), 2)
    finally:
        upgraded.dispose()
