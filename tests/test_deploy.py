"""The install scripts and the systemd unit, checked as far as a machine without systemd allows.

Nothing is mocked: ``install.sh`` really installs into a scratch root, the
staged tree is really run at its final path (in a private mount namespace),
and ``torch-install.sh`` really installs wheels that the tests build, from a
local folder, without any network.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from triagenode.config import load_settings

REPO = Path(__file__).parent.parent
TORCH_INSTALL = REPO / "deploy" / "torch-install.sh"


def install(root: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run deploy/install.sh below ``root``."""
    env = {
        **os.environ,
        "TRIAGENODE_ROOT": str(root),
        # Offline and fast: the node itself, without torch or its other (already tested) dependencies.
        "TRIAGENODE_PIP_OPTIONS": "--no-deps",
        "TRIAGENODE_TORCH": "none",
        "PYTHON": shutil.which("python3") or "python3",
        **extra,
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
    assert (root / "etc/sysusers.d/triagenode.conf").read_text() == (REPO / "deploy/triagenode.sysusers").read_text()
    assert (root / "etc/tmpfiles.d/triagenode.conf").read_text() == (REPO / "deploy/triagenode.tmpfiles").read_text()
    assert "TRIAGENODE_TORCH=none" in first.stdout, "the torch step says what it did"

    config.write_text(config.read_text().replace('ae_title = "TRIAGENODE"', 'ae_title = "SITE_NODE"'))
    second = install(root)
    assert second.returncode == 0, second.stderr
    assert "kept the existing" in second.stdout
    assert 'ae_title = "SITE_NODE"' in config.read_text(), "an existing config is never overwritten"


def test_the_example_config_sends_nowhere_until_its_destination_is_uncommented(tmp_path: Path) -> None:
    """Left unedited, no report retries against a PACS that is not there; uncommented, the example is valid."""
    example = REPO / "deploy/triagenode.example.toml"
    assert not load_settings(example, environ={}).destinations
    uncommented = tmp_path / "triagenode.toml"
    uncommented.write_text(_uncomment(example.read_text(), "#[[destinations]]"))
    settings = load_settings(uncommented, environ={})
    destinations = settings.destinations
    assert [(d.name, d.ae_title, d.host, d.port) for d in destinations] == [("pacs", "PACS", "127.0.0.1", 4242)]
    assert [route.name for route in settings.routes()] == ["default"], "one model until [[models]] is uncommented"
    uncommented.write_text(_uncomment(uncommented.read_text(), "#[[models]]"))
    [route] = load_settings(uncommented, environ={}).routes()
    assert (route.name, route.package, route.modalities) == ("lung-nodule", "demo", ("CT",))


def _uncomment(text: str, table: str) -> str:
    """The example with one commented-out table (from its header to the next blank line) made live."""
    lines, live = [], False
    for line in text.splitlines():
        live = live and bool(line.strip()) or line == table
        lines.append(line[1:] if live and line.startswith("#") else line)
    return "\n".join(lines) + "\n"


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


def test_install_refuses_an_unknown_torch_choice_before_touching_anything(tmp_path: Path) -> None:
    result = install(tmp_path / "root", TRIAGENODE_TORCH="torch==2.13.0")
    assert result.returncode == 2
    assert "TRIAGENODE_TORCH=torch==2.13.0: expected auto, cpu, cuda or none" in result.stderr
    assert not (tmp_path / "root").exists()


def can_bind_mount() -> bool:
    """Whether this process may make a private mount namespace and bind-mount in it (root, or a user namespace)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "--bind", "/", "/mnt"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


def test_a_staged_image_root_runs_at_its_final_paths(tmp_path: Path) -> None:
    """TRIAGENODE_ROOT builds a tree that works once it is /: no path of the build host is left in it."""
    staging = tmp_path / "staging"
    result = install(staging)
    assert result.returncode == 0, result.stderr
    assert "rewrote the virtual environment for /opt/triagenode/venv" in result.stdout
    venv = staging / "opt/triagenode/venv"
    assert (venv / "bin/triagenode").read_text().splitlines()[0] == "#!/opt/triagenode/venv/bin/python"
    left = [
        str(path.relative_to(staging))
        for path in staging.rglob("*")
        if path.is_file()
        and not path.is_symlink()
        and path.suffix != ".pyc"
        and str(staging).encode() in path.read_bytes()
    ]
    assert left == [], "files that still name the build host's staging path"

    # The image, booted: the tree is somewhere else now (its staging path is gone) and its opt/ is /opt.
    image = tmp_path / "image"
    staging.rename(image)
    if not can_bind_mount():
        pytest.skip("no private mount namespace here to run the tree at /opt")
    script = (
        "mount --bind \"$IMAGE/opt\" /opt"
        " && /opt/triagenode/venv/bin/pip --version"
        " && /opt/triagenode/venv/bin/python -c"
        " 'import importlib.metadata as m, sys; print(sys.prefix, m.version(\"triagenode\"))'"
    )
    booted = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", script],
        capture_output=True, text=True, env={**os.environ, "IMAGE": str(image)}, timeout=120,
    )
    assert booted.returncode == 0, booted.stderr
    pip_line, prefix_line = booted.stdout.splitlines()[-2:]
    assert "/opt/triagenode/venv/lib/" in pip_line, "pip runs from the venv at its final path"
    assert prefix_line == "/opt/triagenode/venv 0.1.0"


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd is not installed")
def test_an_image_gets_its_service_user_and_ownerships_from_systemd(tmp_path: Path) -> None:
    """What systemd does at an image's first boot, done here with --root: the user, the data dir, the config."""
    root = tmp_path / "image"
    assert install(root).returncode == 0
    subprocess.run(["systemd-sysusers", f"--root={root}"], check=True, capture_output=True, timeout=60)
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    assert "triagenode" in passwd
    uid, gid = int(passwd["triagenode"][2]), int(passwd["triagenode"][3])
    assert passwd["triagenode"][5:] == ["/var/lib/triagenode", "/usr/sbin/nologin"]
    subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create"], check=True, capture_output=True, timeout=60)
    data, config = (root / "var/lib/triagenode").stat(), (root / "etc/triagenode/triagenode.toml").stat()
    assert (data.st_uid, data.st_gid, data.st_mode & 0o777) == (uid, gid, 0o750)
    assert (config.st_uid, config.st_gid, config.st_mode & 0o777) == (0, gid, 0o640)


# ---- deploy/torch-install.sh: which torch build, and why ----


def tiny_wheel(folder: Path, version: str) -> Path:
    """A real (empty) wheel named torch, so that the installer's choices can be installed for real, offline."""
    folder.mkdir(parents=True, exist_ok=True)
    dist_info = f"torch-{version}.dist-info"
    files = {
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"torch-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


def make_venv(folder: Path) -> Path:
    """A fresh virtual environment (no torch); returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=300)
    return folder / "bin" / "python"


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment without torch for the dry runs (which install nothing)."""
    return make_venv(tmp_path_factory.mktemp("venv"))


def torch_install(python: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run deploy/torch-install.sh with pip's configuration files ignored, so only ``env`` decides."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("PIP_", "TRIAGENODE_"))}
    environment.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", **env)
    return subprocess.run(
        ["bash", str(TORCH_INSTALL), *args[:1], str(python), *args[1:]] if args[:1] == ("--dry-run",)
        else ["bash", str(TORCH_INSTALL), str(python), *args],
        capture_output=True, text=True, env=environment, timeout=300,
    )


def installed_torch(python: Path) -> str:
    return subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('torch'))"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()


def gpu_listed() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    return any(line.startswith("GPU ") for line in listing.stdout.splitlines())


def test_torch_builds_are_chosen_installed_and_switched_from_local_wheels(tmp_path: Path) -> None:
    venv = make_venv(tmp_path / "venv")
    wheels = tmp_path / "wheels"
    cpu_wheel = tiny_wheel(wheels, "2.13.0+cpu")
    offline = {"PIP_FIND_LINKS": str(wheels), "PIP_NO_INDEX": "1"}

    cpu = torch_install(venv, TRIAGENODE_TORCH="cpu", **offline)
    assert cpu.returncode == 0, cpu.stderr
    assert "chose the CPU build of torch 2.13.0: asked for by TRIAGENODE_TORCH=cpu" in cpu.stdout
    assert f"installing torch==2.13.0+cpu from the local wheel {cpu_wheel}" in cpu.stdout
    assert installed_torch(venv) == "2.13.0+cpu"

    again = torch_install(venv, TRIAGENODE_TORCH="cpu", **offline)
    assert "torch 2.13.0+cpu is already installed; keeping it" in again.stdout

    # The CUDA build is exactly 2.13.0: the +cpu wheel never stands in for it.
    missing = torch_install(venv, TRIAGENODE_TORCH="cuda", TRIAGENODE_PIP_OPTIONS="--no-index",
                            PIP_FIND_LINKS=str(wheels))
    assert missing.returncode == 2
    assert "pip runs with --no-index and finds no wheel for torch===2.13.0" in missing.stderr
    assert installed_torch(venv) == "2.13.0+cpu"

    cuda_wheel = tiny_wheel(wheels, "2.13.0")
    cuda = torch_install(venv, TRIAGENODE_TORCH="cuda", **offline)
    assert cuda.returncode == 0, cuda.stderr
    assert f"installing torch===2.13.0 from the local wheel {cuda_wheel}" in cuda.stdout
    assert installed_torch(venv) == "2.13.0", "the CUDA build replaced the CPU build"


@pytest.mark.skipif(gpu_listed(), reason="this machine has an NVIDIA GPU")
def test_auto_on_a_machine_without_a_gpu_takes_the_cpu_build_from_pytorchs_cpu_index(
    venv: Path, tmp_path: Path
) -> None:
    plan = torch_install(venv, "--dry-run", PIP_FIND_LINKS=str(tmp_path))
    assert plan.returncode == 0, plan.stderr
    assert "chose the CPU build of torch 2.13.0: no NVIDIA GPU" in plan.stdout
    assert "(TRIAGENODE_TORCH=cpu or =cuda chooses the other build)" in plan.stdout
    assert f"would run: {venv} -m pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu" in (
        plan.stdout
    )


def test_cuda_without_a_local_wheel_comes_from_pypi_and_says_how_big(venv: Path, tmp_path: Path) -> None:
    plan = torch_install(venv, "--dry-run", "--quiet", TRIAGENODE_TORCH="cuda", PIP_FIND_LINKS=str(tmp_path))
    assert plan.returncode == 0, plan.stderr
    assert "chose the CUDA build of torch 2.13.0: asked for by TRIAGENODE_TORCH=cuda" in plan.stdout
    assert "with NVIDIA's CUDA libraries: several GB" in plan.stdout
    assert f"would run: {venv} -m pip install --quiet torch===2.13.0" in plan.stdout


def test_torch_install_refuses_an_unknown_choice(venv: Path) -> None:
    result = torch_install(venv, "--dry-run", TRIAGENODE_TORCH="gpu")
    assert result.returncode == 2
    assert "TRIAGENODE_TORCH=gpu: expected auto, cpu, cuda or none" in result.stderr
