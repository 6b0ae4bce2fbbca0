"""The node's audit trail end to end: a real node, real peers, a real audit record repository over TLS.

What an ATNA review checks: every message the node sends validates against the
DICOM audit schema (PS3.15 A.5.1); a study received names its sender, its
address and its patient; a report sent names its destination; refusals and
failed TLS handshakes are security alerts with the peer's address; start and
stop are recorded; the audit file holds the same messages; and the ordinary
log still names no patient.
"""

from __future__ import annotations

import os
import pwd
import socket
from pathlib import Path
from typing import Any

from lxml import etree

from triagenode.inference.phantom import write_phantom_study

from dicom_factory import PATIENT_ID, PATIENT_IDENTIFIERS, write_study
from nodes import NODE_AE, free_port, send, wait_until
from pki import TestCA
from syslog_receiver import SyslogReceiver
from test_audit import SCHEMA


def parsed(xml: str) -> etree._Element:
    root = etree.fromstring(xml.encode("utf-8"))
    assert SCHEMA.validate(root), f"{SCHEMA.error_log}\n{xml}"
    return root


def event_id(root: etree._Element) -> str:
    return str(root.find("EventIdentification/EventID").get("csd-code"))


def participants(root: etree._Element) -> list[dict[str, Any]]:
    return [dict(element.attrib) for element in root.findall("ActiveParticipant")]


def test_a_node_audits_transfers_refusals_and_its_life_to_a_tls_repository(
    make_node, make_pacs, stop_after_test, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path / "pki")
    node_identity, repository_identity = ca.issue("localhost"), ca.issue("arr")
    repository = SyslogReceiver("tls", certificate=repository_identity.certificate,
                                private_key=repository_identity.private_key, client_ca=ca.certificate)
    stop_after_test(repository.start(), SyslogReceiver.stop)
    pacs = make_pacs("PACS")
    tls_port = free_port()
    node = make_node(
        inference={"workers": 1, "device": "cpu"},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        tls={"port": tls_port, "certificate": str(node_identity.certificate),
             "private_key": str(node_identity.private_key), "ca_certificates": str(ca.certificate)},
        audit={"syslog": repository.address, "syslog_protocol": "tls", "enterprise_site_id": "General Hospital"},
        peers=[{"ae_title": "CT1", "hosts": ["10.9.9.0/24"]}],
    )
    study = write_phantom_study(tmp_path / "ph", seed=3, index=0, positive=True, slices=24, matrix=128)
    files = sorted(study.directory.glob("*.dcm"))  # type: ignore[union-attr]
    assert send(node.port, files, calling_ae="MODALITY") == [0] * len(files)
    node.wait_for_state(study.study_uid, "sent", timeout=120)

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="CT1")
    ae.add_requested_context(Verification)
    assert ae.associate("127.0.0.1", node.port, ae_title=NODE_AE).is_rejected
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as plain:
        plain.sendall(b"\x01\x00\x00\x00\x00\x44" + b"\x00" * 68)  # an A-ASSOCIATE-RQ header, in the clear
        wait_until(lambda: "tls.refused" in node.log(), 10, "the handshake failure")
    assert node.stop() == 0

    messages = wait_until(lambda: _complete(repository), 20, "the stop's message at the repository")
    roots = [parsed(message.xml) for message in messages]
    events = [event_id(root) for root in roots]
    assert events[0] == "110100" and events[-1] == "110100", "start and stop come first and last"
    assert {root.find("AuditSourceIdentification").get("AuditEnterpriseSiteID") for root in roots} == {
        "General Hospital"
    }

    received = [r for r in roots if event_id(r) == "110104" and r.find("EventIdentification").get("EventActionCode")
                == "C"]
    [transfer] = [r for r in received if study.study_uid in etree.tostring(r).decode()]
    peer = next(p for p in participants(transfer) if p.get("UserID") == "MODALITY")
    assert peer["NetworkAccessPointID"] == "127.0.0.1" and peer["UserIsRequestor"] == "true"
    assert f'NumberOfInstances="{len(files)}"' in etree.tostring(transfer).decode()
    patient_ids = [o.get("ParticipantObjectID") for o in transfer.findall("ParticipantObjectIdentification")]
    assert study.study_uid in patient_ids and _patient_of(files[0]) in patient_ids, "the study and its patient"
    assert "110102" in events, "Begin Transferring DICOM Instances"

    sent = [r for r in roots if event_id(r) == "110104" and r.find("EventIdentification").get("EventActionCode")
            == "R"]
    assert sent and any(p.get("UserID") == "PACS" for p in participants(sent[0]))

    alerts = [r for r in roots if event_id(r) == "110113"]
    texts = [etree.tostring(a).decode() for a in alerts]
    assert any("CT1" in t and "10.9.9.0/24" in t and "127.0.0.1" in t for t in texts), texts
    assert any("TLS handshake failed" in t for t in texts), texts

    files_lines = [line for path in sorted((node.data_dir / "audit").glob("*.log"))
                   for line in path.read_text().splitlines()]
    assert len(files_lines) == len(messages), "the file holds what the repository got"
    for line in files_lines:
        parsed(line)

    log = node.log()
    for identifier in (*PATIENT_IDENTIFIERS, _patient_of(files[0])):  # the phantom's own patient, too
        assert identifier not in log, f"{identifier!r} in the ordinary log"


def test_cli_actions_are_audited_with_the_os_user(make_node, tmp_path: Path) -> None:
    node = make_node()
    study = write_study(tmp_path / "study", slices=2)
    assert send(node.port, study.files) == [0, 0]
    node.wait_for_state(study.study_uid, "queued")
    for command in ("cancel", "retry", "prioritize", "cancel", "purge"):
        node.cli("queue", command, study.study_uid)
    lines = [line for path in sorted((node.data_dir / "audit").glob("*.log")) for line in path.read_text().splitlines()]
    roots = [parsed(line) for line in lines]
    actions = [root for root in roots if event_id(root) == "110103"]
    described = [root.findtext("EventIdentification/EventOutcomeDescription") or "" for root in actions]
    assert [text.split(":")[0] for text in described] == ["queue cancel", "queue retry", "queue prioritize",
                                                          "queue cancel"], described
    [deleted] = [root for root in roots if event_id(root) == "110105"]
    for root in [*actions, deleted]:
        users = [p.get("UserID") for p in root.findall("ActiveParticipant")]
        assert pwd.getpwuid(os.geteuid()).pw_name in users
        objects = [o.get("ParticipantObjectID") for o in root.findall("ParticipantObjectIdentification")]
        assert objects == [study.study_uid, PATIENT_ID], "the study and its patient, read from its files"


def _complete(repository: SyslogReceiver) -> list[Any] | None:
    messages = repository.messages
    stops = [m for m in messages if "110121" in m.xml]
    return messages if stops else None


def _patient_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).PatientID)

