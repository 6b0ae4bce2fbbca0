"""Report destinations for the tests: real DICOM peers on loopback, and a peer that hangs."""

from __future__ import annotations

import socket
import threading
import time

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    MammographyCADSRStorage,
    SegmentationStorage,
)


class RecordingPacs:
    """A destination (pynetdicom Storage SCP) that keeps every dataset it receives, with its arrival time.

    ``sr_classes`` are the SR classes it accepts (an archive that refuses 3D SR accepts only
    Comprehensive SR); by default the two Comprehensive classes, Mammography CAD SR and Segmentation.
    """

    def __init__(
        self,
        port: int,
        ae_title: str = "PACS",
        sr_classes: tuple[str, ...] = (
            Comprehensive3DSRStorage, ComprehensiveSRStorage, MammographyCADSRStorage, SegmentationStorage
        ),
    ) -> None:
        self.port, self.ae_title, self.sr_classes = port, ae_title, sr_classes
        self.received: list[Dataset] = []
        self.arrived_at: list[float] = []
        self._lock = threading.Lock()
        self._server = None

    def start(self) -> RecordingPacs:
        ae = AE(ae_title=self.ae_title)
        for sop_class in self.sr_classes:
            ae.add_supported_context(sop_class)

        def on_store(event: evt.Event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            with self._lock:
                self.received.append(ds)
                self.arrived_at.append(time.monotonic())
            return 0x0000

        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        return self

    def study_uids(self) -> list[str]:
        with self._lock:
            return [str(ds.StudyInstanceUID) for ds in self.received]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class HangingPeer:
    """A TCP listener that accepts connections and never answers: a destination that hangs.

    A DICOM peer stuck this way costs its caller the whole ACSE timeout per
    attempt. :meth:`stop` closes everything, so waiting callers fail at once
    and the port is free again.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted = 0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(16)
        self._connections: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> HangingPeer:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(connection)
            self.accepted += 1

    def stop(self) -> None:
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for connection in self._connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()
        self._thread.join(5)
