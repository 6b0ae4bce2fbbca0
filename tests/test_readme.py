"""A newcomer's check: the README's "Run it" commands, run as written, on a fresh copy and a fresh home.

The commands are read from the README itself, so a changed step changes
this test. Only what must differ on a test machine is substituted: the
node's port (a free one, through ``TRIAGENODE_NODE__PORT``), the phantom
folder, the PACS's port (a private Orthanc, never the system service), the
study's UID where the README says ``<STUDY_UID>``, and, for time, the
stability window (3 s) and pip's byte-compiling.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread

from nodes import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]


def run_it_blocks() -> list[str]:
    """The ```sh blocks of the README's "Run it" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Run it", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)


def fresh_checkout(target: Path) -> Path:
    """The project's files as a clone has them (tracked and not ignored), without .venv or build outputs."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@contextmanager
def serving(command: str, cwd: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command, shell=True, cwd=cwd, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)


def shell(command: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"README step failed: {command}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.skipif(not shutil.which("storescu"), reason="needs DCMTK (.ci/run installs it)")
def test_the_readmes_run_it_commands_work_as_written(make_orthanc, tmp_path: Path) -> None:
    install_and_serve, second_terminal, serve_with_pacs = run_it_blocks()
    install, serve = install_and_serve.strip().rsplit(" && ", 1)
    checkout = fresh_checkout(tmp_path / "checkout")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "XDG_DATA_HOME")}
    env.update(HOME=str(tmp_path / "home"), TRIAGENODE_NODE__PORT=str(port))
    # Test-machine time only: studies complete 3 s (not 30 s) after their last instance, and pip
    # leaves byte-compiling to Python's first import instead of compiling all of torch up front.
    env.update(TRIAGENODE_STUDY__STABLE_SECONDS="3", PIP_NO_COMPILE="1")
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(ROOT / ".venv")))
    phantoms = tmp_path / "phantoms"

    shell(install, checkout, env, timeout=1500)
    steps = [line.split("  #")[0].strip() for line in second_terminal.strip().splitlines()]
    steps = [step.replace("/tmp/phantoms", str(phantoms)).replace("11112", str(port)) for step in steps]
    generate, echo, send, queue_ls, queue_show = steps
    shell(generate, checkout, env)
    study_uid = str(dcmread(next((phantoms / "study_00000").glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)

    # 1. The node on its embedded defaults: echo it, send the phantom, see it queued.
    with serving(serve, checkout, env, tmp_path / "serve.log"):
        wait_until(lambda: subprocess.run(echo, shell=True, cwd=checkout, env=env, capture_output=True).returncode == 0,
                   120, "the node answers the README's echo")
        shell(send, checkout, env)
        assert study_uid in shell(queue_ls, checkout, env).stdout
    assert (tmp_path / "home" / ".local" / "share" / "triagenode" / "triagenode.db").exists()

    # 2. The same node with a PACS as destination: the study goes on to `sent`, the report is in the PACS.
    orthanc = make_orthanc()
    command = serve_with_pacs.strip().replace("PORT=4242", f"PORT={orthanc.dicom_port}")
    assert f"AE_TITLE={orthanc.ae_title}" in command
    with serving(command, checkout, env, tmp_path / "serve-pacs.log"):
        show = queue_show.replace("<STUDY_UID>", study_uid)
        state = lambda: json.loads(shell(show + " --json", checkout, env).stdout)["state"]  # noqa: E731
        wait_until(lambda: state() == "sent", 240, "the study is sent")
        shown = shell(show, checkout, env).stdout
        assert "probability" in shown and "sent" in shown, shown
    study = orthanc.study_id(study_uid)
    assert study is not None, "the PACS has the study"
    modalities = [s["MainDicomTags"].get("Modality") for s in orthanc.rest(f"/studies/{study}/series")]
    assert modalities == ["SR"], "the report is in the PACS, in the same study"
