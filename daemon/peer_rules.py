"""Who may associate: ``[[peers]]`` bind a calling AE title to the addresses it may come from.

An AE title is a name any sender can type, so a firewall rule used to be the
only thing between a laptop calling itself ``CT1`` and the node. A
``[[peers]]`` entry lists where CT1 really is (addresses, networks, host
names); CT1 from anywhere else is refused and audited as a security alert.
AE titles not listed fall under ``[node] allowed_calling_aets`` as before
(empty: any). Each peer also gets a share of the associations
(``max_associations_per_peer`` or its own ``max_associations``), so one sender
opening connections in a loop cannot take every slot.

Host names are resolved when a peer associates and the answer is kept for
``RESOLVE_TTL_S``: a scanner's DHCP lease may change, and an association per
study is rare enough that resolving more often would cost nothing either.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass

from triagenode.config.settings import Peer, Settings

log = logging.getLogger("triagenode.receiver")

RESOLVE_TTL_S = 60.0
"""How long a host name's addresses are reused before they are resolved again."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class PeerVerdict:
    """Whether a peer may associate; when not, why (logged, audited) and whether it is a security matter."""

    allowed: bool
    reason: str = ""
    security: bool = False
    """An AE title from the wrong address, or without TLS where TLS is required: audited as a security alert."""


ALLOWED = PeerVerdict(True)


class PeerRules:
    """The ``[[peers]]`` of a configuration, with their addresses ready to match."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._default_limit = settings.node.max_associations_per_peer
        self._networks: dict[str, list[Network]] = {}
        self._names: dict[str, list[str]] = {}
        for peer in settings.peers:
            title = peer.ae_title.strip()
            self._networks[title], self._names[title] = _split_hosts(peer)
        self._resolved: dict[str, tuple[float, set[str]]] = {}
        self._lock = threading.Lock()

    def allowed_calling_aets(self) -> list[str]:
        """What pynetdicom's own check gets: ``allowed_calling_aets`` plus the peers, or nothing (any) when empty."""
        allowed = list(self._settings.node.allowed_calling_aets)
        if not allowed:
            return []
        return allowed + [peer.ae_title for peer in self._settings.peers if peer.ae_title not in allowed]

    def limit(self, ae_title: str) -> int:
        """Associations this calling AE title may hold at once."""
        peer = self._settings.peer(ae_title)
        if peer is not None and peer.max_associations is not None:
            return peer.max_associations
        return self._default_limit

    def check(self, ae_title: str, address: str, over_tls: bool, certificate: str | None = None) -> PeerVerdict:
        """Whether ``ae_title`` may associate from ``address`` (on the TLS port or not, showing the
        certificate with common name ``certificate``)."""
        title = ae_title.strip()
        peer = self._settings.peer(title)
        if peer is None:
            return ALLOWED  # allowed_calling_aets decides, in pynetdicom's own check
        if (peer.require_tls or peer.certificate_names) and not over_tls:
            return PeerVerdict(False, f"{title} must use the TLS port ([[peers]] require_tls)", security=True)
        if peer.certificate_names and certificate not in peer.certificate_names:
            names = ", ".join(peer.certificate_names)
            return PeerVerdict(False, f"{title} must show a certificate for {names}; it showed "
                                      f"{certificate or 'none'}", security=True)
        if not self._matches(title, address):
            hosts = ", ".join(peer.hosts)
            return PeerVerdict(False, f"{title} is bound to {hosts}; it came from {address}", security=True)
        return ALLOWED

    def _matches(self, title: str, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:10.1.2.3 on a dual-stack socket
            ip = ip.ipv4_mapped
        if any(ip in network for network in self._networks[title]):
            return True
        return any(str(ip) in self._addresses_of(name) for name in self._names[title])

    def _addresses_of(self, name: str) -> set[str]:
        now = time.monotonic()
        with self._lock:
            cached = self._resolved.get(name)
        if cached is not None and now - cached[0] < RESOLVE_TTL_S:
            return cached[1]
        try:
            addresses = {str(info[4][0]) for info in socket.getaddrinfo(name, None)}
        except (OSError, UnicodeError, ValueError) as exc:
            log.warning("peer.unresolved host=%s error=%r: the peer's associations from it are refused until it "
                        "resolves; check DNS or list its address in [[peers]] hosts", name, str(exc))
            addresses = set()
        with self._lock:
            self._resolved[name] = (now, addresses)
        return addresses


def _split_hosts(peer: Peer) -> tuple[list[Network], list[str]]:
    """A peer's hosts as networks (addresses are /32 or /128) and host names to resolve."""
    networks: list[Network] = []
    names: list[str] = []
    for host in peer.hosts:
        try:
            networks.append(ipaddress.ip_network(host, strict=False))
        except ValueError:
            names.append(host)
    return networks, names
