"""The node's DICOM audit trail (PS3.15 A.5, IHE ATNA): who sent or got which patient's study, who was refused.

Every message is a DICOM Audit Message (PS3.15 A.5.1, validated against the
schema in ``tests/data/dicom-audit-message.rng``), written as one line to
``data_dir/audit/YYYY-MM-DD.log`` (the UTC date) and, with ``[audit] syslog``,
also sent to an audit record repository (RFC 5424 over TLS, RFC 5425, or UDP,
RFC 5426; PS3.15 A.6/A.7). Unlike the ordinary log, the audit trail names the
patient (ID and name): that is what an audit trail is for. The file is the
record; the repository gets a copy when it can.

The files are the node's own: the directory is 0750, each file is created
0640 whatever the umask, opened ``O_APPEND`` and written with one
``os.write`` per message, so that the daemon and a CLI process appending to
the same file at once never interleave lines (Linux holds the file's lock
for the whole write, and ``O_APPEND`` places each write at the end). A file
is never truncated or rewritten; a new UTC day starts a new file, which is
all the rotation there is (delete or archive old days as the site's policy
says). There is no fsync per message: a message written is in the kernel's
page cache, so a crash of the node loses nothing; only a power cut or a
kernel crash can lose the last seconds, and an fsync per association event
would cost a disk flush each time the receiver takes a study. The file is
fsynced when its day ends and at :meth:`AuditTrail.close`, and the
repository, when there is one, holds a copy off the node.

Auditing never fails its caller: a full disk or an unwritable directory is
logged once (``audit.failing``) until a message is written again
(``audit.recovered``), and the node goes on. Messages go to the repository
from one background thread through a bounded queue, so an association
thread never waits on the network; a repository that is down or refuses the
node's TLS is logged once per spell (``audit.syslog_failing``,
``audit.syslog_recovered``), retried with backoff, and what does not reach
it stays in the file.

This module runs in the receiver's process and the CLI's: standard library
only (no torch, no pydicom).
"""

from __future__ import annotations

import base64
import contextlib
import enum
import errno
import ipaddress
import logging
import os
import pwd
import queue
import re
import select
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from triagenode.config.settings import AuditSettings, Settings, TlsSettings
    from triagenode.storage.retention import PurgedStudy

log = logging.getLogger("triagenode.audit")

__all__ = [
    "AuditTrail",
    "AuditedStudy",
    "Code",
    "SecurityAlertKind",
    "os_user",
    "syslog_frame",
]


@dataclass(frozen=True)
class Code:
    """A coded value as the audit schema writes it: ``csd-code``, ``codeSystemName``, ``originalText``."""

    code: str
    system: str
    meaning: str
    """The code meaning; the schema's ``originalText`` (required)."""


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


