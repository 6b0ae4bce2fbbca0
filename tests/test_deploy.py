"""The install script and the systemd unit, checked as far as a machine without systemd allows."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent


def install(root: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TRIAGENODE_ROOT": str(root),
        # Offline and fast: the node itself, without its (already tested) dependencies.
        "TRIAGENODE_PIP_OPTIONS": "--no-deps",
        "TRIAGENODE_TORCH": "setuptools",
        "PYTHON": shutil.which("python3") or "python3",
    }
    return subprocess.run(
        ["bash", str(REPO / "deploy" / "install.sh")], capture_output=True, text=True, env=env, timeout=600
    )


def test_install_script_in_a_scratch_root_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = install(root)
    assert first.returncode == 0, first.stderr
    config = root / "etc/triagenode/triagenode.toml"
    assert config.read_text() == (REPO / "deploy/triagenode.example.toml").read_text()
    assert (root / "etc/systemd/system/triagenode.service").is_file()
    assert (root / "var/lib/triagenode").is_dir()
    assert (root / "opt/triagenode/venv/bin/triagenode").is_file()
    assert os.readlink(root / "usr/local/bin/triagenode") == "/opt/triagenode/venv/bin/triagenode"

    config.write_text(config.read_text().replace('ae_title = "TRIAGENODE"', 'ae_title = "SITE_NODE"'))
    second = install(root)
    assert second.returncode == 0, second.stderr
    assert "kept the existing" in second.stdout
    assert 'ae_title = "SITE_NODE"' in config.read_text(), "an existing config is never overwritten"


def test_unit_is_hardened_and_notifies() -> None:
    unit = (REPO / "deploy/triagenode.service").read_text()
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "User=triagenode",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/triagenode",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "CapabilityBoundingSet=\n",
    ):
        assert line in unit, line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    unit = tmp_path / "triagenode.service"
    # Point ExecStart at a binary that exists here; verify checks it.
    unit.write_text(
        (REPO / "deploy/triagenode.service")
        .read_text()
        .replace("/opt/triagenode/venv/bin/triagenode", shutil.which("true") or "/bin/true")
    )
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "triagenode.service" in line and "network-online.target" not in line
    ]
    assert problems == [], "\n".join(problems)
