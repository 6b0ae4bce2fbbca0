"""Real nodes for the tests: ``triagenode serve`` as a process on a free loopback port, and how to talk to it.

The fixtures that start and clean up nodes and peers live in ``conftest.py``;
what a test calls directly (send, wait, the node's handle) lives here, so no
test imports ``conftest``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification

from triagenode.storage.database import open_for_cli
from triagenode.storage.overview import QueueOverview
from triagenode.storage.snapshot import NodeSnapshot, read_snapshot
from triagenode.storage.timeutil import utcnow

# Files are sent as their bytes lie on disk (a truncated file arrives truncated),
# the way a PACS forwards what it holds.
_config.STORE_SEND_CHUNKED_DATASET = True

BIN = Path(sys.executable).parent
TRIAGENODE = str(BIN / "triagenode")
NODE_AE = "TRIAGENODE"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Any, timeout: float, message: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s: {message}")


class NodeProcess:
    """A ``triagenode serve`` process with its own config, data directory and port.

    Keyword arguments are ``[node]`` keys, except ``stable_seconds`` (``[study]``),
    ``inference``, ``delivery``, ``tls``, ``audit`` and ``storage`` (dicts for those
    sections; ``workers`` is 0 unless given), and ``destinations`` and ``peers``
    (lists of ``[[destinations]]`` and ``[[peers]]`` dicts).
    """

    def __init__(self, root: Path, **node_settings: Any) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.data_dir = root / "data"
        self.port = int(node_settings.pop("port", 0)) or free_port()
        self.config_path = root / "triagenode.toml"
        self.log_path = root / "node.log"
        self.stable_seconds = node_settings.pop("stable_seconds", 1.0)
        self.probe_ae = (node_settings.get("allowed_calling_aets") or ["PROBE"])[0]
        inference = {"workers": 0, **node_settings.pop("inference", {})}
        destinations = node_settings.pop("destinations", [])
        delivery = node_settings.pop("delivery", {})
        sections = {name: node_settings.pop(name) for name in ("tls", "audit", "storage") if name in node_settings}
        peers = node_settings.pop("peers", [])
        self.tls_port = int(sections.get("tls", {}).get("port", 0)) or None
        node = {
            "ae_title": NODE_AE,
            "host": "127.0.0.1",
            "port": self.port,
            "data_dir": str(self.data_dir),
            "min_free_disk_mb": 1,
            "shutdown_grace_s": 5,
            **node_settings,
        }
        lines = ["[node]"] + [f"{key} = {json.dumps(value)}" for key, value in node.items()]
        lines += ["", "[study]", f"stable_seconds = {self.stable_seconds}"]
        lines += ["", "[inference]"] + [f"{key} = {json.dumps(value)}" for key, value in inference.items()]
        if delivery:
            lines += ["", "[delivery]"] + [f"{key} = {json.dumps(value)}" for key, value in delivery.items()]
        for name, values in sections.items():
            lines += ["", f"[{name}]"] + [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        for destination in destinations:
            lines += ["", "[[destinations]]"] + [f"{key} = {json.dumps(value)}" for key, value in destination.items()]
        for peer in peers:
            lines += ["", "[[peers]]"] + [f"{key} = {json.dumps(value)}" for key, value in peer.items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None
        self._overview: QueueOverview | None = None

    def start(self, wait: bool = True) -> NodeProcess:
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [TRIAGENODE, "serve", "--config", str(self.config_path)], stdout=log, stderr=log, env=env
        )
        log.close()
        if wait:
            wait_until(self._echoes, 30, f"node on port {self.port} never answered C-ECHO; log:\n{self.log()}", 0.2)
        return self

    def refused_start(self) -> str:
        """Run ``serve`` expecting it to refuse to start; the one ``triagenode: ...`` line it printed."""
        result = subprocess.run([TRIAGENODE, "serve", "--config", str(self.config_path)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode != 0, "the node started"
        lines = [line for line in result.stderr.splitlines() if line.startswith("triagenode:")]
        assert len(lines) == 1, result.stderr
        return lines[0]

    def _echoes(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"node exited with {self.process.returncode}; log:\n{self.log()}")
        ae = AE(ae_title=self.probe_ae)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AE)
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return bool(status) and status.Status == 0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [TRIAGENODE, *args, "--config", str(self.config_path)], capture_output=True, text=True, timeout=60
        )
        if check and result.returncode != 0:
            raise AssertionError(f"triagenode {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def snapshot(self) -> NodeSnapshot:
        """What ``triagenode status`` reads, now."""
        return read_snapshot(self.data_dir / "triagenode.db", utcnow())

    @property
    def overview(self) -> QueueOverview:
        if self._overview is None:
            self._overview = QueueOverview(open_for_cli(self.data_dir / "triagenode.db"))
        return self._overview

    def study(self, study_uid: str) -> dict[str, Any] | None:
        try:
            return self.overview.study_details(study_uid)
        except LookupError:
            return None

    def wait_for_state(self, study_uid: str, state: str, timeout: float = 20) -> dict[str, Any]:
        return wait_until(
            lambda: (s := self.study(study_uid)) is not None and s["state"] == state and s,
            timeout,
            f"study {study_uid} never reached {state}: {self.study(study_uid)}",
        )


def store_scu(calling_ae: str = "TESTSCU", contexts: Sequence[tuple[str, Sequence[str]]] | None = None) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for abstract, syntaxes in contexts or [(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])]:
        ae.add_requested_context(abstract, list(syntaxes))
    return ae


def send(
    port: int,
    items: Sequence[Path | Dataset],
    calling_ae: str = "TESTSCU",
    contexts: Sequence[tuple[str, Sequence[str]]] | None = None,
) -> list[int]:
    """One association, one C-STORE per item; the statuses in order (-1 when none came)."""
    ae = store_scu(calling_ae, contexts)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established, f"association from {calling_ae} was not established"
    statuses = []
    try:
        for item in items:
            status = assoc.send_c_store(item)
            statuses.append(int(status.Status) if status and "Status" in status else -1)
    finally:
        assoc.release()
    return statuses


def study_events(details: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's own history from ``queue show --json`` (its state as its tasks sum it up); on a
    one-model node that is the whole history, one line per change."""
    return [event for event in details["events"] if event["model"] is None]
