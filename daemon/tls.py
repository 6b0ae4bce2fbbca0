"""DICOM over TLS (PS3.15 B.12, the BCP 195 profiles): the node's certificate, its contexts, its TLS port.

The node refuses to start on a certificate that would fail later, one line
each: a private key others can read, a certificate that does not match its
key, one that has expired (or is not valid yet), a CA file that holds no
certificate. Python's ``ssl`` reads none of this from a file, so the checks
use ``cryptography``.

The contexts allow TLS 1.2 and 1.3 only (``[tls] minimum_version``), and for
TLS 1.2 only the BCP 195 cipher suites (ECDHE or DHE key exchange, AES-GCM);
TLS 1.3's suites are all AEAD. With ``require_client_certificate`` a peer must
present a certificate that chains to ``ca_certificates``, or the handshake fails.

pynetdicom's server does the TLS handshake in its accept loop, so one peer
that connects and says nothing would hold every other connection up. The
node's :class:`TlsAssociationServer` does the handshake in the connection's
own thread instead, under the same ARTIM timeout as a silent plain connection,
and reports a failed handshake with the peer's address.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import ssl
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from triagenode.config.settings import Destination, Settings, TlsSettings

log = logging.getLogger("triagenode.tls")

BCP195_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    )
)
"""TLS 1.2 suites of the BCP 195 profiles (RFC 9325 4.2; PS3.15 B.12): forward secrecy and AEAD only."""

HANDSHAKE_TIMEOUT_S = 5
"""How long a new TLS connection may take to complete its handshake (the ARTIM timer, as for plain TCP)."""

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsSetupError(RuntimeError):
    """The node's TLS files cannot be used; ``str()`` is the one line that says which and what to do."""


@dataclass(frozen=True)
class CertificateInfo:
    """The node's certificate as ``status`` and the expiry warning show it."""

    subject: str
    issuer: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    sha256: str
    """Fingerprint, colon-separated hex, as ``openssl x509 -fingerprint -sha256`` prints it."""

    def days_left(self, now: datetime.datetime | None = None) -> float:
        now = now or datetime.datetime.now(datetime.UTC)
        return (self.not_after - now).total_seconds() / 86400


KEY_LAYOUT = "`chown root:triagenode KEY && chmod 0640 KEY` (or 0600 owned by the service user)"
"""What the README's layout asks of the key file, quoted in each refusal."""


def check_private_key_file(path: Path) -> None:
    """Refuse a key file that users other than the service user (and its groups) can read, or others can change.

    Owned by root or the service user; no access at all for ``other``; group access only
    for one of the process's groups (``root:triagenode 0640`` is the usual layout), and
    never write access for a group.
    """
    try:
        info = path.stat()
    except OSError as exc:
        raise TlsSetupError(f"[tls] private_key {path} cannot be read ({exc.strerror}); check the path") from None
    mode = stat.S_IMODE(info.st_mode)
    foreign_group = mode & 0o070 and info.st_gid not in {os.getgid(), *os.getgroups()}
    if mode & 0o007 or mode & 0o020 or foreign_group:
        raise TlsSetupError(
            f"[tls] private_key {path} can be read or changed by others than the service user (mode {mode:04o}, "
            f"group {info.st_gid}); {KEY_LAYOUT.replace('KEY', str(path))}"
        )
    if info.st_uid not in (0, os.getuid()):
        raise TlsSetupError(
            f"[tls] private_key {path} belongs to uid {info.st_uid}, neither root nor the service user; "
            f"{KEY_LAYOUT.replace('KEY', str(path))}"
        )
    if not os.access(path, os.R_OK):
        raise TlsSetupError(
            f"[tls] private_key {path} cannot be read by the service user (uid {os.getuid()}); "
            f"{KEY_LAYOUT.replace('KEY', str(path))}"
        )


