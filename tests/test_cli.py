"""The admin CLI against a running node: the JSON shapes scripts rely on, the tables, the exit codes."""

from __future__ import annotations

import signal
from pathlib import Path

from dicom_factory import write_study
from nodes import NodeProcess, send


def test_queue_ls_show_retry_cancel(node: NodeProcess, tmp_path: Path) -> None:
    first = write_study(tmp_path / "a", series=2, slices=3)
    second = write_study(tmp_path / "b", slices=2)
    send(node.port, first.files, calling_ae="CT1")
    send(node.port, second.files, calling_ae="CT2")
    node.wait_for_state(first.study_uid, "queued", timeout=node.stable_seconds + 15)
    node.wait_for_state(second.study_uid, "queued", timeout=node.stable_seconds + 15)

    listed = node.cli_json("queue", "ls")
    assert {s["study_uid"] for s in listed} == {first.study_uid, second.study_uid}
    row = next(s for s in listed if s["study_uid"] == first.study_uid)
    for key in ("study_uid", "state", "modality", "instances", "series", "received_at", "updated_at"):
        assert key in row, key
    assert (row["state"], row["modality"], row["instances"], row["series"]) == ("queued", "CT", 6, 2)
    assert row["received_at"].endswith("Z")
    assert len(node.cli_json("queue", "ls", "--limit", "1")) == 1

    table = node.cli("queue", "ls").stdout
    assert table.splitlines()[0].split()[:3] == ["STUDY", "UID", "STATE"]
    assert first.study_uid in table and second.study_uid in table

    assert node.cli("queue", "cancel", second.study_uid).returncode == 0
    assert [s["study_uid"] for s in node.cli_json("queue", "ls", "--state", "cancelled")] == [second.study_uid]
    assert node.cli("queue", "retry", second.study_uid).returncode == 0
    shown = node.cli_json("queue", "show", second.study_uid)
    assert shown["state"] == "queued"
    study_events = [e for e in shown["events"] if e["model"] is None]
    assert [e["to"] for e in study_events] == ["receiving", "queued", "cancelled", "queued"]
    assert study_events[2]["reason"] == "cancelled by an administrator"
    assert study_events == shown["events"], "a one-model node tells each change once, as the study's"
    assert [(t["model"], t["state"]) for t in shown["tasks"]] == [("default", "queued")]

    details = node.cli_json("queue", "show", first.study_uid)
    assert details["calling_aets"] == ["CT1"]
    assert len(details["series"]) == 2 and details["series_count"] == 2
    assert {s["series_uid"] for s in details["series"]} == set(first.series)
    assert all(s["instances"] == 3 and s["calling_aets"] == ["CT1"] for s in details["series"])
    text = node.cli("queue", "show", first.study_uid).stdout
    assert "sent by:       CT1" in text and "complete: no new instance" in text

    retry_queued = node.cli("queue", "retry", first.study_uid, check=False)
    assert retry_queued.returncode == 1
    assert "is queued; only cancelled or failed studies can be retried" in retry_queued.stderr


def test_unknown_study_is_a_clear_message_and_exit_1(node: NodeProcess) -> None:
    for command in (("queue", "show"), ("queue", "retry"), ("queue", "cancel")):
        result = node.cli(*command, "1.2.3.4.5", check=False)
        assert result.returncode == 1
        assert result.stderr.strip() == "triagenode: no study 1.2.3.4.5 on this node; `triagenode queue ls` lists them"


def test_status_reports_the_running_receiver_counts_and_disk(node: NodeProcess, tmp_path: Path) -> None:
    study = write_study(tmp_path / "a", slices=2)
    send(node.port, study.files)
    status = node.cli_json("status")
    receiver = status["receiver"]
    assert receiver["running"] is True
    assert receiver["pid"] == node.process.pid
    assert (receiver["ae_title"], receiver["port"]) == ("TRIAGENODE", node.port)
    assert receiver["uptime_s"] >= 0
    assert set(status["counts"]) == {"receiving", "queued", "processing", "reported", "sent", "failed", "cancelled",
                                     "purging"}
    assert status["counts"]["receiving"] + status["counts"]["queued"] == 1
    assert status["disk"]["free_bytes"] > 0
    human = node.cli("status").stdout
    assert f"running, pid {node.process.pid}, TRIAGENODE on port {node.port}" in human

    node.stop(signal.SIGTERM)
    stopped = node.cli("status", "--json", check=False)
    assert stopped.returncode == 1, "status exits 1 when the receiver is down, for monitoring"
    assert '"running": false' in stopped.stdout


def test_status_after_a_crash_says_not_running(node: NodeProcess) -> None:
    node.stop(signal.SIGKILL)
    result = node.cli("status", check=False)
    assert result.returncode == 1
    assert "receiver:  NOT running" in result.stdout


