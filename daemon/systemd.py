"""Telling systemd how the service is doing (``Type=notify``), without a dependency.

The protocol is one datagram of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``;
outside systemd the variable is unset and these calls do nothing.
"""

from __future__ import annotations

import os
import socket


def notify(*states: str) -> bool:
    """Send states such as ``READY=1`` or ``STATUS=...``; True when systemd got them."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
        except OSError:
            return False
    return True
