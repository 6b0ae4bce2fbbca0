"""Several models on one node: routing, a task and an SR per model, destinations per route, pause, STAT.

The second package is the demo model with its manifest saying MR (the
weights are the demo's, so it loads as fast): what matters here is which
model a study goes to, not what it finds.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from triagenode.inference.model_package import DEMO_MODEL

from dicom_factory import ct_slice
from nodes import NodeProcess, send, wait_until

BOTH = [(CTImageStorage, [ExplicitVRLittleEndian]), (MRImageStorage, [ExplicitVRLittleEndian])]
"""Presentation contexts for sending the CT and the MR studies."""


def relabelled_package(target: Path, name: str, modality: str) -> Path:
    """The demo package with another name and input modality in its manifest (same weights)."""
    with zipfile.ZipFile(DEMO_MODEL) as source:
        manifest = json.loads(source.read("manifest.json"))
        weights = source.read("weights.pt")
    manifest["name"], manifest["input"]["modality"] = name, modality
    with zipfile.ZipFile(target, "w") as package:
        package.writestr("manifest.json", json.dumps(manifest))
        package.writestr("weights.pt", weights)
    return target


def series(modality: str, slices: int, description: str = "AXIAL 1", **attributes: Any) -> list[Dataset]:
    """One series of a new study: CT as the tests' factory makes it, or the same slices as MR."""
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for index in range(slices):
        ds = ct_slice(study_uid, series_uid, index, rows=64, columns=64)
        ds.SeriesDescription = description
        if modality == "MR":
            ds.Modality = "MR"
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        out.append(ds)
    return out


def two_model_node(make_node, make_pacs, tmp_path: Path, **settings: Any) -> tuple[NodeProcess, Any, Any]:
    """A node with destinations A and B and three models: lung (CT, to all), lung-b (CT, only to B), mr."""
    a, b = make_pacs("A"), make_pacs("B")
    mr = relabelled_package(tmp_path / "mr.tnm", "demo-mr", "MR")
    node = make_node(
        inference={"workers": 1, "device": "cpu"},
        destinations=[{"name": "a", "ae_title": "A", "host": "127.0.0.1", "port": a.port},
                      {"name": "b", "ae_title": "B", "host": "127.0.0.1", "port": b.port}],
        start=False,
        **settings,
    )
    node.config_path.write_text(
        node.config_path.read_text()
        + '\n[[models]]\nname = "lung"\npackage = "demo"\npriority = 1\n'
        + '\n[[models]]\nname = "lung-b"\npackage = "demo"\nseries_description = "(?i)axial"\ndestinations = ["b"]\n'
        + f'\n[[models]]\nname = "mr"\npackage = "{mr}"\nmodalities = ["MR"]\n'
    )
    return node.start(), a, b


def test_each_study_goes_to_the_models_that_fit_it_with_an_sr_each_delivered_once(
    make_node, make_pacs, tmp_path: Path
) -> None:
    node, a, b = two_model_node(make_node, make_pacs, tmp_path)
    ct, mr, scout = series("CT", 16), series("MR", 16), series("CT", 2, "SCOUT")
    for study in (ct, mr, scout):
        assert send(node.port, study, contexts=BOTH) == [0] * len(study)
    ct_uid, mr_uid, scout_uid = (str(study[0].StudyInstanceUID) for study in (ct, mr, scout))

    details = node.wait_for_state(ct_uid, "sent", timeout=120)
    assert [(t["model"], t["state"]) for t in details["tasks"]] == [("lung", "sent"), ("lung-b", "sent")]
    assert {(r["model"], r["matched"]) for r in details["routing"]} == {("lung", True), ("lung-b", True), ("mr", False)}
    assert "modality CT is not MR" in next(r["reason"] for r in details["routing"] if r["model"] == "mr")
    assert [(d["model"], d["destination"]) for d in details["deliveries"]] == [("lung", "a"), ("lung", "b"),
                                                                               ("lung-b", "b")]
    details = node.wait_for_state(mr_uid, "sent", timeout=120)
    assert [t["model"] for t in details["tasks"]] == ["mr"]
    assert details["tasks"][0]["result"]["model"] == "demo-mr"

    wait_until(lambda: len(a.received) == 2 and len(b.received) == 3, 15, "every report at its destinations")
    reports = {(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)) for ds in b.received}
    assert len(reports) == 3, "lung and lung-b each have their own report series in the CT study"
    assert sorted(str(ds.StudyInstanceUID) for ds in a.received) == sorted([ct_uid, mr_uid])
    descriptions = {str(ds.SeriesDescription).split(":")[0] for ds in b.received if ds.StudyInstanceUID == ct_uid}
    assert descriptions == {"AI triage lung", "AI triage lung-b"}, "each entry names its own report series"

    nothing = node.wait_for_state(scout_uid, "reported", timeout=30)
    assert nothing["tasks"] == [] and nothing["outcome"] == "not applicable"
    reason = next(e["reason"] for e in nothing["events"] if e["to"] == "reported")
    assert "no model applies" in reason and "the model needs 16" in reason, reason
    shown = node.cli("queue", "show", ct_uid).stdout
    assert "task:          lung-b: sent" in shown and "ROUTED" in shown
    listed = node.cli("queue", "ls", "--model", "mr", "--json")
    assert [s["study_uid"] for s in json.loads(listed.stdout)] == [mr_uid]


