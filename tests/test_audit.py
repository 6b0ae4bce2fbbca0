"""The DICOM audit trail (daemon/audit.py) with real parts: files, processes, a UDP and a TLS syslog repository.

Every message the node can write is validated against the DICOM Audit Message
Schema (PS3.15 A.5.1, tests/data/dicom-audit-message.rng) with lxml. The
repositories are real (tests/syslog_receiver.py): a UDP one (RFC 5426) and a
TLS one (RFC 5425) with certificates from a test CA (tests/pki.py).
"""

from __future__ import annotations

import base64
import logging
import multiprocessing
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from lxml import etree

from triagenode.config.settings import AuditSettings, TlsSettings
from triagenode.daemon.audit import AuditedStudy, AuditTrail, SecurityAlertKind

from nodes import free_port
from pki import TestCA
from syslog_receiver import SyslogMessage, SyslogReceiver

SCHEMA = etree.RelaxNG(etree.parse(str(Path(__file__).parent / "data" / "dicom-audit-message.rng")))
CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
STUDY = AuditedStudy(
    study_uid="1.2.826.0.1.3680043.8.498.1", patient_id="PAT-0042", patient_name="DOE^JANE",
    sop_classes={CT: 120, SR: 1}, accession_number="ACC123",
)
ANONYMOUS = AuditedStudy(study_uid="1.2.826.0.1.3680043.8.498.2")
"""A study whose instances carried no Patient ID, nor classes yet."""


def validate(xml: str) -> etree._Element:
    """The message parsed, after it validated against the schema (the error log in the assertion)."""
    root = etree.fromstring(xml.encode("utf-8"))
    assert SCHEMA.validate(root), f"{SCHEMA.error_log}\n{xml}"
    return root


def lines(trail: AuditTrail) -> list[str]:
    """Every line of every day's file, in order."""
    found: list[str] = []
    for path in sorted(trail.directory.glob("*.log")):
        found.extend(path.read_text(encoding="utf-8").splitlines())
    return found


def every_event(trail: AuditTrail) -> list[str]:
    """Call every method with every variant; the EventID each message should carry, in order."""
    trail.application_activity(started=True, user="triage")
    trail.transfer_began(received=True, peer_ae="CT1", peer_address="10.1.2.3", study=STUDY)
    trail.instances_transferred(received=True, peer_ae="CT1", peer_address="10.1.2.3", study=STUDY)
    trail.instances_transferred(received=True, peer_ae="CT1", peer_address="10.1.2.3", study=ANONYMOUS,
                                success=False, outcome_description="association aborted after 3 instances")
    trail.transfer_began(received=False, peer_ae="PACS", peer_address="pacs.example.org", study=STUDY)
    trail.instances_transferred(received=False, peer_ae="PACS", peer_address="pacs.example.org", study=STUDY)
    trail.instances_transferred(received=False, peer_ae="PACS", peer_address="fd00::5", study=STUDY,
                                success=False)
    for kind in SecurityAlertKind:
        trail.security_alert(kind=kind, peer_address="10.9.9.9", peer_ae="ROGUE", detail=f"{kind.short} test")
    trail.security_alert(kind=SecurityAlertKind.NODE_AUTHENTICATION, peer_address="10.9.9.9", peer_ae=None,
                         detail="TLS handshake failed: certificate unknown")
    trail.security_alert(kind=SecurityAlertKind.SOFTWARE_CONFIGURATION, peer_address=None, peer_ae=None,
                         detail="model lung-ct added", user="alice", subject_uri="file:///opt/models/lung.tnm")
    trail.study_deleted(user="", study=STUDY, reason="retention: keep_days=30")
    trail.study_deleted(user="alice", study=ANONYMOUS, reason="queue purge")
    trail.administrative_action(user="alice", action="queue retry", study=STUDY, detail="model lung-ct")
    trail.administrative_action(user="alice", action="model remove", study=None, detail="lung-ct")
    trail.application_activity(started=False, user="triage")
    return (
        ["110100", "110102", "110104", "110104", "110102", "110104", "110104"]
        + ["110113"] * (len(SecurityAlertKind) + 2)
        + ["110105", "110105", "110103", "110113", "110100"]
    )


