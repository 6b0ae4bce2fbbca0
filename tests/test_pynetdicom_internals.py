"""What the node relies on inside pynetdicom is still there: an upgrade that moves it fails here, loudly.

Each check names the attribute :mod:`triagenode.daemon.pynetdicom_internals`
touches; the behaviour itself is tested end to end elsewhere (full disk,
port checks, stops, malformed traffic).
"""

from __future__ import annotations

import inspect

import pynetdicom
from pynetdicom import AE, _config, dimse_messages
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.timer import Timer
from pynetdicom.transport import AssociationSocket


def test_the_pynetdicom_version_is_one_the_node_was_checked_against() -> None:
    major = int(pynetdicom.__version__.split(".")[0])
    assert major == 3, f"pynetdicom {pynetdicom.__version__}: re-check daemon/pynetdicom_internals.py, then this test"


def test_chunked_receive_opens_its_file_through_the_module_name_the_node_replaces() -> None:
    assert hasattr(_config, "STORE_RECV_CHUNKED_DATASET")
    assert hasattr(dimse_messages, "NamedTemporaryFile")
    decode = inspect.getsource(DIMSEMessage.decode_msg)
    assert "NamedTemporaryFile(" in decode, "the data set file is no longer opened through that name"
    assert "_data_set_file.write(" in decode and "_data_set_file.file.flush()" in decode, "the file's use changed"
    to_primitive = inspect.getsource(DIMSEMessage.message_to_primitive)
    assert "_dataset_file = self._data_set_file" in to_primitive, "the request no longer carries the file"
    assert "_data_set_file" in vars(C_STORE_RQ()), "a DIMSE message no longer holds its data set file"


def test_association_internals_the_receiver_uses_are_there() -> None:
    association = Association(AE(), "acceptor")
    assert association.dimse.message is None, "a DIMSE message in progress is no longer the provider's 'message'"
    dul = association.dul
    assert isinstance(dul, DULServiceProvider)
    assert isinstance(dul._idle_timer, Timer) and callable(dul._idle_timer.restart)
    assert hasattr(dul, "to_user_queue") and callable(dul.to_user_queue.put)
    assert association.requestor.primitive is None, "the A-ASSOCIATE-RQ is no longer the requestor's 'primitive'"
    assert callable(association.acse.send_reject) and callable(association.kill)
    assert "def recv(self, nr_bytes" in inspect.getsource(AssociationSocket), "the socket wrapper's recv changed"
    read_pdu = inspect.getsource(DULServiceProvider._read_pdu_data)
    assert "self.socket.recv(6)" in read_pdu, "a PDU's header is no longer read apart from its body"
    assert "self.socket.recv(pdu_length)" in read_pdu, "a PDU's body is no longer read in one recv"
    run = inspect.getsource(Association.run_reactor)
    assert "receive_pdu(wait=True, timeout=self.acse_timeout)" in run, "the wait for the request changed"
    assert "if primitive is None:" in run, "an empty item no longer reads as 'timed out waiting for the request'"
