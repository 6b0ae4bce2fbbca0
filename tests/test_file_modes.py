"""Files only the service can read: under umask 000, every directory the node makes is 0750, every file 0640.

The node runs a whole study through (instances, the queue database, the
report, the audit trail) with the most permissive umask there is; nothing it
leaves may be readable by others or writable by its group.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from triagenode.inference.phantom import write_phantom_study

from nodes import send


def test_every_file_is_0640_and_every_directory_0750_under_umask_000(make_node, tmp_path: Path) -> None:
    study = write_phantom_study(tmp_path / "ph", seed=8, index=0, positive=True, slices=24, matrix=128)
    node = make_node(start=False, inference={"workers": 1, "device": "cpu"})
    previous = os.umask(0)
    try:
        node.start()  # the node process inherits umask 000
    finally:
        os.umask(previous)
    files = sorted(study.directory.glob("*.dcm"))  # type: ignore[union-attr]
    assert send(node.port, files) == [0] * len(files)
    node.wait_for_state(study.study_uid, "reported", timeout=120)
    assert node.stop() == 0
    modes = {}
    for path in [node.data_dir, *node.data_dir.rglob("*")]:
        modes[str(path.relative_to(node.data_dir))] = stat.S_IMODE(path.lstat().st_mode)
    kinds = {"studies", "reports", "audit", "triagenode.db", "triagenode.lock"}
    assert kinds <= {name.split("/")[0] for name in modes}, sorted(modes)
    wrong = {
        name: f"{mode:04o}"
        for name, mode in modes.items()
        if mode != (0o750 if (node.data_dir / name).is_dir() else 0o640)
    }
    assert not wrong, f"modes other than 0750 (directories) and 0640 (files): {wrong}"


def test_the_node_refuses_a_data_dir_others_can_write(make_node) -> None:
    node = make_node(start=False)
    node.data_dir.mkdir(parents=True)
    os.chmod(node.data_dir, 0o777)  # noqa: S103 - the unsafe directory under test
    line = node.refused_start()
    assert f"data_dir {node.data_dir} is writable by every user (mode 0777)" in line and "chmod 750" in line
    assert not (node.data_dir / "triagenode.db").exists(), "nothing is written into it"
    os.chmod(node.data_dir, 0o755)  # noqa: S103 - what a site may have made it
    node.start()
    assert stat.S_IMODE(node.data_dir.stat().st_mode) == 0o750, "a data_dir the service owns is tightened"