@pytest.fixture
def make_trail(tmp_path: Path) -> Iterator[Callable[..., AuditTrail]]:
    """``make_trail(syslog=..., tls=..., ...)``: an AuditTrail on tmp_path/node, closed after the test."""
    made: list[AuditTrail] = []

    def factory(tls: TlsSettings | None = None, data_dir: Path | None = None, **audit: object) -> AuditTrail:
        trail = AuditTrail(data_dir or tmp_path / "node", AuditSettings(**audit), node_ae="TRIAGENODE", tls=tls)
        made.append(trail)
        return trail

    yield factory
    for trail in made:
        trail.close(timeout=0.5)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, object]:
    ca = TestCA(tmp_path / "pki")
    return {"ca": ca, "repository": ca.issue("localhost"), "node": ca.issue("triagenode-node"),
            "other": TestCA(tmp_path / "other-pki", name="Somebody Else's CA")}


def _code(element: etree._Element, tag: str) -> str:
    return element.find(tag).get("csd-code")


def test_every_message_validates_and_says_what_happened(make_trail: Callable[..., AuditTrail]) -> None:
    trail = make_trail()
    expected = every_event(trail)
    written = lines(trail)
    assert len(written) == len(expected), "one line per message"
    roots = [validate(line) for line in written]
    assert [_code(root.find("EventIdentification"), "EventID") for root in roots] == expected
    host = socket.gethostname()
    for root in roots:
        event = root.find("EventIdentification")
        assert datetime.fromisoformat(event.get("EventDateTime")).utcoffset() == timedelta(0)
        assert root.find("AuditSourceIdentification").get("AuditSourceID") == f"TRIAGENODE@{host}"
        [node] = [p for p in root.findall("ActiveParticipant") if p.get("UserID") == "TRIAGENODE"]
        assert node.get("AlternativeUserID") == str(os.getpid())
        assert (node.get("NetworkAccessPointID"), node.get("NetworkAccessPointTypeCode")) == (host, "1")

    start = roots[0]
    assert start.find("EventIdentification").get("EventActionCode") == "E"
    assert _code(start.find("EventIdentification"), "EventTypeCode") == "110120"
    launcher = start.findall("ActiveParticipant")[1]
    assert (launcher.get("UserID"), launcher.get("UserIsRequestor"), _code(launcher, "RoleIDCode")) == \
        ("triage", "true", "110151")
    assert _code(roots[-1].find("EventIdentification"), "EventTypeCode") == "110121"

    # Received: the peer opened the association (requestor) and is the Source; the node the Destination.
    received = roots[2]
    assert received.find("EventIdentification").get("EventActionCode") == "C"
    peer, node = received.findall("ActiveParticipant")
    assert (peer.get("UserID"), peer.get("AlternativeUserID"), peer.get("UserIsRequestor")) == \
        ("CT1", "AETITLES=CT1", "true")
    assert (peer.get("NetworkAccessPointID"), peer.get("NetworkAccessPointTypeCode")) == ("10.1.2.3", "2")
    assert (_code(peer, "RoleIDCode"), _code(node, "RoleIDCode"), node.get("UserIsRequestor")) == \
        ("110153", "110152", "false")
    study, patient = received.findall("ParticipantObjectIdentification")
    assert (study.get("ParticipantObjectID"), study.get("ParticipantObjectTypeCode"),
            study.get("ParticipantObjectTypeCodeRole"), _code(study, "ParticipantObjectIDTypeCode")) == \
        (STUDY.study_uid, "2", "3", "110180")
    assert study.find("ParticipantObjectDescription/Accession").get("Number") == "ACC123"
    assert {c.get("UID"): c.get("NumberOfInstances") for c in study.iter("SOPClass")} == {CT: "120", SR: "1"}
    assert (patient.get("ParticipantObjectID"), patient.get("ParticipantObjectTypeCode"),
            patient.get("ParticipantObjectTypeCodeRole"), patient.findtext("ParticipantObjectName")) == \
        ("PAT-0042", "1", "1", "DOE^JANE")
    id_type = patient.find("ParticipantObjectIDTypeCode")
    assert (id_type.get("csd-code"), id_type.get("codeSystemName"), id_type.get("originalText")) == \
        ("2", "RFC-3881", "Patient Number")

    failed = roots[3]
    assert failed.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert "aborted" in failed.findtext("EventIdentification/EventOutcomeDescription")
    assert len(failed.findall("ParticipantObjectIdentification")) == 1, "no patient object without a Patient ID"

    # Sent: the node opened the association and is the Source; R, as the audit source is not the receiver.
    sent = roots[5]
    assert sent.find("EventIdentification").get("EventActionCode") == "R"
    node, peer = sent.findall("ActiveParticipant")
    assert (node.get("UserIsRequestor"), _code(node, "RoleIDCode")) == ("true", "110153")
    assert (peer.get("UserIsRequestor"), _code(peer, "RoleIDCode"), peer.get("NetworkAccessPointTypeCode")) == \
        ("false", "110152", "1"), "a destination named by host name is a machine name"
    assert roots[6].findall("ActiveParticipant")[1].get("NetworkAccessPointTypeCode") == "2"

    alerts = roots[7:7 + len(SecurityAlertKind)]
    for kind, alert in zip(SecurityAlertKind, alerts, strict=True):
        event = alert.find("EventIdentification")
        assert (event.get("EventActionCode"), _code(event, "EventTypeCode"), event.get("EventOutcomeIndicator")) \
            == ("E", kind.event_type.code, str(kind.outcome))
        assert all(p.get("UserIsRequestor") == "false" for p in alert.findall("ActiveParticipant"))
        subject = alert.find("ParticipantObjectIdentification")
        assert (subject.get("ParticipantObjectID"), _code(subject, "ParticipantObjectIDTypeCode")) == \
            ("10.9.9.9", "110182")
        detail = subject.find("ParticipantObjectDetail")
        assert detail.get("type") == "Alert Description"
        assert base64.b64decode(detail.get("value")).decode() == f"{kind.short} test"
    assert SecurityAlertKind.UNKNOWN_PEER.event_type.code == "110132"
    assert SecurityAlertKind.ADDRESS_MISMATCH.event_type.code == "110126"
    configuration = roots[7 + len(SecurityAlertKind) + 1]
    assert configuration.findall("ActiveParticipant")[0].get("UserID") == "alice"
    assert _code(configuration.find("ParticipantObjectIdentification"), "ParticipantObjectIDTypeCode") == "12"

    retention, purge, retry, model = roots[-5:-1]
    assert retention.find("EventIdentification").get("EventActionCode") == "D"
    assert [p.get("UserIsRequestor") for p in retention.findall("ActiveParticipant")] == ["true"]
    assert [p.get("UserID") for p in purge.findall("ActiveParticipant")] == ["alice", "TRIAGENODE"]
    assert retry.find("EventIdentification").get("EventActionCode") == "U"
    assert retry.findtext("EventIdentification/EventOutcomeDescription") == "queue retry: model lung-ct"
    assert _code(model.find("EventIdentification"), "EventTypeCode") == "110131"


