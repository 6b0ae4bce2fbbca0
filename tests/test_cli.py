"""The admin CLI against a running node: the JSON shapes scripts rely on, the tables, the exit codes."""

from __future__ import annotations

import signal
from pathlib import Path

from conftest import NodeProcess, send
from dicom_factory import write_study


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
    assert [e["to"] for e in shown["events"]] == ["receiving", "queued", "cancelled", "queued"]
    assert shown["events"][2]["reason"] == "cancelled by an administrator"

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
    assert set(status["counts"]) == {"receiving", "queued", "processing", "reported", "sent", "failed", "cancelled"}
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


def test_help_everywhere(node: NodeProcess) -> None:
    import subprocess

    from conftest import TRIAGENODE

    for command in (
        [],
        ["serve"],
        ["status"],
        ["queue"],
        ["queue", "ls"],
        ["queue", "show"],
        ["echo"],
        ["config", "show"],
    ):
        result = subprocess.run([TRIAGENODE, *command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "Usage:" in result.stdout, command