def test_a_paused_model_waits_across_a_restart_while_the_others_run_and_runs_after_resume(
    make_node, make_pacs, tmp_path: Path
) -> None:
    node, a, _ = two_model_node(make_node, make_pacs, tmp_path)
    assert "mr: paused" in node.cli("model", "pause", "mr").stdout
    mr, ct = series("MR", 16), series("CT", 16)
    assert send(node.port, mr, contexts=BOTH) == [0] * 16 and send(node.port, ct) == [0] * 16
    mr_uid, ct_uid = str(mr[0].StudyInstanceUID), str(ct[0].StudyInstanceUID)
    node.wait_for_state(ct_uid, "sent", timeout=120)
    assert [t["state"] for t in node.study(mr_uid)["tasks"]] == ["queued"], "the paused model took nothing"

    assert node.stop() == 0
    node.start()
    models = {m["name"]: m for m in node.cli_json("model", "ls")}
    assert models["mr"]["paused"] and models["mr"]["tasks"] == {"queued": 1}
    assert not models["lung"]["paused"] and models["lung"]["tasks"] == {"sent": 1}
    assert "paused:    mr" in node.cli("status").stdout
    wait_until(lambda: node.study(mr_uid)["tasks"][0]["state"] == "queued", 3, "still waiting after the restart")

    assert "mr: resumed" in node.cli("model", "resume", "mr").stdout
    node.wait_for_state(mr_uid, "sent", timeout=120)
    unknown = node.cli("model", "pause", "nope", check=False)
    assert unknown.returncode == 2 and "configured: lung, lung-b, mr" in unknown.stderr


def test_a_stat_study_sent_last_is_processed_next(make_node, make_pacs, tmp_path: Path) -> None:
    """One worker, ten studies waiting (their model paused), a STAT one sent last: it goes first on resume."""
    node, _, _ = two_model_node(make_node, make_pacs, tmp_path)
    node.cli("model", "pause", "lung")
    node.cli("model", "pause", "lung-b")
    waiting = [series("CT", 16) for _ in range(10)]
    stat = series("CT", 16, RequestedProcedurePriority="STAT")
    for study in [*waiting, stat]:
        assert send(node.port, study) == [0] * 16
    uids = [str(study[0].StudyInstanceUID) for study in [*waiting, stat]]
    wait_until(lambda: all(node.study(uid)["state"] == "queued" for uid in uids), 30, "all queued")
    assert node.study(uids[-1])["urgent"] and not node.study(uids[0])["urgent"]
    node.cli("model", "resume", "lung")
    taken = wait_until(lambda: _taken(node), 60, "a task taken")
    assert taken[0] == (uids[-1], "lung"), "the STAT study goes before the ten that waited longer"
    node.cli("model", "resume", "lung-b")
    lung_b = wait_until(lambda: [uid for uid, model in _taken(node) if model == "lung-b"], 60, "a lung-b task taken")
    assert lung_b[0] == uids[-1], "urgent goes before the model's priority: lung-b's STAT task before lung's others"


def _taken(node: NodeProcess) -> list[tuple[str, str]]:
    """(study, model) of every task taken so far, in the order the log shows them."""
    return [
        (line.split("study_uid=")[1].split()[0], line.split("model=")[1].split()[0])
        for line in node.log().splitlines()
        if "task.state" in line and "to=processing" in line
    ]


def test_stat_is_read_where_modalities_put_it(tmp_path: Path) -> None:
    """Top level, or in a Request Attributes Sequence of any length (a long one is read apart)."""
    from pydicom.uid import ExplicitVRLittleEndian

    from triagenode.daemon.incoming import read_incoming

    def urgent(ds: Dataset) -> bool:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return read_incoming(path, ExplicitVRLittleEndian, ds.SOPClassUID, ds.SOPInstanceUID).urgent

    def requests(count: int, stat_at: int | None) -> list[Dataset]:
        items = []
        for index in range(count):
            item = Dataset()
            item.RequestedProcedureID, item.ScheduledProcedureStepID = f"RP{index}", f"SPS{index}"
            item.RequestedProcedurePriority = "STAT" if index == stat_at else "ROUTINE"
            items.append(item)
        return items

    [plain] = series("CT", 1)
    assert not urgent(plain)
    [top] = series("CT", 1, RequestedProcedurePriority="stat")
    assert urgent(top)
    for count in (1, 40):  # 40 items: longer than what the receiver reads at once
        [stat] = series("CT", 1, RequestAttributesSequence=requests(count, count - 1))
        [routine] = series("CT", 1, RequestAttributesSequence=requests(count, None))
        assert urgent(stat) and not urgent(routine), count