def load_node_certificate(tls: TlsSettings, now: datetime.datetime | None = None) -> CertificateInfo:
    """Check the node's certificate, key and CA file as the start-up does; returns the certificate's facts."""
    from cryptography.hazmat.primitives import serialization

    assert tls.certificate is not None and tls.private_key is not None  # the settings require both with a port
    check_private_key_file(tls.private_key)
    certificates = _read_certificates(tls.certificate, "certificate")
    try:
        key = serialization.load_pem_private_key(tls.private_key.read_bytes(), password=None)
    except TypeError:
        raise TlsSetupError(
            f"[tls] private_key {tls.private_key} is encrypted; the service cannot ask for a pass phrase: "
            "store it decrypted (`openssl pkey -in KEY -out KEY.plain`) and protect the file instead"
        ) from None
    except (ValueError, OSError) as exc:
        raise TlsSetupError(f"[tls] private_key {tls.private_key} is not a PEM private key ({exc})") from None
    certificate = certificates[0]
    encoding, public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(encoding, public) != certificate.public_key().public_bytes(encoding, public):
        raise TlsSetupError(
            f"[tls] certificate {tls.certificate} does not match private_key {tls.private_key}; "
            "give the key the certificate was issued for"
        )
    info = _facts(certificate)
    now = now or datetime.datetime.now(datetime.UTC)
    if info.not_after <= now:
        raise TlsSetupError(
            f"[tls] certificate {tls.certificate} ({info.subject}) expired on {info.not_after:%Y-%m-%d %H:%M} UTC; "
            "install a renewed certificate"
        )
    if info.not_before > now:
        raise TlsSetupError(
            f"[tls] certificate {tls.certificate} is not valid before {info.not_before:%Y-%m-%d %H:%M} UTC; "
            "check the machine's clock or the certificate"
        )
    if tls.ca_certificates is not None:
        _read_certificates(tls.ca_certificates, "ca_certificates")
    return info


def read_certificate(path: Path) -> CertificateInfo:
    """The facts of the first certificate in a PEM file (``status``); raises :class:`TlsSetupError`."""
    return _facts(_read_certificates(path, "certificate")[0])


def _facts(certificate: Any) -> CertificateInfo:
    from cryptography.hazmat.primitives import hashes

    return CertificateInfo(
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        sha256=":".join(f"{byte:02X}" for byte in certificate.fingerprint(hashes.SHA256())),
    )


def _read_certificates(path: Path, key: str) -> list[Any]:
    from cryptography import x509

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsSetupError(f"[tls] {key} {path} cannot be read ({exc.strerror}); check the path") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise TlsSetupError(f"[tls] {key} {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return certificates


def _restrict(context: ssl.SSLContext, minimum_version: str) -> ssl.SSLContext:
    context.minimum_version = _VERSIONS[minimum_version]
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The context of the node's TLS port: its certificate, the peers' CA, mutual TLS when required."""
    assert tls.certificate is not None and tls.private_key is not None
    context = _restrict(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tls.minimum_version)
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
        if tls.ca_certificates is not None:
            context.load_verify_locations(cafile=str(tls.ca_certificates))
    except (ssl.SSLError, OSError) as exc:
        raise TlsSetupError(f"[tls] files cannot be loaded by OpenSSL: {exc}") from None
    if tls.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_certificates is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(destination: Destination, tls: TlsSettings) -> ssl.SSLContext:
    """The context for sending to a TLS destination: its certificate verified (and its host name).

    The destination's own files come first, then the node's ``[tls]`` ones; without any CA file the
    system's trust store verifies the destination.
    """
    context = _restrict(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), tls.minimum_version)
    ca_file = destination.ca_certificates or tls.ca_certificates
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    certificate = destination.certificate or tls.certificate
    private_key = destination.private_key or (tls.private_key if destination.certificate is None else None)
    if certificate is not None:
        context.load_cert_chain(certificate, private_key)
    return context


def check_destination_tls(settings: Settings) -> None:
    """Load every TLS destination's files now, so that a wrong path stops the start instead of every report."""
    for destination in settings.destinations:
        if not destination.tls:
            continue
        try:
            client_context(destination, settings.tls)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise TlsSetupError(
                f"destination {destination.name!r}: its TLS files cannot be loaded ({exc}); check ca_certificates, "
                "certificate and private_key there or in [tls]"
            ) from None


def peer_subject(sock: object) -> str | None:
    """The common name (or the whole subject) of the certificate a TLS peer presented, or None."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    certificate = sock.getpeercert()
    if not certificate:
        return None
    names = [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
    return names[0] if names else str(certificate.get("subject"))


HandshakeFailure = Callable[[str, str], None]
"""Called with the peer's IP address and the reason when a TLS handshake fails."""


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake in the connection's thread, under a timeout."""

    tls_context: ssl.SSLContext
    on_handshake_failure: HandshakeFailure

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: tuple[str, int] | str
    ) -> None:
        assert isinstance(request, socket.socket)
        peer_ip = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        timeout = request.gettimeout()
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        if not self._says_something(request, peer_ip):
            self.shutdown_request(request)
            return
        try:
            wrapped = self.tls_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.on_handshake_failure(peer_ip, _handshake_reason(exc))
            self.shutdown_request(request)
            return
        wrapped.settimeout(timeout)
        super().process_request_thread(wrapped, client_address)

    @staticmethod
    def _says_something(request: socket.socket, peer_ip: str) -> bool:
        """Whether the peer sent a first byte: a port check (connect, close) or a silent connection is no
        failed authentication, and is treated as on the plain port (not logged; dropped after the ARTIM
        timeout, logged), not as a security alert that monitoring would repeat every minute."""
        try:
            return bool(request.recv(1, socket.MSG_PEEK))
        except TimeoutError:
            log.info("connection.dropped peer_ip=%s tls=yes reason=%r", peer_ip,
                     f"no TLS ClientHello within {HANDSHAKE_TIMEOUT_S} s (ARTIM)")
            return False
        except OSError:  # reset by the peer
            return False


