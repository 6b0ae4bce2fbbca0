"""The study queue on a real SQLite file: states, events, leases, migrations."""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text

from triagenode.storage.database import DatabaseUnavailableError, open_for_cli, open_for_daemon
from triagenode.storage.migrations import LATEST_VERSION, SchemaTooNewError, upgrade
from triagenode.storage.models import Base, StudyState, TaskState
from triagenode.storage.overview import QueueOverview
from triagenode.storage.queue import (
    Claim,
    ReceivedInstance,
    Registration,
    StudyQueue,
    TransitionError,
    UnknownStudyError,
)
from triagenode.storage.snapshot import SCHEMA_VERSION, read_snapshot
from triagenode.storage.timeutil import utcnow


@pytest.fixture
def database(tmp_path: Path):
    engine = open_for_daemon(tmp_path / "triagenode.db")
    yield engine
    engine.dispose()


def database_file(engine) -> Path:
    return Path(engine.url.database)


def instance(study: str, series: str = "1.2.3.1", sop: str = "1.2.3.1.1", aet: str = "CT1") -> ReceivedInstance:
    return ReceivedInstance(
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"studies/{study}/{series}/{sop}.dcm",
        size=1000,
        calling_ae=aet,
        modality="CT",
    )


def queued_study(queue: StudyQueue, uid: str) -> str:
    queue.record_instance(instance(uid, sop=uid + ".9"))
    assert uid in queue.complete_stable_studies(0, now=utcnow() + timedelta(seconds=1))
    return uid


def test_instances_build_studies_and_series_with_counts(database) -> None:
    queue = StudyQueue(database)
    assert queue.record_instance(instance("1.2.3", sop="1.2.3.1.1")) is Registration.NEW_STUDY
    assert queue.record_instance(instance("1.2.3", sop="1.2.3.1.2")) is Registration.ADDED
    assert queue.record_instance(instance("1.2.3", series="1.2.3.2", sop="1.2.3.2.1", aet="MR1")) is Registration.ADDED
    assert queue.record_instance(instance("1.2.3", sop="1.2.3.1.2")) is Registration.DUPLICATE
    details = QueueOverview(database).study_details("1.2.3")
    assert (details["instances"], details["series_count"], details["bytes"]) == (3, 2, 3000)
    assert [s["instances"] for s in details["series"]] == [2, 1]
    assert details["calling_aets"] == ["CT1", "MR1"]


def test_stability_completes_only_quiet_studies(database) -> None:
    queue = StudyQueue(database)
    now = utcnow()
    queue.record_instance(instance("1.2.3", sop="1.2.3.1.1"), now=now - timedelta(seconds=40))
    queue.record_instance(instance("1.2.4", sop="1.2.4.1.1"), now=now - timedelta(seconds=10))
    assert queue.complete_stable_studies(30, now=now) == ["1.2.3"]
    counts = read_snapshot(database_file(database), utcnow()).counts
    assert counts["queued"] == 1 and counts["receiving"] == 1


def test_restart_gives_receiving_studies_a_full_window(database) -> None:
    queue = StudyQueue(database)
    now = utcnow()
    queue.record_instance(instance("1.2.3"), now=now - timedelta(hours=2))
    assert queue.restart_stability_clocks(now=now) == 1
    assert queue.complete_stable_studies(30, now=now + timedelta(seconds=10)) == []
    assert queue.complete_stable_studies(30, now=now + timedelta(seconds=31)) == ["1.2.3"]


