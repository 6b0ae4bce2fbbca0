"""Failure paths a site meets sooner or later: a model run that hangs."""

from __future__ import annotations

from pathlib import Path

from triagenode.inference.phantom import write_phantom_study

from conftest import NodeProcess, send, wait_until


def test_a_worker_busy_past_study_timeout_s_is_killed_and_the_study_fails_after_three_tries(
    make_node, tmp_path: Path
) -> None:
    """A study that takes longer than study_timeout_s (here: any real study, at 1 s) must not hold a worker forever."""
    study = write_phantom_study(tmp_path / "slow", seed=83, index=0, positive=True, slices=400, matrix=512)
    assert study.directory is not None
    node: NodeProcess = make_node(inference={"workers": 1, "device": "cpu", "study_timeout_s": 1})
    wait_until(lambda: "worker.ready" in node.log(), 90, "the worker loaded its model")
    files = sorted(study.directory.glob("*.dcm"))
    assert send(node.port, files) == [0] * len(files)
    details = node.wait_for_state(study.study_uid, "failed", timeout=180)
    reasons = [event["reason"] for event in details["events"]]
    killed = [reason for reason in reasons if "killed after study_timeout_s=1" in reason]
    assert len(killed) == 3, reasons
    assert "on attempt 3 of 3; giving up" in killed[-1]
    assert details["processing_attempts"] == 3
    assert node.log().count("worker.timeout") == 3
    wait_until(lambda: node.log().count("worker.ready") == 4, 90, "a fresh worker after the last kill")