_HINTS = (
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "the peer sent no client certificate; require_client_certificate is on"),
    ("certificate has expired", "the peer's certificate has expired"),
    ("unable to get local issuer certificate", "the peer's certificate is not signed by [tls] ca_certificates"),
    ("self-signed certificate", "the peer's certificate is not signed by [tls] ca_certificates"),
    ("UNSUPPORTED_PROTOCOL", "the peer offers only TLS versions below [tls] minimum_version"),
    ("NO_PROTOCOLS_AVAILABLE", "the peer offers only TLS versions below [tls] minimum_version"),
    ("WRONG_VERSION_NUMBER", "not TLS: a plain-TCP peer on the TLS port, or an SSL/TLS version below 1.2"),
    ("UNEXPECTED_EOF", "the peer closed the connection during the handshake"),
    ("HTTP_REQUEST", "not TLS: an HTTP request on the DICOM TLS port"),
    ("NO_SHARED_CIPHER", "the peer offers none of the BCP 195 cipher suites"),
)
"""OpenSSL's words for a failed handshake, and what they mean to an administrator reading the log."""


def _handshake_reason(exc: BaseException) -> str:
    """What went wrong in a handshake, in OpenSSL's words where there are some."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"the TLS handshake did not complete within {HANDSHAKE_TIMEOUT_S} s"
    if isinstance(exc, ssl.SSLError):
        verify = getattr(exc, "verify_message", None)
        reason = str(exc.reason or exc)
        said = f"{reason}: {verify}" if verify else reason
        hint = next((text for marker, text in _HINTS if marker in said), None)
        return f"{said} ({hint})" if hint else said
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def start_tls_server(
    ae: AE,
    address: tuple[str, int],
    handlers: list[Any],
    context: ssl.SSLContext,
    on_handshake_failure: HandshakeFailure,
) -> TlsAssociationServer:
    """Start ``ae``'s TLS server on ``address`` in a thread of its own, as ``AE.start_server(block=False)`` does."""
    server = ae.make_server(address, evt_handlers=handlers, server_class=TlsAssociationServer)
    server.tls_context = context
    server.on_handshake_failure = on_handshake_failure
    thread = threading.Thread(target=server.serve_forever, name=f"TlsAcceptor@{address[1]}", daemon=True)
    thread.start()
    ae._servers.append(server)  # AssociationServer.shutdown() removes itself from this list
    return server