def test_cli_without_a_database_says_what_to_do(make_node) -> None:
    node = make_node(start=False)
    result = node.cli("queue", "ls", check=False)
    assert result.returncode == 1
    assert "the node has not run with this data_dir yet" in result.stderr
    assert not (node.data_dir / "triagenode.db").exists()


COMMANDS = (
    [], ["serve"], ["status"], ["echo"], ["infer"], ["phantom"], ["queue"], ["queue", "ls"], ["queue", "show"],
    ["queue", "retry"], ["queue", "resend"], ["queue", "cancel"], ["queue", "purge"], ["config"], ["config", "show"],
    ["model"], ["model", "info"], ["model", "train"], ["model", "evaluate"],
)
"""Every command and group of the CLI, for the checks that must hold for each."""

HEAVY = ("sqlalchemy", "pynetdicom", "pydicom", "numpy", "torch", "pydantic", "monai", "highdicom", "apscheduler")

_IMPORTS_OF = f"""
import sys
from triagenode.daemon.cli import main
try:
    main(sys.argv[1:], prog_name="triagenode")
except SystemExit:
    pass
print(sorted({{name.split(".")[0] for name in sys.modules}} & {set(HEAVY)!r}), file=sys.stderr)
"""


def _heavy_imports(*args: str) -> list[str]:
    """Which of :data:`HEAVY` the CLI's process holds after running ``triagenode ARGS`` (its last stderr line)."""
    import ast
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _IMPORTS_OF, *args], capture_output=True, text=True, timeout=120)
    return ast.literal_eval(result.stderr.strip().splitlines()[-1])