# Event IDs (PS3.16 CID 400) and types (CID 401, 403), roles (CID 402), object ID types (CID 404, RFC 3881).
APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
BEGIN_TRANSFERRING = _dcm("110102", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
STUDY_DELETED = _dcm("110105", "DICOM Study Deleted")
SECURITY_ALERT = _dcm("110113", "Security Alert")
APPLICATION_START = _dcm("110120", "Application Start")
APPLICATION_STOP = _dcm("110121", "Application Stop")
ROLE_APPLICATION = _dcm("110150", "Application")
ROLE_APPLICATION_LAUNCHER = _dcm("110151", "Application Launcher")
ROLE_DESTINATION = _dcm("110152", "Destination Role ID")
ROLE_SOURCE = _dcm("110153", "Source Role ID")
STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
NODE_ID = _dcm("110182", "Node ID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
URI = Code("12", "RFC-3881", "URI")

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12
"""EventOutcomeIndicator (PS3.15 A.5.1): the only values the schema takes."""

AUDIT_SOURCE_TYPE = "4"
"""AuditSourceTypeCode: "Application Server process tier in a multi-tier system" (PS3.15 A.5.1.2.1)."""

SYSLOG_FACILITY = 10
"""security/authorization (PS3.15 A.6, A.7: "The PRI field shall be set using the facility value of 10")."""
SEVERITY_NOTICE, SEVERITY_WARNING = 5, 4
"""Most messages are notices ("<85>"); security alerts and failed events are warnings, which A.6/A.7 allow."""
APP_NAME = "triagenode"
MSGID = "IHE+RFC-3881"
"""What IHE ATNA's Record Audit Event [ITI-20] sets for DICOM audit messages and what repositories (dcm4chee's,
Gazelle's) expect; PS3.15 A.6 only asks that MSGID be set ("DICOM+RFC3881" may be used)."""
BOM = b"\xef\xbb\xbf"
"""RFC 5424 6.4: a MSG in UTF-8 starts with the byte order mark."""

QUEUE_SIZE = 1000
"""Messages waiting for the repository; beyond that new ones are only in the file (logged once per spell)."""
CONNECT_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 10.0
INITIAL_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
UDP_MAX_PAYLOAD = 65507
"""The largest UDP datagram over IPv4; a longer message is not sent over UDP (RFC 5426 3.2), only filed.
ATNA asks repositories to take 32768 octets; the node's messages are a few kilobytes."""


@dataclass(frozen=True)
class AuditedStudy:
    """A study as an audit message names it (Participant Objects)."""

    study_uid: str
    patient_id: str = ""
    """(0010,0020); the audit message names the patient, as the standard requires."""
    patient_name: str = ""
    """(0010,0010), as DICOM writes it (``DOE^JOHN``)."""
    sop_classes: Mapping[str, int] = field(default_factory=dict)
    """SOP Class UID -> number of instances."""
    accession_number: str = ""


class SecurityAlertKind(enum.Enum):
    """What a Security Alert (110113) reports: its EventTypeCode (PS3.16 CID 403) and a short name for logs.

    - ``NODE_AUTHENTICATION`` (110126 "Node Authentication"): a TLS handshake failed (no certificate, one
      from another CA, an expired one, an old protocol): the peer node could not prove who it is.
    - ``UNKNOWN_PEER`` (110132 "Use of Restricted Function"): a calling AE title not in
      ``allowed_calling_aets``. The peer did not fail to prove an identity, it is not allowed to use the
      node's storage at all; that is authorisation, which CID 403 codes as the use of a restricted
      function, not authentication.
    - ``ADDRESS_MISMATCH`` (110126 "Node Authentication"): a ``[[peers]]`` AE title from an address not
      listed for it (or without TLS where TLS is required). The AE title is a claim of identity that its
      address did not bear out: a failed node authentication.
    - ``ASSOCIATION_REFUSED`` (110132 "Use of Restricted Function"): refused for a limit
      (``max_associations``, a peer's own limit). A peer opening associations beyond what it is allowed
      is the use of a function beyond its rights, and a loop of them is what an auditor looks for.
    - ``SOFTWARE_CONFIGURATION`` (110131 "Software Configuration"): the models served changed.
    - ``AUDIT_RECORDING_STARTED`` / ``AUDIT_RECORDING_STOPPED`` (110134 / 110133).

    Refusals are Minor failures (4): the node's mitigation, refusing, worked (PS3.15 A.5.3.11); the
    others are informative (0).
    """

    NODE_AUTHENTICATION = ("node-authentication", "110126", "Node Authentication", MINOR_FAILURE)
    UNKNOWN_PEER = ("unknown-peer", "110132", "Use of Restricted Function", MINOR_FAILURE)
    ADDRESS_MISMATCH = ("address-mismatch", "110126", "Node Authentication", MINOR_FAILURE)
    ASSOCIATION_REFUSED = ("association-refused", "110132", "Use of Restricted Function", MINOR_FAILURE)
    SOFTWARE_CONFIGURATION = ("software-configuration", "110131", "Software Configuration", SUCCESS)
    AUDIT_RECORDING_STARTED = ("audit-recording-started", "110134", "Audit Recording Started", SUCCESS)
    AUDIT_RECORDING_STOPPED = ("audit-recording-stopped", "110133", "Audit Recording Stopped", SUCCESS)

    def __init__(self, short: str, code: str, meaning: str, outcome: int) -> None:
        self.short = short
        self.event_type = _dcm(code, meaning)
        self.outcome = outcome


def os_user() -> str:
    """Who runs this process, for ``user=`` (the Application Launcher, the CLI's administrator).

    Not ``$USER``/``$LOGNAME``, which anyone can set: the effective user from the password
    database, and the person who logged in (the kernel's audit login uid, which ``sudo`` and
    ``su`` keep) when that is someone else: ``alice (as triagenode)`` for the documented
    ``sudo -u triagenode triagenode queue retry ...``.
    """
    effective = _user_name(os.geteuid())
    login = _login_uid()
    if login is not None and login != os.geteuid():
        return f"{_user_name(login)} (as {effective})"
    return effective


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        return f"uid:{uid}"


def _login_uid() -> int | None:
    """The kernel's audit login uid (set at login, kept across sudo and su); None where it is not set."""
    try:
        value = int(Path("/proc/self/loginuid").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if value == 0xFFFFFFFF else value


@dataclass(frozen=True)
class _Participant:
    """One ActiveParticipant."""

    user_id: str
    requestor: bool
    alternative: str | None = None
    name: str | None = None
    access_point: str | None = None
    access_point_type: str | None = None
    roles: tuple[Code, ...] = ()


_XML_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _clean(text: str) -> str:
    """``text`` without characters XML 1.0 cannot carry (a peer's control bytes), written as visible escapes."""
    return _XML_INVALID.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system,
                                       "originalText": code.meaning})


def _access_point_type(address: str) -> str:
    """NetworkAccessPointTypeCode: 2 (IP address) for an address, 1 (machine name) for a host name."""
    try:
        ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return "1"
    return "2"


def _peer(ae: str | None, address: str | None, *, requestor: bool, role: Code | None = None) -> _Participant:
    """A DICOM peer: its AE title as UserID and, as PS3.15 A.5.2.2 asks of a DICOM application,
    ``AETITLES=`` in AlternativeUserID; its address as the network access point."""
    ae = (ae or "").strip()
    address = (address or "").strip()
    return _Participant(
        user_id=ae or address or "unknown",
        requestor=requestor,
        alternative=f"AETITLES={ae}" if ae else None,
        access_point=address or None,
        access_point_type=_access_point_type(address) if address else None,
        roles=(role,) if role else (),
    )


def _person(user: str, *, requestor: bool, role: Code | None = None) -> _Participant:
    """A person (the OS login name of whoever ran the command) as an active participant."""
    return _Participant(user_id=user, requestor=requestor, name=user, roles=(role,) if role else ())


def _study_objects(study: AuditedStudy) -> list[ET.Element]:
    """The study (System Object, Report, Study Instance UID) and, when its ID is known, its patient (Person,
    Patient, Patient Number), as PS3.15 A.5.3.3/A.5.3.6-8 describe them."""
    study_object = ET.Element("ParticipantObjectIdentification", {
        "ParticipantObjectID": study.study_uid, "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "3",
    })
    _coded(study_object, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
    # The schema's text makes one of ParticipantObjectName/Query mandatory in every object; the UID is the
    # study's only name the node is sure of (Study Description may be empty and is no identifier).
    ET.SubElement(study_object, "ParticipantObjectName").text = study.study_uid
    if study.accession_number or study.sop_classes:
        description = ET.SubElement(study_object, "ParticipantObjectDescription")
        if study.accession_number:
            ET.SubElement(description, "Accession", {"Number": study.accession_number})
        for uid, count in sorted(study.sop_classes.items()):
            ET.SubElement(description, "SOPClass", {"UID": uid, "NumberOfInstances": str(int(count))})
    objects = [study_object]
    if study.patient_id:
        patient = ET.Element("ParticipantObjectIdentification", {
            "ParticipantObjectID": study.patient_id, "ParticipantObjectTypeCode": "1",
            "ParticipantObjectTypeCodeRole": "1",
        })
        _coded(patient, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)
        ET.SubElement(patient, "ParticipantObjectName").text = study.patient_name
        objects.append(patient)
    return objects


def _alert_subject(identifier: str, id_type: Code, name: str, description: str) -> ET.Element:
    """A Security Alert's subject (PS3.15 A.5.3.11): a node or a file, with its "Alert Description"."""
    subject = ET.Element("ParticipantObjectIdentification", {
        "ParticipantObjectID": identifier, "ParticipantObjectTypeCode": "2",
    })
    _coded(subject, "ParticipantObjectIDTypeCode", id_type)
    ET.SubElement(subject, "ParticipantObjectName").text = name
    ET.SubElement(subject, "ParticipantObjectDetail", {
        "type": "Alert Description", "value": base64.b64encode(description.encode("utf-8")).decode("ascii"),
    })
    return subject


def _message(
    *,
    event: Code,
    action: str,
    outcome: int,
    when: datetime,
    participants: Iterable[_Participant],
    source_id: str,
    site: str = "",
    event_types: Iterable[Code] = (),
    description: str = "",
    objects: Iterable[ET.Element] = (),
) -> str:
    """One AuditMessage on one line: no XML declaration, line breaks in values written as references."""
    root = ET.Element("AuditMessage")
    identification = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": action, "EventDateTime": when.isoformat(timespec="microseconds"),
        "EventOutcomeIndicator": str(outcome),
    })
    _coded(identification, "EventID", event)
    for event_type in event_types:
        _coded(identification, "EventTypeCode", event_type)
    if description:
        ET.SubElement(identification, "EventOutcomeDescription").text = description
    for participant in participants:
        attributes = {"UserID": participant.user_id}
        if participant.alternative:
            attributes["AlternativeUserID"] = participant.alternative
        if participant.name:
            attributes["UserName"] = participant.name
        attributes["UserIsRequestor"] = "true" if participant.requestor else "false"
        if participant.access_point:
            attributes["NetworkAccessPointID"] = participant.access_point
            attributes["NetworkAccessPointTypeCode"] = participant.access_point_type or "1"
        element = ET.SubElement(root, "ActiveParticipant", attributes)
        for role in participant.roles:
            _coded(element, "RoleIDCode", role)
    source = {"AuditSourceID": source_id}
    if site:
        source["AuditEnterpriseSiteID"] = site
    ET.SubElement(ET.SubElement(root, "AuditSourceIdentification", source), "AuditSourceTypeCode",
                  {"csd-code": AUDIT_SOURCE_TYPE})
    root.extend(objects)
    for element in root.iter():
        element.attrib = {key: _clean(value) for key, value in element.attrib.items()}
        if element.text:
            element.text = _clean(element.text)
    # ElementTree writes a line break in an attribute as &#10; but leaves one in text as it is.
    return ET.tostring(root, encoding="unicode").replace("\r", "&#13;").replace("\n", "&#10;")