def test_a_peers_text_cannot_break_a_line_or_the_xml(make_trail: Callable[..., AuditTrail]) -> None:
    trail = make_trail()
    nasty = AuditedStudy(study_uid="1.2.3", patient_id="P\n1", patient_name="DOE^J\r\nOHN<x>&\x00")
    trail.security_alert(kind=SecurityAlertKind.UNKNOWN_PEER, peer_address="10.0.0.1", peer_ae="EVIL\nAE\x07",
                         detail="line one\nline two \x1b[31m</AuditMessage>")
    trail.instances_transferred(received=True, peer_ae="CT1", peer_address="10.0.0.2", study=nasty)
    alert, transfer = (validate(line) for line in lines(trail))
    assert alert.findtext("EventIdentification/EventOutcomeDescription") == \
        "line one\nline two \\x1b[31m</AuditMessage>"
    assert transfer.findall("ParticipantObjectIdentification")[1].findtext("ParticipantObjectName") == \
        "DOE^J\r\nOHN<x>&\\x00"


def test_files_are_0640_in_a_0750_directory_whatever_the_umask(make_trail: Callable[..., AuditTrail]) -> None:
    previous = os.umask(0)
    try:
        trail = make_trail()
        trail.application_activity(started=True, user="triage")
    finally:
        os.umask(previous)
    [path] = trail.directory.glob("*.log")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(trail.directory.stat().st_mode) == 0o750


def test_a_new_utc_day_starts_a_new_file_and_old_ones_are_never_rewritten(tmp_path: Path) -> None:
    day = [datetime(2030, 1, 1, 23, 59, 59, tzinfo=UTC)]
    trail = AuditTrail(tmp_path, AuditSettings(), node_ae="TRIAGENODE", now=lambda: day[0])
    trail.transfer_began(received=True, peer_ae="CT1", peer_address="10.1.2.3", study=STUDY)
    first = trail.directory / "2030-01-01.log"
    before = first.read_bytes()
    day[0] = datetime(2030, 1, 2, 1, 0, tzinfo=timezone(timedelta(hours=2)))  # 23:00 UTC: still the first day
    trail.transfer_began(received=True, peer_ae="CT1", peer_address="10.1.2.3", study=STUDY)
    day[0] = datetime(2030, 1, 2, 0, 0, 1, tzinfo=UTC)
    trail.transfer_began(received=True, peer_ae="CT1", peer_address="10.1.2.3", study=STUDY)
    trail.close()
    assert sorted(p.name for p in trail.directory.iterdir()) == ["2030-01-01.log", "2030-01-02.log"]
    assert first.read_bytes().startswith(before), "appended, never rewritten"
    assert len(first.read_bytes().splitlines()) == 2
    assert trail.file_for(day[0]) == trail.directory / "2030-01-02.log"