def test_help_everywhere() -> None:
    import subprocess

    from nodes import TRIAGENODE

    for command in COMMANDS:
        result = subprocess.run([TRIAGENODE, *command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "Usage:" in result.stdout, command


def test_commands_import_only_what_they_use(tmp_path: Path) -> None:
    """--help loads no heavy library; only the model commands load torch; echo and status need no SQLAlchemy.

    A monitoring probe runs ``status`` every few seconds and an administrator
    reads ``--help``: neither should wait for SQLAlchemy, pynetdicom or torch
    it does not use (tests/bench/cli_startup.py has the times).
    """
    from triagenode.storage.database import open_for_daemon

    open_for_daemon(tmp_path / "data" / "triagenode.db").dispose()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[inference]\nworkers = 0\n')
    for command in COMMANDS:
        if command[-1:] != ["ls"]:  # queue ls --help lists the queue's states, which storage.models defines
            assert _heavy_imports(*command, "--help") == [], command
    for command in (["status"], ["queue", "ls"], ["queue", "show", "1.2.3"], ["config", "show"]):
        loaded = _heavy_imports(*command, "--config", str(config))
        assert not {"torch", "pynetdicom", "numpy", "monai", "highdicom"} & set(loaded), (command, loaded)
    loaded = _heavy_imports("status", "--config", str(config))
    assert "sqlalchemy" not in loaded, "status reads the queue with plain sqlite3 (storage/snapshot.py)"
    loaded = _heavy_imports("echo", "NOBODY@127.0.0.1:1", "--timeout", "1", "--config", str(config))
    assert not {"torch", "sqlalchemy", "monai", "highdicom"} & set(loaded), loaded


def _reported(node: NodeProcess, tmp_path: Path, name: str, destinations: list[str]) -> str:
    """A study the node received, brought to ``reported`` with an SR the way a worker records it.

    The node runs without workers (no model in these CLI tests); the test
    takes the worker's part through the queue's own API.
    """
    from datetime import timedelta

    from triagenode.storage.database import open_for_cli
    from triagenode.storage.queue import StudyQueue
    from triagenode.storage.reports import Outcome, ReportBook
    from triagenode.storage.timeutil import utcnow

    from test_delivery import write_sr

    study = write_study(tmp_path / name, slices=1)
    send(node.port, study.files)
    node.wait_for_state(study.study_uid, "queued", timeout=node.stable_seconds + 15)
    engine = open_for_cli(node.data_dir / "triagenode.db")
    try:
        claim = StudyQueue(engine).claim("worker-test", 60, now=utcnow() + timedelta(seconds=1))
        assert claim is not None and claim.study_uid == study.study_uid
        sr_path, sr_uid = write_sr(node.data_dir, study.study_uid)
        result = Outcome(model="lung", model_version="2.1", finding=True, probability=0.875, threshold=0.5,
                         series_uid="1.2.3", key_instance_uid="1.2.3.4", slices=1,
                         timings_ms={"decode": 12.0, "model": 30.0, "total": 45.0})
        assert ReportBook(engine).record_result(claim, result, destinations, sr_path, sr_uid)
    finally:
        engine.dispose()
    return study.study_uid


def test_resend_show_ls_and_status_with_two_destinations(make_node, make_pacs, tmp_path: Path) -> None:
    from nodes import wait_until

    a, b = make_pacs("A"), make_pacs("B")
    node = make_node(
        destinations=[{"name": "a", "ae_title": "A", "host": "127.0.0.1", "port": a.port},
                      {"name": "b", "ae_title": "B", "host": "127.0.0.1", "port": b.port}]
    )
    study_uid = _reported(node, tmp_path, "s1", ["a", "b"])
    node.wait_for_state(study_uid, "sent", timeout=15)

    listed = node.cli_json("queue", "ls")
    assert listed[0]["outcome"] == "present"
    assert node.cli("queue", "ls").stdout.splitlines()[1].split()[1:3] == ["sent", "present"]
    text = node.cli("queue", "show", study_uid).stdout
    for line in ("finding:       PRESENT", "probability:   0.875 (threshold 0.500)", "model:         lung 2.1",
                 "key slice:     1.2.3.4", "timings:       decode 12 ms, model 30 ms, total 45 ms"):
        assert line in text, (line, text)
    sr_uid = node.cli_json("queue", "show", study_uid)["result"]["sr_sop_instance_uid"]
    assert f"report:        {sr_uid}" in text
    assert any(row.split()[:3] == ["a", "sent", "1"] for row in text.splitlines()), text

    status = node.cli_json("status")
    shown = [(d["name"], d["ae_title"], d["port"], d["pending"], d["failed"], d["sent"])
             for d in status["destinations"]]
    assert shown == [("a", "A", a.port, 0, 0, 1), ("b", "B", b.port, 0, 0, 1)]
    assert f"a A@127.0.0.1:{a.port}: 0 pending, 0 failed, 1 sent" in node.cli("status").stdout

    resent = node.cli("queue", "resend", study_uid, "--destination", "b")
    assert resent.stdout.strip() == f"{study_uid}: report scheduled for b"
    wait_until(lambda: len(b.received) == 2, 15, "B has the report again")
    assert len(a.received) == 1
    node.cli("queue", "resend", study_uid)
    wait_until(lambda: (len(a.received), len(b.received)) == (2, 3), 15, "both have it again")
    node.wait_for_state(study_uid, "sent", timeout=10)

    unknown = node.cli("queue", "resend", study_uid, "--destination", "nope", check=False)
    assert unknown.returncode == 2
    assert "no destination 'nope'" in unknown.stderr and "configured: a, b" in unknown.stderr
    missing = node.cli("queue", "resend", "1.2.3.4.5", check=False)
    assert (missing.returncode, missing.stderr.strip()) == (
        1, "triagenode: no study 1.2.3.4.5 on this node; `triagenode queue ls` lists them")

    waiting = write_study(tmp_path / "s2", slices=1)
    send(node.port, waiting.files)
    node.wait_for_state(waiting.study_uid, "queued", timeout=node.stable_seconds + 15)
    no_report = node.cli("queue", "resend", waiting.study_uid, check=False)
    assert no_report.returncode == 1 and "has no report to send (it has not been processed yet)" in no_report.stderr
    listed = {s["study_uid"]: s for s in node.cli_json("queue", "ls")}
    assert listed[waiting.study_uid]["outcome"] is None
    assert "result:        - (not processed yet)" in node.cli("queue", "show", waiting.study_uid).stdout


def test_words_agree_with_their_counts(tmp_path: Path) -> None:
    import subprocess

    from nodes import TRIAGENODE

    out = subprocess.run([TRIAGENODE, "phantom", str(tmp_path / "p"), "--studies", "1", "--slices", "8",
                          "--matrix", "64"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("wrote 1 study (")


def test_a_missing_model_is_a_configuration_error_for_serve_and_config_show(tmp_path: Path) -> None:
    """serve and config show agree: exit 2, one line naming the key, the file and what to do."""
    import subprocess

    from nodes import TRIAGENODE

    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\nport = 11999\n[inference]\nmodel = "/nowhere/lung.tnm"\n'
    )
    expected = (
        f"triagenode: config error in {config}: inference.model: model package /nowhere/lung.tnm does not exist; "
        "check the path (or use a built-in model: demo, mammo-demo, brain-demo)"
    )
    for command in (["serve"], ["config", "show"], ["config", "show", "--json"]):
        result = subprocess.run([TRIAGENODE, *command, "--config", str(config)], capture_output=True, text=True,
                                timeout=60)
        assert (result.returncode, result.stderr.strip()) == (2, expected), command

    broken = tmp_path / "broken.tnm"
    broken.write_bytes(b"not a zip")
    config.write_text(config.read_text().replace("/nowhere/lung.tnm", str(broken)))
    result = subprocess.run([TRIAGENODE, "config", "show", "--config", str(config)], capture_output=True, text=True)
    assert result.returncode == 2 and "inference.model: " in result.stderr and str(broken) in result.stderr

    config.write_text(config.read_text() + "workers = 0\n")  # a receive-only node runs no model
    assert subprocess.run([TRIAGENODE, "config", "show", "--config", str(config)], capture_output=True).returncode == 0
