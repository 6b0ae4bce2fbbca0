"""The house holds: one installed namespace, layers that hold, no torch in the receiver's process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from nodes import NodeProcess, wait_until

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "storage", "inference", "daemon")


def test_the_layers_contract_holds(tmp_path: Path) -> None:
    """lint-imports on the code as it installs: triagenode.<folder> for each of the design's folders.

    The editable install maps the names with an import hook that import-linter
    does not read, so the test lays the same folders out under a real
    ``triagenode`` directory (symlinks) and puts it first on the path.
    """
    namespace = tmp_path / "triagenode"
    namespace.mkdir()
    for package in PACKAGES:
        (namespace / package).symlink_to(ROOT / package, target_is_directory=True)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_wheel_installs_nothing_outside_triagenode(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a clean copy: a stale build/ folder would leak into the wheel
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(source)],
        check=True, capture_output=True, timeout=300,
    )
    [wheel] = tmp_path.glob("triagenode-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        names = archive.namelist()
    assert tops == {"triagenode", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops
    assert "triagenode/inference/demo/demo.tnm" in names, "the built-in demo model ships"
    assert not any(name.startswith("triagenode/__init__") for name in names), "a namespace, no package of its own"


def test_the_receivers_process_holds_no_torch_with_workers_on(make_node) -> None:
    node: NodeProcess = make_node(inference={"workers": 1, "device": "cpu"})
    wait_until(lambda: "worker.ready" in node.log(), 90, "the worker loaded its model")
    assert node.process is not None
    maps = Path(f"/proc/{node.process.pid}/maps").read_text()
    assert "libtorch" not in maps, "the serve process loaded torch"
