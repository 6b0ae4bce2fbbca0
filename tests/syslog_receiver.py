"""A real syslog receiver for tests: an audit record repository on a free loopback port.

UDP (RFC 5426: one message per datagram) or TLS (RFC 5425: octet-counted
frames, ``LEN SP MSG``, on a TLS connection, optionally requiring a client
certificate). It collects every message, parses its RFC 5424 header and
gives the MSG back (the BOM removed), so a test can check what an audit
source sends without mocking anything::

    with SyslogReceiver("tls", certificate=server.certificate, private_key=server.private_key,
                        client_ca=ca.certificate) as repository:
        ...  # point the node at repository.address ("127.0.0.1:PORT")
        [message] = repository.wait_for(1)
        assert message.msgid == "IHE+RFC-3881"
        etree.fromstring(message.xml)

A TLS handshake that fails (a client that does not trust the receiver's
certificate, or one without a certificate when ``client_ca`` is given) is
recorded in :attr:`SyslogReceiver.handshake_failures`; nothing from it is
collected.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

BOM = b"\xef\xbb\xbf"
_HEADER = re.compile(
    rb"<(?P<pri>\d{1,3})>(?P<version>\d{1,2}) (?P<timestamp>\S+) (?P<hostname>\S+) (?P<app>\S+) "
    rb"(?P<procid>\S+) (?P<msgid>\S+) ",
    re.DOTALL,
)


class SyslogParseError(ValueError):
    """Bytes that are not an RFC 5424 message."""


@dataclass(frozen=True)
class SyslogMessage:
    """One RFC 5424 message as received."""

    pri: int
    version: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    msg: bytes
    """The MSG part as sent, BOM included when there was one."""
    raw: bytes
    peer_certificate: dict | None = None
    """The client's certificate as ``ssl`` shows it (TLS with a client certificate), else None."""

    @property
    def facility(self) -> int:
        return self.pri // 8

    @property
    def severity(self) -> int:
        return self.pri % 8

    @property
    def has_bom(self) -> bool:
        return self.msg.startswith(BOM)

    @property
    def xml(self) -> str:
        """The MSG as text: UTF-8, without the BOM."""
        return (self.msg[len(BOM):] if self.has_bom else self.msg).decode("utf-8")


def parse_rfc5424(raw: bytes) -> SyslogMessage:
    """Split an RFC 5424 message into its header fields, structured data and MSG."""
    match = _HEADER.match(raw)
    if match is None:
        raise SyslogParseError(f"not an RFC 5424 header: {raw[:80]!r}")
    rest = raw[match.end():]
    structured, rest = _structured_data(rest)
    if rest.startswith(b" "):
        rest = rest[1:]
    elif rest:
        raise SyslogParseError(f"no space after the structured data: {raw[:120]!r}")
    return SyslogMessage(
        pri=int(match["pri"]),
        version=int(match["version"]),
        timestamp=match["timestamp"].decode("ascii"),
        hostname=match["hostname"].decode("ascii"),
        app_name=match["app"].decode("ascii"),
        procid=match["procid"].decode("ascii"),
        msgid=match["msgid"].decode("ascii"),
        structured_data=structured.decode("utf-8"),
        msg=rest,
        raw=raw,
    )


def _structured_data(data: bytes) -> tuple[bytes, bytes]:
    """``-`` or one or more ``[...]`` elements (``\\]`` escapes a bracket inside a value); and what follows."""
    if data.startswith(b"-"):
        return b"-", data[1:]
    end, escaped, inside = 0, False, False
    while end < len(data):
        byte = data[end:end + 1]
        if not inside:
            if byte != b"[":
                break
            inside = True
        elif escaped:
            escaped = False
        elif byte == b"\\":
            escaped = True
        elif byte == b"]":
            inside = False
        end += 1
    if end == 0 or inside:
        raise SyslogParseError(f"bad structured data: {data[:80]!r}")
    return data[:end], data[end:]


