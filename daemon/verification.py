"""C-ECHO as an SCU: ``triagenode echo`` checks that a peer answers before reports go there."""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from triagenode.config.values import SettingError, check_ae_title, check_port


class EchoError(RuntimeError):
    """The peer did not answer a C-ECHO with Success; the text says how it failed."""


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_peer(text: str) -> Peer:
    """``AE@HOST:PORT`` -> :class:`Peer`; ValueError names what is wrong."""
    ae_title, at, address = text.partition("@")
    host, colon, port_text = address.rpartition(":")
    if not at or not colon or not host or not port_text.isdigit():
        raise ValueError(f"{text!r} is not AE@HOST:PORT (e.g. PACS@10.0.0.5:104)")
    try:
        check_ae_title("AE", ae_title)
        check_port("PORT", int(port_text))
    except SettingError as exc:
        raise ValueError(f"{text!r}: {exc.message}") from None
    return Peer(ae_title, host.strip("[]"), int(port_text))


def verify(peer: Peer, calling_ae: str, timeout_s: float, tls: ssl.SSLContext | None = None) -> float:
    """Associate (over TLS with ``tls``), C-ECHO, release; returns the seconds from connect to the echo's answer."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    started = time.perf_counter()
    tls_args = (tls, peer.host) if tls is not None else None
    association = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    if association.is_rejected:
        raise EchoError("association rejected (check the called and calling AE titles on both sides)")
    if not association.is_established:
        if tls is not None:
            raise EchoError("no association over TLS (is it the peer's TLS port? is its certificate signed by "
                            "[tls] ca_certificates and issued for that host name? does it accept the node's?)")
        raise EchoError("no association (is the peer listening on that host and port? a firewall?)")
    try:
        status = association.send_c_echo()
        elapsed = time.perf_counter() - started
    finally:
        association.release()
    if not status or "Status" not in status:
        raise EchoError("no answer to the C-ECHO (timeout or aborted association)")
    if status.Status != 0x0000:
        raise EchoError(f"status 0x{status.Status:04X}")
    return elapsed
