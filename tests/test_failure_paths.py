"""Failure paths a site meets sooner or later: a model run that hangs."""

from __future__ import annotations

from pathlib import Path

from dicom_factory import write_study
from nodes import NodeProcess, send, study_events, wait_until


def test_a_worker_busy_past_study_timeout_s_is_killed_and_the_study_fails_after_three_tries(
    make_node, tmp_path: Path
) -> None:
    """A study that takes longer than study_timeout_s (here: any real study, at 1 s) must not hold a worker forever."""
    # What takes the time is the size (400 slices of 512x512), not the content: noise is written in a moment.
    study = write_study(tmp_path / "slow", slices=400, rows=512, columns=512)
    node: NodeProcess = make_node(inference={"workers": 1, "device": "cpu", "study_timeout_s": 1})
    wait_until(lambda: "worker.ready" in node.log(), 90, "the worker loaded its model")
    assert send(node.port, study.files) == [0] * len(study.files)
    details = node.wait_for_state(study.study_uid, "failed", timeout=180)
    reasons = [event["reason"] for event in study_events(details)]
    killed = [reason for reason in reasons if "killed after study_timeout_s=1" in reason]
    assert len(killed) == 3, reasons
    assert "on attempt 3 of 3; giving up" in killed[-1]
    assert details["processing_attempts"] == 3
    assert node.log().count("worker.timeout") == 3
    wait_until(lambda: node.log().count("worker.ready") == 4, 90, "a fresh worker after the last kill")