def _append_from_a_process(data_dir: str, marker: str, count: int, start: object) -> None:
    """Run in a child process: wait for the start signal, then append ``count`` big messages as fast as it can."""
    big = AuditedStudy(study_uid=f"1.2.3.{marker}", patient_id=marker, patient_name=marker * 10,
                       sop_classes={f"1.2.840.10008.5.1.4.1.1.{n}": n for n in range(1, 300)})
    trail = AuditTrail(Path(data_dir), AuditSettings(), node_ae=f"NODE{marker}")
    start.wait(10)
    for _ in range(count):
        trail.instances_transferred(received=True, peer_ae="CT1", peer_address="10.1.2.3", study=big)
    trail.close()


def test_two_processes_appending_at_once_never_interleave_lines(tmp_path: Path) -> None:
    """Messages of ~20 KB (more than a page, far more than PIPE_BUF) from two processes into one file."""
    context = multiprocessing.get_context("fork")
    start = context.Event()
    count = 150
    workers = [context.Process(target=_append_from_a_process, args=(str(tmp_path), marker, count, start))
               for marker in ("A", "B")]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    [path] = (tmp_path / "audit").glob("*.log")
    written = path.read_bytes().split(b"\n")
    assert written[-1] == b"" and len(written) == 2 * count + 1
    assert len(written[0]) > 16384
    seen = {"A": 0, "B": 0}
    for line in written[:-1]:
        root = validate(line.decode("utf-8"))
        seen[root.find("ActiveParticipant[2]").get("UserID")[-1]] += 1
    assert seen == {"A": count, "B": count}


def test_a_directory_it_cannot_write_is_logged_once_and_the_node_goes_on(
    make_trail: Callable[..., AuditTrail], caplog: pytest.LogCaptureFixture
) -> None:
    trail = make_trail()
    trail.directory.parent.mkdir(parents=True)
    trail.directory.write_text("not a directory")  # as broken as a full disk, even for root
    caplog.set_level(logging.INFO, logger="triagenode.audit")
    for _ in range(3):
        trail.transfer_began(received=True, peer_ae="CT1", peer_address="10.1.2.3", study=STUDY)
    failing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit.failing")]
    assert len(failing) == 1, failing
    assert "DOE" not in failing[0] and "PAT-0042" not in failing[0], "no patient identifiers in the log"
    trail.directory.unlink()
    trail.transfer_began(received=True, peer_ae="CT1", peer_address="10.1.2.3", study=STUDY)
    assert len(lines(trail)) == 1
    assert any(r.getMessage().startswith("audit.recovered") and "lost=3" in r.getMessage() for r in caplog.records)


def test_disabled_writes_nothing(make_trail: Callable[..., AuditTrail]) -> None:
    trail = make_trail(enabled=False)
    every_event(trail)
    assert not trail.directory.exists()


def _check_frames(messages: list[SyslogMessage], trail: AuditTrail) -> None:
    """Each frame is RFC 5424 as PS3.15 A.6/A.7 and ATNA ask, and carries a line of the file, byte for byte."""
    filed = lines(trail)
    for message in messages:
        assert message.facility == 10 and message.severity in (4, 5), message.pri
        assert (message.version, message.app_name, message.msgid, message.structured_data) == \
            (1, "triagenode", "IHE+RFC-3881", "-")
        assert message.procid == str(os.getpid()) and message.hostname == socket.gethostname()
        assert message.has_bom
        validate(message.xml)
        assert message.xml in filed
    assert sorted(m.xml for m in messages) == sorted(filed)


def test_a_udp_repository_gets_every_message(make_trail: Callable[..., AuditTrail]) -> None:
    with SyslogReceiver("udp") as repository:
        trail = make_trail(syslog=repository.address, syslog_protocol="udp")
        count = len(every_event(trail))
        messages = repository.wait_for(count)
        trail.close()
    assert messages[0].pri == 85, "<85>: authpriv.notice for most messages"
    _check_frames(messages, trail)