class SyslogReceiver:
    """A syslog receiver on ``127.0.0.1``: ``protocol`` "udp" (RFC 5426) or "tls" (RFC 5425)."""

    def __init__(
        self,
        protocol: str = "udp",
        *,
        certificate: Path | None = None,
        private_key: Path | None = None,
        client_ca: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """For TLS, ``certificate``/``private_key`` are the receiver's; with ``client_ca`` the client must present
        a certificate that chains to it. ``port`` 0 takes a free one (:attr:`port` says which)."""
        if protocol not in ("udp", "tls"):
            raise ValueError(f"protocol {protocol!r}: use udp or tls")
        if protocol == "tls" and (certificate is None or private_key is None):
            raise ValueError("a TLS receiver needs certificate and private_key")
        self.protocol, self.host = protocol, host
        self._certificate, self._private_key, self._client_ca = certificate, private_key, client_ca
        self._messages: list[SyslogMessage] = []
        self._errors: list[str] = []
        self._handshake_failures: list[str] = []
        self._connections = 0
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socket: socket.socket | None = None
        self.port = port

    # -- life cycle ------------------------------------------------------------------------------------------

    def start(self) -> SyslogReceiver:
        kind = socket.SOCK_DGRAM if self.protocol == "udp" else socket.SOCK_STREAM
        sock = socket.socket(socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.settimeout(0.1)
        if self.protocol == "udp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            target = self._serve_udp
        else:
            sock.listen(16)
            target = self._serve_tls
        self._socket, self.port = sock, sock.getsockname()[1]
        self._spawn(target, f"syslog-{self.protocol}")
        return self

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(5)
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> SyslogReceiver:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # -- what it got -----------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port``, as ``[audit] syslog`` takes it."""
        return f"{self.host}:{self.port}"

    @property
    def messages(self) -> list[SyslogMessage]:
        with self._changed:
            return list(self._messages)

    @property
    def errors(self) -> list[str]:
        """Bytes that arrived but were not a message (bad framing, bad header)."""
        with self._changed:
            return list(self._errors)

    @property
    def handshake_failures(self) -> list[str]:
        with self._changed:
            return list(self._handshake_failures)

    @property
    def connections(self) -> int:
        """TLS connections accepted (a handshake may have failed on them)."""
        with self._changed:
            return self._connections

    def wait_for(self, count: int, timeout: float = 5.0) -> list[SyslogMessage]:
        """The first ``count`` messages once they are in; AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{len(self._messages)} of {count} syslog messages within {timeout:g} s; errors: "
                        f"{self._errors}, handshake failures: {self._handshake_failures}"
                    )
                self._changed.wait(left)
            return list(self._messages[:count])

    def wait_for_handshake_failure(self, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self._handshake_failures:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no failed TLS handshake within {timeout:g} s")
                self._changed.wait(left)
            return list(self._handshake_failures)

    # -- serving ---------------------------------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _collect(self, raw: bytes, certificate: dict | None = None) -> None:
        try:
            message = parse_rfc5424(raw)
        except SyslogParseError as exc:
            with self._changed:
                self._errors.append(str(exc))
                self._changed.notify_all()
            return
        if certificate is not None:
            message = SyslogMessage(**{**message.__dict__, "peer_certificate": certificate})
        with self._changed:
            self._messages.append(message)
            self._changed.notify_all()

    def _serve_udp(self) -> None:
        assert self._socket is not None
        while not self._stopping.is_set():
            try:
                datagram, _ = self._socket.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self._collect(datagram)

    def _serve_tls(self) -> None:
        assert self._socket is not None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self._certificate), str(self._private_key))
        if self._client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=str(self._client_ca))
        while not self._stopping.is_set():
            try:
                connection, peer = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._changed:
                self._connections += 1
            self._spawn(self._serve_connection, f"syslog-tls-{peer[1]}", connection, context)

    def _serve_connection(self, connection: socket.socket, context: ssl.SSLContext) -> None:
        """Handshake, then read ``LEN SP MSG`` frames until the client closes or the receiver stops."""
        connection.settimeout(5)
        try:
            tls = context.wrap_socket(connection, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            connection.close()
            with self._changed:
                self._handshake_failures.append(f"{type(exc).__name__}: {exc}")
                self._changed.notify_all()
            return
        certificate = tls.getpeercert() or None
        tls.settimeout(0.1)
        buffer = b""
        with tls:
            while not self._stopping.is_set():
                try:
                    chunk = tls.recv(65536)
                except TimeoutError:
                    continue
                except (ssl.SSLError, OSError):
                    return
                if not chunk:
                    return
                buffer += chunk
                buffer = self._frames(buffer, certificate)

    def _frames(self, buffer: bytes, certificate: dict | None) -> bytes:
        """Collect every complete octet-counted frame in ``buffer``; return what is left (a partial frame)."""
        while True:
            space = buffer.find(b" ")
            if space < 0:
                return buffer
            length = buffer[:space]
            if not length.isdigit() or length.startswith(b"0"):
                with self._changed:
                    self._errors.append(f"bad octet count {buffer[:20]!r}")
                    self._changed.notify_all()
                return b""
            end = space + 1 + int(length)
            if len(buffer) < end:
                return buffer
            self._collect(buffer[space + 1:end], certificate)
            buffer = buffer[end:]