def test_two_workers_racing_never_take_the_same_study(database) -> None:
    queue = StudyQueue(database)
    uids = [queued_study(queue, f"1.2.{i}") for i in range(30)]
    taken: dict[str, list[str]] = {"w1": [], "w2": [], "w3": []}

    def worker(name: str) -> None:
        own = StudyQueue(database)
        while (claim := own.claim(name, lease_seconds=60)) is not None:
            taken[name].append(claim.study_uid)

    threads = [threading.Thread(target=worker, args=(name,)) for name in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    everything = [uid for claims in taken.values() for uid in claims]
    assert sorted(everything) == sorted(uids), "each study taken exactly once"


def test_an_expired_lease_returns_the_study_then_fails_it_after_three_attempts(database) -> None:
    queue = StudyQueue(database)
    uid = queued_study(queue, "1.2.3")
    now = utcnow()
    for attempt in range(1, 4):
        claim = queue.claim(f"worker-{attempt}", lease_seconds=10, now=now)
        assert claim is not None and claim.attempt == attempt
        assert queue.claim("other", lease_seconds=10, now=now) is None, "held under a lease"
        assert queue.recover_expired_leases(3, now=now + timedelta(seconds=5)) == [], "lease still valid"
        now += timedelta(seconds=11)
        assert queue.recover_expired_leases(3, now=now) == [uid]
    details = QueueOverview(database).study_details(uid)
    assert details["state"] == "failed"
    assert "attempt 3 of 3" in details["events"][-1]["reason"]
    assert queue.renew(claim, 10) is None and not queue.finish(claim, "reported", "late")

    queue.retry(uid)
    assert QueueOverview(database).study_details(uid)["state"] == "queued"
    claim = queue.claim("worker-4", lease_seconds=10)
    assert claim is not None and claim.attempt == 1, "retry starts the attempt count afresh"


def test_lease_renewal_and_finish_belong_to_the_holder(database) -> None:
    queue = StudyQueue(database)
    uid = queued_study(queue, "1.2.3")
    claim = queue.claim("w1", lease_seconds=10)
    assert claim is not None
    impostor = Claim(uid, "w2", claim.lease_expires_at, 1)
    assert queue.renew(impostor, 10) is None
    assert not queue.finish(impostor, "reported", "not mine")
    renewed = queue.renew(claim, 100)
    assert renewed is not None and renewed.lease_expires_at > claim.lease_expires_at
    assert queue.finish(claim, "reported", "finding absent")
    assert QueueOverview(database).study_details(uid)["state"] == "reported"


def test_a_cancelled_study_is_lost_by_its_worker(database) -> None:
    queue = StudyQueue(database)
    uid = queued_study(queue, "1.2.3")
    claim = queue.claim("w1", lease_seconds=60)
    assert claim is not None
    queue.cancel(uid)
    assert queue.renew(claim, 60) is None
    assert not queue.finish(claim, "reported", "too late")
    with pytest.raises(TransitionError, match="cannot be cancelled"):
        queue.cancel(uid)


def test_retry_and_cancel_refuse_what_they_cannot_do(database) -> None:
    queue = StudyQueue(database)
    queue.record_instance(instance("1.2.3"))
    with pytest.raises(TransitionError, match="only cancelled or failed studies can be retried"):
        queue.retry("1.2.3")
    with pytest.raises(UnknownStudyError, match="no study 9.9.9"):
        queue.cancel("9.9.9")


def test_a_late_instance_reopens_even_a_processing_study(database) -> None:
    queue = StudyQueue(database)
    uid = queued_study(queue, "1.2.3")
    claim = queue.claim("w1", lease_seconds=60)
    assert queue.record_instance(instance(uid, sop="1.2.3.1.77")) is Registration.REOPENED
    assert claim is not None and queue.renew(claim, 60) is None, "the worker's result would be stale"
    details = QueueOverview(database).study_details(uid)
    assert details["state"] == "receiving" and details["lease_owner"] is None


def test_migrations_build_the_schema_the_models_describe(database) -> None:
    inspector = inspect(database)
    for table in Base.metadata.sorted_tables:
        columns = {c["name"]: c for c in inspector.get_columns(table.name)}
        assert set(columns) == {c.name for c in table.columns}, table.name
        for column in table.columns:
            assert columns[column.name]["nullable"] == column.nullable, f"{table.name}.{column.name}"
        indexed = {tuple(i["column_names"]) for i in inspector.get_indexes(table.name)}
        for index in table.indexes:
            assert tuple(c.name for c in index.columns) in indexed, f"{table.name}: {index.name}"


def test_upgrading_is_idempotent_and_a_newer_database_is_refused(tmp_path: Path, database) -> None:
    assert upgrade(database) == []
    with database.begin() as connection:
        connection.execute(
            text("INSERT INTO schema_version (version, description, applied_at) VALUES (:v, 'future', '2030-01-01')"),
            {"v": LATEST_VERSION + 1},
        )
    with pytest.raises(SchemaTooNewError, match="newer node"):
        upgrade(database)
    with pytest.raises(DatabaseUnavailableError, match="restart the node"):
        open_for_cli(tmp_path / "triagenode.db")


def test_the_cli_never_creates_a_database(tmp_path: Path) -> None:
    with pytest.raises(DatabaseUnavailableError, match="has not run with this data_dir"):
        open_for_cli(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


def test_a_database_of_the_one_model_node_is_upgraded_in_place_keeping_its_studies(tmp_path: Path) -> None:
    """Schema 2 (one model, leases on studies) becomes tasks: states, attempts, results and deliveries kept."""
    from triagenode.storage.engine import make_engine
    from triagenode.storage.migrations import MIGRATIONS
    from triagenode.storage.reports import ReportBook

    path = tmp_path / "old.db"
    engine = make_engine(path)
    t = "2026-11-01 10:00:00.000000"
    with engine.begin() as connection:  # what a node of schema version 2 wrote
        connection.exec_driver_sql(
            "CREATE TABLE schema_version (version INTEGER NOT NULL PRIMARY KEY, description VARCHAR NOT NULL, "
            "applied_at DATETIME NOT NULL)"
        )
        for migration in MIGRATIONS[:2]:
            for statement in migration.statements:
                connection.exec_driver_sql(statement)
            connection.exec_driver_sql("INSERT INTO schema_version VALUES (?, 'old', ?)", (migration.version, t))
        studies = [(1, "1.2.1", "receiving", 0), (2, "1.2.2", "queued", 1), (3, "1.2.3", "reported", 0),
                   (4, "1.2.4", "sent", 0), (5, "1.2.5", "failed", 3)]
        for study_id, uid, state, attempts in studies:
            connection.exec_driver_sql(
                "INSERT INTO studies (id, study_uid, state, received_at, last_instance_at, updated_at, "
                "processing_attempts) VALUES (?, ?, ?, ?, ?, ?, ?)", (study_id, uid, state, t, t, t, attempts)
            )
        for study_id in (3, 4):
            connection.exec_driver_sql(
                "INSERT INTO study_results (study_id, applicable, finding, probability, threshold, model, "
                "model_version, timings_ms, sr_path, sr_sop_instance_uid, created_at) "
                "VALUES (?, 1, 1, 0.9, 0.5, 'lung', '1.0', '{}', ?, ?, ?)",
                (study_id, f"reports/x/{study_id}.dcm", f"2.25.{study_id}", t),
            )
        connection.exec_driver_sql(
            "INSERT INTO deliveries (study_id, destination, state, attempts, next_attempt_at) "
            "VALUES (3, 'pacs', 'pending', 2, ?), (4, 'pacs', 'sent', 1, ?)", (t, t)
        )
    engine.dispose()

    upgraded = open_for_daemon(path)
    overview = QueueOverview(upgraded)
    with upgraded.connect() as connection:
        versions = [row[0] for row in connection.exec_driver_sql("SELECT version FROM schema_version ORDER BY 1")]
    assert versions == list(range(1, LATEST_VERSION + 1))
    assert overview.study_details("1.2.1")["tasks"] == [], "a study still receiving gets its tasks when complete"
    for _, uid, state, attempts in studies[1:]:
        details = overview.study_details(uid)
        assert details["state"] == state
        assert [(t["model"], t["state"], t["attempts"]) for t in details["tasks"]] == [("default", state, attempts)]
    reported = overview.study_details("1.2.3")
    assert reported["result"]["probability"] == 0.9 and reported["result"]["sr_sop_instance_uid"] == "2.25.3"
    assert [(d["destination"], d["state"], d["attempts"]) for d in reported["deliveries"]] == [("pacs", "pending", 2)]
    [due] = ReportBook(upgraded).due(utcnow())
    assert (due.study_uid, due.destination, due.sr_path, due.model) == ("1.2.3", "pacs", "reports/x/3.dcm", "default")
    claim = StudyQueue(upgraded).claim("w1", 60)
    assert claim is not None and (claim.study_uid, claim.model, claim.attempt) == ("1.2.2", "default", 2)
    assert read_snapshot(path, utcnow()).counts["sent"] == 1


def test_only_interrupted_runs_count_toward_the_attempt_limit(database) -> None:
    """Two successful runs (re-opened by late instances in between), then one crash: queued again, not failed."""
    queue = StudyQueue(database)
    uid = queued_study(queue, "1.2.7")
    for round_ in range(2):
        claim = queue.claim("w1", lease_seconds=60)
        assert claim is not None and claim.attempt == 1
        assert queue.finish(claim, StudyState.REPORTED, "finding absent")
        assert queue.record_instance(instance(uid, sop=f"{uid}.late{round_}")) is Registration.REOPENED
        assert uid in queue.complete_stable_studies(0, now=utcnow() + timedelta(seconds=1))
    claim = queue.claim("w2", lease_seconds=60)
    assert claim is not None and claim.attempt == 1, "successful runs are not attempts used up"
    assert queue.recover_expired_leases(owner="w2") == [uid]
    details = QueueOverview(database).study_details(uid)
    assert details["state"] == "queued", details["events"][-1]
    assert details["processing_attempts"] == 1
    assert "attempt 1 of 3; back in the queue" in details["events"][-1]["reason"]


def test_a_study_received_before_the_clock_stepped_back_is_not_held_for_the_step(database) -> None:
    queue = StudyQueue(database)
    arrived = utcnow()
    queue.record_instance(instance("1.2.8", sop="1.2.8.1"), now=arrived + timedelta(hours=1))  # clock then stepped back
    assert queue.complete_stable_studies(5, now=arrived) == [], "a full stability window from now, no less"
    assert queue.complete_stable_studies(5, now=arrived + timedelta(seconds=6)) == ["1.2.8"], "not an hour"


def test_a_state_change_is_logged_only_once_committed(database, caplog: pytest.LogCaptureFixture) -> None:
    from triagenode.storage.engine import writer
    from triagenode.storage.models import Study
    from triagenode.storage.queue import move_task

    queue = StudyQueue(database)
    uid = queued_study(queue, "1.2.9")
    caplog.set_level("INFO", logger="triagenode.queue")
    caplog.clear()
    with pytest.raises(RuntimeError), writer(database).begin() as session:
        study = session.scalar(select(Study).where(Study.study_uid == uid))
        move_task(session, study.tasks[0], TaskState.CANCELLED, "about to roll back", utcnow())
        raise RuntimeError("the transaction fails after the change")
    assert "about to roll back" not in caplog.text, "the log showed a change the database never had"
    queue.cancel(uid, "cancelled for real")
    assert "cancelled for real" in caplog.text


def test_a_stop_gives_studies_back_without_counting_and_live_workers_keep_their_leases(database) -> None:
    queue = StudyQueue(database)
    uid = queued_study(queue, "1.2.10")
    claim = queue.claim("w1", lease_seconds=10)
    assert claim is not None
    later = utcnow() + timedelta(seconds=60)  # the wall clock stepped forward a minute
    assert queue.recover_expired_leases(now=later, alive=["w1"]) == [], "a live worker's lease is its own"
    assert queue.release_for_stop() == [uid]
    details = QueueOverview(database).study_details(uid)
    assert details["state"] == "queued" and details["processing_attempts"] == 0, "a stop is not the study's fault"


def test_a_reopened_study_drops_its_undelivered_report(database) -> None:
    """The pending report lacks the late instance; it must not go out later, even if the new run fails."""
    from triagenode.storage.reports import Outcome, ReportBook

    queue, book = StudyQueue(database), ReportBook(database)
    uid = queued_study(queue, "1.2.11")
    claim = queue.claim("w1", lease_seconds=60)
    assert claim is not None
    result = Outcome(model="m", model_version="1", finding=True, probability=0.9, threshold=0.5)
    assert book.record_result(claim, result, ["pacs"], f"reports/{uid}/1.2.99.dcm", "1.2.99")
    assert book.due(utcnow() + timedelta(seconds=1)), "the report is due"
    assert queue.record_instance(instance(uid, sop=f"{uid}.late")) is Registration.REOPENED
    assert uid in queue.complete_stable_studies(0, now=utcnow() + timedelta(seconds=1))
    claim = queue.claim("w1", lease_seconds=60)
    assert claim is not None and queue.finish(claim, StudyState.FAILED, "worker error")
    assert book.due(utcnow() + timedelta(seconds=1)) == [], "the old report stays home"


def test_the_status_snapshot_reads_what_the_orm_wrote(database) -> None:
    """``status`` reads with plain sqlite3; it must agree with the ORM on a database the queue filled."""
    from sqlalchemy import func

    from triagenode.storage.heartbeat import Heartbeat
    from triagenode.storage.models import Delivery, Study
    from triagenode.storage.reports import Outcome, ReportBook

    assert LATEST_VERSION == SCHEMA_VERSION
    queue, book = StudyQueue(database), ReportBook(database)
    now = utcnow()
    for uid in ("1.2.20", "1.2.21", "1.2.22"):
        queued_study(queue, uid)
    queue.record_instance(instance("1.2.23", sop="1.2.23.1"))  # still receiving
    claim = queue.claim("w1", lease_seconds=60)
    assert claim is not None
    result = Outcome(model="m", model_version="1", finding=True, probability=0.9, threshold=0.5)
    assert book.record_result(claim, result, ["pacs", "backup"], f"reports/{claim.study_uid}/1.2.99.dcm", "1.2.99")
    [to_backup] = [d for d in book.due(now + timedelta(seconds=1)) if d.destination == "backup"]
    assert book.failed_attempt(to_backup.id, "no association", now, max_attempts=1) is not None
    Heartbeat(database).announce("TRIAGE", 11112, now=now)

    snapshot = read_snapshot(database_file(database), now + timedelta(seconds=5))
    with database.connect() as connection:
        by_state = dict(connection.execute(select(Study.state, func.count()).group_by(Study.state)).all())
        deliveries = connection.execute(
            select(Delivery.destination, Delivery.state, func.count()).group_by(Delivery.destination, Delivery.state)
        ).all()
        oldest = connection.execute(
            select(Study.study_uid, Study.updated_at)
            .where(Study.state == StudyState.QUEUED)
            .order_by(Study.updated_at)
            .limit(1)
        ).one()
    assert snapshot.counts == {state.value: by_state.get(state, 0) for state in StudyState}
    assert (snapshot.counts["queued"], snapshot.counts["receiving"], snapshot.counts["reported"]) == (2, 1, 1)
    assert {(d.destination, d.pending, d.failed, d.sent) for d in snapshot.destinations.values()} == {
        ("pacs", 1, 0, 0),
        ("backup", 0, 1, 0),
    }
    assert len(deliveries) == 2
    assert snapshot.oldest_waiting is not None
    assert (snapshot.oldest_waiting.study_uid, snapshot.oldest_waiting.queued_at) == tuple(oldest)
    receiver = snapshot.receiver
    assert (receiver.pid, receiver.ae_title, receiver.port, receiver.started_at) == (os.getpid(), "TRIAGE", 11112, now)
    assert not receiver.running, "this process holds no lock on the data directory: not a running node"


def _route_to(*models: str, matched: bool = True):
    from triagenode.storage.routes import RouteDecision

    return lambda study: [RouteDecision(model, matched, "test route") for model in models]


def _take_and_report(queue: StudyQueue, database, model: str) -> None:
    from triagenode.storage.reports import Outcome, ReportBook

    claim = queue.claim("w1", 60, models=[model])
    assert claim is not None and claim.model == model
    outcome = Outcome(model=model, model_version="1", finding=False, probability=0.1, threshold=0.5)
    assert ReportBook(database).record_result(claim, outcome, [], f"reports/{claim.study_uid}/{model}.dcm", model)


def test_a_late_instance_re_routes_and_a_sent_report_stays_sent_while_other_studies_go_on(database) -> None:
    queue = StudyQueue(database)
    queue.record_instance(instance("1.2.30", sop="1.2.30.1"))
    assert queue.complete_stable_studies(0, now=utcnow() + timedelta(seconds=1), router=_route_to("a", "b")) == [
        "1.2.30"
    ]
    _take_and_report(queue, database, "a")
    _take_and_report(queue, database, "b")
    with database.begin() as connection:  # a's report reached its destination
        connection.execute(text("UPDATE tasks SET state = 'sent' WHERE model = 'a'"))
    assert queue.record_instance(instance("1.2.30", sop="1.2.30.2")) is Registration.REOPENED
    queue.record_instance(instance("1.2.31", sop="1.2.31.1"))  # another study completes in the same pass
    no_longer = _route_to("a", "b", matched=False)
    assert sorted(queue.complete_stable_studies(0, now=utcnow() + timedelta(seconds=1), router=no_longer)) == [
        "1.2.30", "1.2.31"]
    details = QueueOverview(database).study_details("1.2.30")
    assert [(t["model"], t["state"]) for t in details["tasks"]] == [("a", "sent"), ("b", "cancelled")]
    assert QueueOverview(database).study_details("1.2.31")["state"] == "reported", "no model applies"


def test_cancel_then_retry_a_re_opened_study_routes_it_afresh(database) -> None:
    queue = StudyQueue(database)
    queue.record_instance(instance("1.2.32", sop="1.2.32.1"))
    queue.complete_stable_studies(0, now=utcnow() + timedelta(seconds=1), router=_route_to("a"))
    _take_and_report(queue, database, "a")
    queue.record_instance(instance("1.2.32", sop="1.2.32.2"))  # re-opened: receiving, task a reported
    queue.cancel("1.2.32")
    details = QueueOverview(database).study_details("1.2.32")
    assert details["state"] == "cancelled" and [t["state"] for t in details["tasks"]] == ["cancelled"]
    assert queue.retry("1.2.32") == "a: queued again"
    assert queue.claim("w1", 60) is not None, "the retried task is queued"


def test_a_failed_task_shows_even_while_another_waits_and_messages_name_the_task(database) -> None:
    queue = StudyQueue(database)
    queue.record_instance(instance("1.2.33", sop="1.2.33.1"))
    queue.complete_stable_studies(0, now=utcnow() + timedelta(seconds=1), router=_route_to("a", "b"))
    queue.pause("b")
    claim = queue.claim("w1", 60)
    assert claim is not None and claim.model == "a"
    assert queue.finish(claim, StudyState.FAILED, "the series cannot be read")
    assert QueueOverview(database).study_details("1.2.33")["state"] == "failed", "not hidden behind b's queued task"
    with pytest.raises(TransitionError, match="has b queued; only cancelled or failed"):
        queue.retry("1.2.33", model="b")
    assert queue.retry("1.2.33", model="a") == "a: queued again"


def test_queued_tasks_of_a_model_no_longer_configured_are_cancelled(database) -> None:
    queue = StudyQueue(database)
    queued_study(queue, "1.2.34")  # the one model of before [[models]]: "default"
    assert queue.cancel_unconfigured(["lung"]) == {"default": 1}
    assert QueueOverview(database).study_details("1.2.34")["state"] == "cancelled"
    assert queue.cancel_unconfigured(["lung"]) == {}