def test_a_tls_repository_gets_every_message_from_an_authenticated_node(
    make_trail: Callable[..., AuditTrail], pki: dict
) -> None:
    repository_certificate, node = pki["repository"], pki["node"]
    with SyslogReceiver("tls", certificate=repository_certificate.certificate,
                        private_key=repository_certificate.private_key, client_ca=pki["ca"].certificate) as repository:
        tls = TlsSettings(certificate=node.certificate, private_key=node.private_key,
                          ca_certificates=pki["ca"].certificate)
        trail = make_trail(syslog=f"localhost:{repository.port}", syslog_protocol="tls", tls=tls)
        count = len(every_event(trail))
        messages = repository.wait_for(count)
        trail.close()
    assert repository.connections == 1, "one connection for every message"
    assert ((("commonName", "triagenode-node"),),) == messages[0].peer_certificate["subject"]
    _check_frames(messages, trail)


def test_syslog_ca_certificates_takes_precedence_and_a_repository_from_another_ca_is_refused(
    make_trail: Callable[..., AuditTrail], pki: dict, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triagenode.audit")
    foreign = pki["other"].issue("localhost")
    with SyslogReceiver("tls", certificate=foreign.certificate, private_key=foreign.private_key) as repository:
        # [tls] trusts the other CA, [audit] syslog_ca_certificates (which wins) trusts only the node's own.
        tls = TlsSettings(ca_certificates=pki["other"].certificate)
        trail = make_trail(syslog=repository.address, syslog_protocol="tls", tls=tls,
                           syslog_ca_certificates=pki["ca"].certificate)
        started = time.monotonic()
        trail.security_alert(kind=SecurityAlertKind.UNKNOWN_PEER, peer_address="10.0.0.1", peer_ae="X", detail="x")
        assert time.monotonic() - started < 0.2
        repository.wait_for_handshake_failure()
        deadline = time.monotonic() + 5
        while not any("audit.syslog_failing" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the refusal is logged"
            time.sleep(0.05)
        trail.close(timeout=0.2)
    assert repository.messages == []
    [failing] = [r.getMessage() for r in caplog.records if "audit.syslog_failing" in r.getMessage()]
    assert "certificate verify failed" in failing and "syslog_ca_certificates" in failing
    assert len(lines(trail)) == 1, "the file has it"


@pytest.mark.slow
def test_a_repository_that_is_down_or_hangs_never_blocks_and_gets_the_messages_once_it_is_up(
    make_trail: Callable[..., AuditTrail], pki: dict, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO, logger="triagenode.audit")
    certificate = pki["repository"]
    tls = TlsSettings(ca_certificates=pki["ca"].certificate)

    # A repository that accepts the TCP connection and never answers the handshake: nothing waits on it.
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(1)
    try:
        trail = make_trail(syslog=f"127.0.0.1:{hanging.getsockname()[1]}", syslog_protocol="tls", tls=tls,
                           data_dir=tmp_path / "hung")
        started = time.monotonic()
        for _ in range(20):
            trail.transfer_began(received=True, peer_ae="CT1", peer_address="10.1.2.3", study=STUDY)
        assert time.monotonic() - started < 0.5, "the callers never wait on the repository"
        started = time.monotonic()
        trail.close(timeout=0.5)
        assert time.monotonic() - started < 1.5, "close gives up at its timeout"
        assert len(lines(trail)) == 20
    finally:
        hanging.close()

    # A repository that is down (connection refused), then comes up: the messages queued reach it.
    port = free_port()
    trail = make_trail(syslog=f"localhost:{port}", syslog_protocol="tls", tls=tls)
    started = time.monotonic()
    for _ in range(5):
        trail.transfer_began(received=True, peer_ae="CT1", peer_address="10.1.2.3", study=STUDY)
    assert time.monotonic() - started < 0.5
    refused = f"audit.syslog_failing repository=localhost:{port} "
    deadline = time.monotonic() + 5
    while not any(r.getMessage().startswith(refused) for r in caplog.records):
        assert time.monotonic() < deadline, "the refusal is logged"
        time.sleep(0.05)
    time.sleep(1.5)  # a second attempt fails too, and is not logged again
    with SyslogReceiver("tls", certificate=certificate.certificate, private_key=certificate.private_key,
                        port=port) as repository:
        messages = repository.wait_for(5, timeout=8)
        trail.close()
    failing = [r for r in caplog.records if r.getMessage().startswith(refused)]
    assert len(failing) == 1, "once per spell, however many attempts failed"
    assert any(r.getMessage().startswith("audit.syslog_recovered") for r in caplog.records)
    _check_frames(messages, trail)
