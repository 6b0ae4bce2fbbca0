"""A private Orthanc for the tests: its own config, storage and loopback ports, never the system service."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from nodes import free_port


class Orthanc:
    """One Orthanc process; ``rest()`` talks to its HTTP API."""

    def __init__(self, root: Path, modalities: dict[str, tuple[str, str, int]] | None = None) -> None:
        self.root = root
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.ae_title = "ORTHANC"
        storage = root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "orthanc.json"
        self.config_path.write_text(
            json.dumps(
                {
                    "Name": "triagenode-tests",
                    "StorageDirectory": str(storage),
                    "IndexDirectory": str(storage),
                    "DicomAet": self.ae_title,
                    "DicomPort": self.dicom_port,
                    "HttpPort": self.http_port,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "DicomCheckCalledAet": False,
                    "DicomModalities": {name: list(entry) for name, entry in (modalities or {}).items()},
                    "Plugins": [],
                }
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("Orthanc") is not None

    def start(self) -> Orthanc:
        log = open(self.root / "orthanc.log", "ab")
        self.process = subprocess.Popen(
            ["Orthanc", str(self.config_path)], stdout=log, stderr=log, env={**os.environ, "TCP_NODELAY": "1"}
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.rest("/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        raise AssertionError(f"Orthanc did not start; log:\n{(self.root / 'orthanc.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)

    def rest(self, path: str, data: bytes | None = None, method: str | None = None, raw: bool = False) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(request, timeout=120) as response:
            body = response.read()
        return body if raw else json.loads(body)

    def upload(self, path: Path) -> dict[str, Any]:
        return self.rest("/instances", data=path.read_bytes(), method="POST")

    def study_id(self, study_uid: str) -> str | None:
        found = self.rest("/tools/lookup", data=study_uid.encode(), method="POST")
        return next((entry["ID"] for entry in found if entry["Type"] == "Study"), None)