def syslog_frame(xml: str, when: datetime, *, hostname: str, procid: int, severity: int = SEVERITY_NOTICE) -> bytes:
    """One RFC 5424 message: ``<85>1 TIMESTAMP HOST triagenode PID IHE+RFC-3881 - BOM<AuditMessage ...>``."""
    host = "".join(c for c in hostname if "!" <= c <= "~")[:255] or "-"
    header = (f"<{SYSLOG_FACILITY * 8 + severity}>1 {when.isoformat(timespec='microseconds')} {host} {APP_NAME} "
              f"{procid} {MSGID} -")
    return header.encode("ascii") + b" " + BOM + xml.encode("utf-8")


class _DailyFile:
    """``directory/YYYY-MM-DD.log``: created 0640, appended with one write per message, never rewritten."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None
        self._day = ""
        self._torn = False
        """A write failed half-way: the next message starts on a line of its own."""

    def path(self, day: str) -> Path:
        return self.directory / f"{day}.log"

    def append(self, line: bytes, day: str) -> None:
        """Append one line; raises OSError (the caller logs it). Called under the trail's lock."""
        if self._fd is None or day != self._day:
            self.close()
            self._fd, self._day = self._open(self.path(day)), day
        data = (b"\n" + line) if self._torn else line
        view, written = memoryview(data), 0
        while written < len(data):
            try:
                written += os.write(self._fd, view[written:])
            except OSError:
                self._torn = self._torn or written > 0
                raise
        self._torn = False

    def _open(self, path: Path) -> int:
        if not self.directory.is_dir():
            self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # not ours (made by another user at the same moment): keep its mode
                # whatever the umask; the group (auditors) may enter it and read the 0640 files
                os.chmod(self.directory, 0o750)  # noqa: S103
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            return os.open(path, flags)
        try:
            os.fchmod(fd, 0o640)  # the umask may have taken bits off the mode given to open
            if os.geteuid() == 0:
                # The CLI run as root (not as the service user) must not leave the day's file, or the
                # directory, root's: the node could not append to them until the next day.
                owner = self.directory.parent.stat()
                os.fchown(fd, owner.st_uid, owner.st_gid)
                os.chown(self.directory, owner.st_uid, owner.st_gid)
        except OSError:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        """fsync and close the day's file (see the module docstring for why only here)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.fsync(fd)
        with contextlib.suppress(OSError):
            os.close(fd)


class _TlsFilesError(OSError):
    """The TLS context toward the repository cannot be made from the configured files."""


class _SyslogSender:
    """Sends frames to the repository from one thread; the caller only queues them."""

    def __init__(self, host: str, port: int, protocol: str, context: Callable[[], ssl.SSLContext]) -> None:
        self.host, self.port, self.protocol = host, port, protocol
        self._context_factory = context
        self._context: ssl.SSLContext | None = None
        self._queue: queue.Queue[bytes] = queue.Queue(QUEUE_SIZE)
        self._closing = threading.Event()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._udp_address: tuple[object, ...] | None = None
        self._failing_since: float | None = None
        self._dropping = False
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    @property
    def repository(self) -> str:
        return f"{self.host}:{self.port}"

    def submit(self, frame: bytes) -> None:
        """Queue one frame; never blocks. A full queue drops it (it is in the file) and says so once."""
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            if not self._dropping:
                self._dropping = True
                log.warning("audit.syslog_dropping repository=%s queued=%d; the repository is not keeping up, "
                            "new messages are only in data_dir/audit until it does", self.repository, QUEUE_SIZE)
            return
        self._dropping = False

    def close(self, timeout: float) -> None:
        """Send what is queued within ``timeout`` seconds, then stop; what is left is in the file only."""
        self._closing.set()
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(0.2)
            left = self._queue.qsize()
            if left:
                log.warning("audit.syslog_undelivered repository=%s messages=%d; they are in data_dir/audit",
                            self.repository, left)

    def _run(self) -> None:
        pending: bytes | None = None
        backoff = INITIAL_BACKOFF_S
        while not self._stop.is_set():
            if pending is None:
                try:
                    pending = self._queue.get(timeout=0.1)
                except queue.Empty:
                    if self._closing.is_set():
                        break
                    continue
            try:
                self._send(pending)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; ValueError: a bad CA/key file
                self._disconnect()
                self._failed(exc)
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            pending, backoff = None, INITIAL_BACKOFF_S
            self._succeeded()
        self._disconnect()

    def _send(self, frame: bytes) -> None:
        if self.protocol == "udp":
            if len(frame) > UDP_MAX_PAYLOAD:
                log.warning("audit.syslog_too_large repository=%s bytes=%d; over UDP's limit, it is in "
                            "data_dir/audit only (use syslog_protocol = \"tls\")", self.repository, len(frame))
                return
            if self._sock is None or self._udp_address is None:
                family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
                self._sock, self._udp_address = socket.socket(family, kind, proto), address
            self._sock.sendto(frame, self._udp_address)
            return
        if self._sock is not None and _peer_closed(self._sock):
            self._disconnect()
        if self._sock is None:
            self._sock = self._connect()
        self._sock.sendall(f"{len(frame)} ".encode("ascii") + frame)  # RFC 5425 4.3: octet counting

    def _connect(self) -> ssl.SSLSocket:
        if self._context is None:
            try:
                self._context = self._context_factory()
            except (OSError, ValueError) as exc:  # ssl.SSLError ("PEM lib") is an OSError too
                raise _TlsFilesError(_describe(exc)) from exc
        raw = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S)
        try:
            tls = self._context.wrap_socket(raw, server_hostname=self.host.strip("[]"))
        except BaseException:
            raw.close()
            raise
        tls.settimeout(SEND_TIMEOUT_S)
        return tls

    def _disconnect(self) -> None:
        sock, self._sock, self._udp_address = self._sock, None, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _failed(self, exc: BaseException) -> None:
        if self._failing_since is not None:
            return
        self._failing_since = time.monotonic()
        if isinstance(exc, _TlsFilesError):
            advice = ("this process cannot use [audit] syslog_ca_certificates or the [tls] CA, certificate or key "
                      "files; fix the path or the file's mode (the key must be readable by this user)")
        elif isinstance(exc, ssl.SSLCertVerificationError):
            advice = "its certificate does not chain to syslog_ca_certificates (or [tls] ca_certificates)"
        elif isinstance(exc, ssl.SSLError):
            advice = "the TLS handshake failed; check the repository's TLS settings and the node's certificate"
        else:
            advice = "check that it is up and that this host may reach it"
        log.error("audit.syslog_failing repository=%s protocol=%s error=%r; %s. Messages stay in data_dir/audit "
                  "and are retried with backoff", self.repository, self.protocol, _describe(exc), advice)

    def _succeeded(self) -> None:
        if self._failing_since is None:
            return
        down_s = time.monotonic() - self._failing_since
        self._failing_since = None
        log.info("audit.syslog_recovered repository=%s protocol=%s after_s=%.1f", self.repository,
                 self.protocol, down_s)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, OSError) and exc.errno and not isinstance(exc, ssl.SSLError):
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the repository closed the connection (RFC 5425 receivers never send, so readable means closed).

    Checked before each send, so that a message is not written into a connection that is already gone.
    """
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    if not readable:
        return False
    sock.setblocking(False)
    try:
        data = sock.recv(1)
    except (ssl.SSLWantReadError, BlockingIOError):  # a TLS record without data (a session ticket)
        return False
    except OSError:
        return True
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(SEND_TIMEOUT_S)
    return data == b""


