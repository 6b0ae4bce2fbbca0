"""Every pynetdicom internal the node relies on, in one place, each named for what the node needs.

pynetdicom's public API has no hook for what a node that must not lie needs:
stream a data set into a file the node controls, see a data set still
arriving, read a PDU's header before pynetdicom reads the PDU, wake an
association waiting for its request, stop the idle timer counting the
node's own work. The node reaches into pynetdicom for these, and only here;
``tests/test_pynetdicom_internals.py`` checks each attribute this module
touches, so that an upgrade which moves one fails there, loudly, instead of
quietly turning a refusal into a dropped connection.

Checked against pynetdicom 3.0 (pyproject pins ``<4``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pynetdicom import _config, dimse_messages
from pynetdicom.association import Association


class Transport(Protocol):
    """What the node uses of pynetdicom's ``AssociationSocket``."""

    socket: Any

    def recv(self, nr_bytes: int) -> bytearray: ...


def stream_data_sets_into(open_file: Callable[[], Any]) -> None:
    """Make pynetdicom write every incoming C-STORE data set, as it arrives, into ``open_file()``.

    pynetdicom opens that file through the ``NamedTemporaryFile`` name of its
    ``dimse_messages`` module when ``STORE_RECV_CHUNKED_DATASET`` is on; the
    object must offer ``name``, ``write``, ``file.flush()`` and ``close``.
    One receiver runs per process, so replacing the name is the hook.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True

    def named_temporary_file(*_args: Any, **_kwargs: Any) -> Any:
        return open_file()

    dimse_messages.NamedTemporaryFile = named_temporary_file  # type: ignore[assignment]


def data_set_file_of(request: Any) -> Any:
    """The file object a C-STORE request's data set was streamed into (what ``open_file`` returned), or None."""
    return getattr(request, "_dataset_file", None)


def partial_data_set_file(association: Association) -> Any:
    """The file of a data set still arriving on ``association``, or None.

    pynetdicom resets its DIMSE message once a data set is complete, so a
    file still attached to it belongs to a data set cut short.
    """
    message = getattr(getattr(association, "dimse", None), "message", None)
    return getattr(message, "_data_set_file", None)


def message_in_progress(association: Association) -> bool:
    """Whether a DIMSE message (a command or its data set) is partly received on ``association``."""
    return getattr(getattr(association, "dimse", None), "message", None) is not None


def transport_of(association: Association) -> Transport | None:
    """The association's socket wrapper, whose ``recv`` the node may wrap to read PDU headers first."""
    return association.dul.socket  # type: ignore[no-any-return]


A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
"""PDU types (PS3.8 9.3.1)."""

PduHeaderCheck = Callable[[int, int], None]
"""Called with a PDU's type and length before its body is read; raises to refuse the connection."""
RequestRewrite = Callable[[bytearray], bytearray]
"""Given an A-ASSOCIATE-RQ's body before pynetdicom parses it; returns the body to parse, or raises."""


def watch_pdus(association: Association, on_header: PduHeaderCheck, on_request: RequestRewrite) -> bool:
    """Let the node see each PDU's header, and an A-ASSOCIATE-RQ's body, before pynetdicom reads them.

    pynetdicom's DUL reads a PDU as ``recv(6)`` for the header, then
    ``recv(length)`` for the body, whatever length the header claims; the node
    wraps the association socket's ``recv`` to look in between. False when
    the association has no socket (nothing to watch).
    """
    transport = transport_of(association)
    if transport is None:
        return False
    receive = transport.recv
    next_is_request = False

    def recv(nr_bytes: int) -> bytearray:
        nonlocal next_is_request
        data = receive(nr_bytes)
        if next_is_request:
            next_is_request = False
            return on_request(data)
        if nr_bytes == 6 and len(data) == 6:
            pdu_type, length = data[0], int.from_bytes(data[2:6], "big")
            next_is_request = pdu_type == A_ASSOCIATE_RQ
            on_header(pdu_type, length)
        return data

    transport.recv = recv  # type: ignore[method-assign]
    return True


def send_raw_pdu(association: Association, pdu: bytes) -> None:
    """Write ``pdu`` straight to the association's socket, outside pynetdicom's state machine.

    For a refusal decided in :func:`watch_pdus`, before pynetdicom has read the
    PDU it would answer; the caller then ends the connection by raising.
    """
    transport = transport_of(association)
    if transport is not None and transport.socket is not None:
        transport.socket.sendall(pdu)


def has_request(association: Association) -> bool:
    """Whether the peer has sent its A-ASSOCIATE-RQ yet."""
    return association.requestor.primitive is not None


def wake_for_no_request(association: Association) -> None:
    """End the wait of an acceptor's thread for an A-ASSOCIATE-RQ that will not come.

    pynetdicom's acceptor waits up to its ACSE timeout on the DUL's queue; an
    empty item reads as "timed out", and the thread then ends the association.
    """
    association.dul.to_user_queue.put(None)


def close_before_request(association: Association) -> None:
    """Close a connection that has not sent its request (a silent port check) and wake its thread."""
    transport = association.dul.socket
    if transport is not None:
        transport.close()
    wake_for_no_request(association)


def reject(association: Association, result: int, source: int, diagnostic: int) -> None:
    """Send an A-ASSOCIATE-RJ from an ``EVT_REQUESTED`` handler and wait until it has left.

    Without the wait (pynetdicom's own rejections do the same) the socket
    closes at once and the peer sees a dropped connection instead.
    """
    association.acse.send_reject(result, source, diagnostic)
    association.kill()


def restart_idle_timer(association: Association) -> None:
    """Start ``network_timeout`` afresh: the time a handler spent is the node's, not the peer's silence.

    The handler runs in the association's reactor thread, which checks the
    idle timer only between messages; restarting it as the handler returns
    is enough.
    """
    association.dul._idle_timer.restart()