def _split_host_port(value: str) -> tuple[str, int]:
    host, port = value.rsplit(":", 1)
    return host.strip("[]"), int(port)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class AuditTrail:
    """The node's audit trail: one method per audited event; none of them raises or waits on the network.

    Thread safe: association threads, the delivery senders and the service call it at once. One instance per
    process; :meth:`close` at the end (it flushes the repository's queue and fsyncs the file). A message
    after :meth:`close` still goes to the file, no longer to the repository.
    """

    def __init__(
        self,
        data_dir: Path,
        settings: AuditSettings,
        *,
        node_ae: str,
        tls: TlsSettings | None = None,
        process: str = "triagenode",
        site: str = "",
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        """``process`` names this process in its messages (``triagenode`` for the service, ``triagenode-cli``
        for a command); ``site`` is the AuditEnterpriseSiteID (none when empty); ``now`` is the clock (UTC),
        for tests. Never raises: a directory or a repository that cannot be used is logged when first used."""
        self.enabled = settings.enabled
        self.node_ae = node_ae.strip()
        self.process = process
        self.site = site
        self.hostname = socket.gethostname() or "localhost"
        self.directory = Path(data_dir) / "audit"
        self._now = now
        self._lock = threading.Lock()
        self._file = _DailyFile(self.directory)
        self._file_failing = False
        self._lost = 0
        self._syslog: _SyslogSender | None = None
        if self.enabled and settings.syslog:
            host, port = _split_host_port(settings.syslog)
            self._syslog = _SyslogSender(host, port, settings.syslog_protocol,
                                         lambda: _client_context(settings, tls))

    @classmethod
    def for_settings(cls, settings: Settings, process: str = "triagenode") -> AuditTrail:
        """The trail as ``serve`` and the CLI keep it: ``[audit]``, the node's AE title, data_dir and ``[tls]``."""
        return cls(settings.node.data_dir, settings.audit, node_ae=settings.node.ae_title, tls=settings.tls,
                   process=process, site=settings.audit.enterprise_site_id)

    @property
    def source_id(self) -> str:
        """AuditSourceID: ``AE@host``, one value for every message of this node (PS3.15 A.5.2.4)."""
        return f"{self.node_ae}@{self.hostname}"

    def file_for(self, when: datetime) -> Path:
        """The file that holds messages of ``when`` (its UTC date)."""
        return self._file.path(when.astimezone(UTC).strftime("%Y-%m-%d"))

    # -- events ---------------------------------------------------------------------------------------------

    def application_activity(self, *, started: bool, user: str) -> None:
        """Application Activity (110100, E) with Application Start/Stop (110120/110121), PS3.15 A.5.3.1.

        The node is the Application (110150); ``user``, the OS user that started or stopped it (the service
        user under systemd), is the Application Launcher (110151) and the requestor.
        """
        self._emit(
            "application-activity",
            lambda when: _message(
                event=APPLICATION_ACTIVITY, action="E", outcome=SUCCESS, when=when,
                event_types=(APPLICATION_START if started else APPLICATION_STOP,),
                participants=(self._node(requestor=False, role=ROLE_APPLICATION),
                              _person(user, requestor=True, role=ROLE_APPLICATION_LAUNCHER)),
                source_id=self.source_id, site=self.site,
            ),
        )

    def transfer_began(self, *, received: bool, peer_ae: str, peer_address: str, study: AuditedStudy) -> None:
        """Begin Transferring DICOM Instances (110102, E), PS3.15 A.5.3.3: the first instance of a study on an
        association (``received``), or a report about to be sent to a destination."""
        self._emit("begin-transferring", lambda when: self._transfer_message(
            BEGIN_TRANSFERRING, "E", SUCCESS, when, received, peer_ae, peer_address, study, ""))

    def instances_transferred(
        self,
        *,
        received: bool,
        peer_ae: str,
        peer_address: str,
        study: AuditedStudy,
        success: bool = True,
        outcome_description: str = "",
    ) -> None:
        """DICOM Instances Transferred (110104), PS3.15 A.5.3.7: what an association stored, or a report sent.

        EventActionCode C when received (the node did not hold the instances: it creates them), R when sent
        (the audit source is not the receiver, so the standard asks for R). A failed transfer is a Minor
        failure (4), the reason in EventOutcomeDescription; one message per outcome, as A.5.2 asks.
        """
        outcome = SUCCESS if success else MINOR_FAILURE
        description = outcome_description or ("" if success else "the transfer did not complete")
        self._emit("instances-transferred", lambda when: self._transfer_message(
            INSTANCES_TRANSFERRED, "C" if received else "R", outcome, when, received, peer_ae, peer_address,
            study, description), severity=SEVERITY_NOTICE if success else SEVERITY_WARNING)

    def security_alert(
        self,
        *,
        kind: SecurityAlertKind,
        peer_address: str | None,
        peer_ae: str | None,
        detail: str,
        user: str | None = None,
        subject_uri: str | None = None,
    ) -> None:
        """Security Alert (110113, E), PS3.15 A.5.3.11, its EventTypeCode from ``kind``.

        Reporting: the node (and ``user`` when a person caused it, e.g. a model change from the CLI).
        Performing: the peer, when there is one, with UserIsRequestor false as A.5.3.11 requires. The alert's
        subject is the peer node (Node ID, its address) or ``subject_uri`` (a file, e.g. a model package),
        each with ``detail`` as its "Alert Description"; ``detail`` is also the EventOutcomeDescription.
        """

        def build(when: datetime) -> str:
            participants = [self._node(requestor=False)]
            if user:
                participants.insert(0, _person(user, requestor=True))
            objects = []
            if peer_address or peer_ae:
                participants.append(_peer(peer_ae, peer_address, requestor=False))
                name = (peer_ae or "").strip() or (peer_address or "")
                objects.append(_alert_subject(peer_address or name, NODE_ID, name, detail))
            if subject_uri:
                objects.append(_alert_subject(subject_uri, URI, subject_uri, detail))
            return _message(event=SECURITY_ALERT, action="E", outcome=kind.outcome, when=when,
                            event_types=(kind.event_type,), description=detail, participants=participants,
                            objects=objects, source_id=self.source_id, site=self.site)

        self._emit(f"security-alert/{kind.short}", build, severity=SEVERITY_WARNING)

    def study_deleted(self, *, user: str, study: AuditedStudy, reason: str, success: bool = True) -> None:
        """DICOM Study Deleted (110105, D), PS3.15 A.5.3.8: retention (``[storage] keep_days``) or
        ``queue purge``. ``user`` is the person who purged it; empty for retention, where the node itself is
        the requestor. ``reason`` is the EventOutcomeDescription."""

        def build(when: datetime) -> str:
            participants = [self._node(requestor=not user)]
            if user:
                participants.insert(0, _person(user, requestor=True))
            return _message(event=STUDY_DELETED, action="D", outcome=SUCCESS if success else MINOR_FAILURE,
                            when=when, description=reason, participants=participants,
                            objects=_study_objects(study), source_id=self.source_id, site=self.site)

        self._emit("study-deleted", build)

    def studies_purged(self, purged: Iterable[PurgedStudy], *, user: str = "") -> None:
        """One Study Deleted message per study retention or ``queue purge`` removed (their patients were read
        before the files went); ``user`` empty for the node's own retention sweep."""
        for study in purged:
            audited = AuditedStudy(study_uid=study.study_uid, patient_id=study.patient_id,
                                   patient_name=study.patient_name, sop_classes=dict(study.sop_classes),
                                   accession_number=study.accession_number)
            reason = study.reason + (" (finishing a purge that was cut short)" if study.resumed else "")
            self.study_deleted(user=user, study=audited, reason=reason)

    def administrative_action(self, *, user: str, action: str, study: AuditedStudy | None, detail: str) -> None:
        """An administrator's command (``queue retry/cancel/resend``, a model change), by ``user``.

        About a study: DICOM Instances Accessed (110103) with EventActionCode U (PS3.15 A.5.3.6). The command
        reads no pixel data and sends nothing itself (a resend's transfer is audited when it happens); what it
        does is change the node's record of the study: its state, its deliveries. That is an update of the
        study's instances as the node holds them, which 110103 U describes, with the study and its patient
        named. Not about a study (the models served, the configuration): a Security Alert with Software
        Configuration (110131), informative (outcome 0), as CID 403 codes a change of software configuration.
        ``action`` and ``detail`` go into EventOutcomeDescription (``"queue retry: <detail>"``).
        """
        text = f"{action}: {detail}" if detail else action
        if study is None:
            self.security_alert(kind=SecurityAlertKind.SOFTWARE_CONFIGURATION, peer_address=None, peer_ae=None,
                                detail=text, user=user)
            return
        self._emit("instances-accessed", lambda when: _message(
            event=INSTANCES_ACCESSED, action="U", outcome=SUCCESS, when=when, description=text,
            participants=(_person(user, requestor=True), self._node(requestor=False)),
            objects=_study_objects(study), source_id=self.source_id, site=self.site))

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued for the repository within ``timeout`` seconds, fsync and close the file."""
        if self._syslog is not None:
            self._syslog.close(timeout)
        with self._lock:
            self._file.close()

    # -- the parts ----------------------------------------------------------------------------------------

    def _node(self, *, requestor: bool, role: Code | None = None) -> _Participant:
        """The node: its AE title as UserID, this process's id as AlternativeUserID (what its journal lines
        carry, A.5.2.1), the process name as UserName, the host name as its network access point."""
        return _Participant(
            user_id=self.node_ae, requestor=requestor, alternative=str(os.getpid()), name=self.process,
            access_point=self.hostname, access_point_type="1", roles=(role,) if role else (),
        )

    def _transfer_message(
        self, event: Code, action: str, outcome: int, when: datetime, received: bool, peer_ae: str,
        peer_address: str, study: AuditedStudy, description: str,
    ) -> str:
        """Source (110153) and Destination (110152); whoever opened the association is the requestor: the
        peer when the node received, the node when it sent."""
        if received:
            participants = (_peer(peer_ae, peer_address, requestor=True, role=ROLE_SOURCE),
                            self._node(requestor=False, role=ROLE_DESTINATION))
        else:
            participants = (self._node(requestor=True, role=ROLE_SOURCE),
                            _peer(peer_ae, peer_address, requestor=False, role=ROLE_DESTINATION))
        return _message(event=event, action=action, outcome=outcome, when=when, description=description,
                        participants=participants, objects=_study_objects(study), source_id=self.source_id,
                        site=self.site)

    def _emit(self, event: str, build: Callable[[datetime], str], severity: int = SEVERITY_NOTICE) -> None:
        """Build, file and queue one message; whatever goes wrong is logged, never raised."""
        if not self.enabled:
            return
        try:
            when = self._now().astimezone(UTC)
            xml = build(when)
        except Exception as exc:  # noqa: BLE001 - an audit message never breaks an association or a command
            log.error("audit.message_failed event=%s error=%s", event, type(exc).__name__, exc_info=True)
            return
        self._write(xml, when)
        if self._syslog is not None:
            self._syslog.submit(syslog_frame(xml, when, hostname=self.hostname, procid=os.getpid(),
                                             severity=severity))

    def _write(self, xml: str, when: datetime) -> None:
        day = when.strftime("%Y-%m-%d")
        line = xml.encode("utf-8") + b"\n"
        with self._lock:
            try:
                self._file.append(line, day)
            except OSError as exc:
                self._lost += 1
                if not self._file_failing:
                    self._file_failing = True
                    log.error(
                        "audit.failing path=%s error=%s; audit messages are not being recorded: free space on "
                        "the disk, or give the service user a writable %s (the node goes on)",
                        self._file.path(day), _describe(exc), self.directory,
                    )
                return
            if self._file_failing:
                self._file_failing = False
                log.warning("audit.recovered path=%s lost=%d", self._file.path(day), self._lost)
                self._lost = 0


def _client_context(settings: AuditSettings, tls: TlsSettings | None) -> ssl.SSLContext:
    """TLS 1.2+ toward the repository: its certificate verified (and its host name) against
    ``syslog_ca_certificates``, else ``[tls] ca_certificates``, else the system's trust; the node's ``[tls]``
    certificate as the client certificate when there is one (ATNA's mutual node authentication)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls is not None and tls.minimum_version == "1.3":
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    from triagenode.daemon.tls import BCP195_CIPHERS  # here: only a TLS repository needs it (and pynetdicom)

    context.set_ciphers(BCP195_CIPHERS)  # the same BCP 195 set as DICOM TLS (TLS 1.3's are all AEAD)
    anchors = settings.syslog_ca_certificates or (tls.ca_certificates if tls is not None else None)
    if anchors is not None:
        context.load_verify_locations(cafile=str(anchors))
    else:
        context.load_default_certs()
    if tls is not None and tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context
