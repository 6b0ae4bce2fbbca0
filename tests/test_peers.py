"""Who may associate: AE titles bound to addresses, a share of the associations per peer, silent and idle peers.

Real peers (pynetdicom SCUs and raw sockets) against a real node process.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from dicom_factory import write_study
from nodes import NODE_AE, NodeProcess, send, wait_until


def associate(node: NodeProcess, calling_ae: str) -> Association:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)


def refusal_lines(node: NodeProcess, peer_ae: str) -> list[str]:
    return [line for line in node.log().splitlines() if f"association.refused peer_ae={peer_ae} " in line]


def test_a_known_ae_title_from_an_address_not_listed_is_refused(make_node, tmp_path: Path) -> None:
    node = make_node(peers=[
        {"ae_title": "CT1", "hosts": ["10.9.9.0/24", "ct1.invalid"]},
        {"ae_title": "CT2", "hosts": ["10.1.2.3", "localhost"]},
    ])
    study = write_study(tmp_path / "study", slices=2)
    refused = associate(node, "CT1")
    assert refused.is_rejected
    # Rejected permanent, by the service user, calling AE title not recognised: the peer must not retry.
    assert (refused.acceptor.primitive.result, refused.acceptor.primitive.result_source,
            refused.acceptor.primitive.diagnostic) == (1, 1, 3)
    [line] = wait_until(lambda: refusal_lines(node, "CT1"), 10, "CT1's refusal in the log")
    assert "peer_ip=127.0.0.1" in line and "CT1 is bound to 10.9.9.0/24, ct1.invalid; it came from 127.0.0.1" in line
    assert "peer.unresolved host=ct1.invalid" in node.log(), "a host name that does not resolve is said so"
    # A name that resolves to the peer's address lets it in; an AE title not listed falls under
    # allowed_calling_aets, empty here: any.
    other = write_study(tmp_path / "other", slices=2)
    assert send(node.port, study.files, calling_ae="CT2") == [0, 0]
    assert send(node.port, other.files, calling_ae="MODALITY9") == [0, 0]
    assert node.wait_for_state(study.study_uid, "queued")["calling_aets"] == ["CT2"]
    assert node.wait_for_state(other.study_uid, "queued")["calling_aets"] == ["MODALITY9"]


def test_allowed_calling_aets_still_applies_to_titles_not_listed_as_peers(make_node) -> None:
    node = make_node(allowed_calling_aets=["PROBE", "PACS"], peers=[{"ae_title": "CT2", "hosts": ["127.0.0.0/8"]}])
    for title in ("PACS", "CT2"):
        association = associate(node, title)
        assert association.is_established, title
        association.release()
    stranger = associate(node, "STRANGER")
    assert stranger.is_rejected
    [line] = wait_until(lambda: refusal_lines(node, "STRANGER"), 10, "the stranger's refusal")
    assert "calling AE title not in allowed_calling_aets" in line


def test_one_peer_cannot_take_every_association(make_node) -> None:
    node = make_node(max_associations=6, max_associations_per_peer=2,
                     peers=[{"ae_title": "CT2", "hosts": ["127.0.0.1"], "max_associations": 3}])
    held = [associate(node, "FLOODER") for _ in range(2)]
    assert all(a.is_established for a in held)
    third = associate(node, "FLOODER")
    assert third.is_rejected
    # Transient, by the service provider (presentation), local limit exceeded: the peer may retry later.
    assert (third.acceptor.primitive.result, third.acceptor.primitive.result_source,
            third.acceptor.primitive.diagnostic) == (2, 3, 2)
    [line] = wait_until(lambda: refusal_lines(node, "FLOODER"), 10, "the flooder's refusal")
    assert "2 associations of FLOODER open, its limit is 2" in line
    ct2 = [associate(node, "CT2") for _ in range(3)]
    assert all(a.is_established for a in ct2), "a peer's own max_associations overrides the default"
    assert associate(node, "CT2").is_rejected
    for association in held + ct2:
        association.release()
    again = associate(node, "FLOODER")
    assert again.is_established, "released associations free the peer's share"
    again.release()


def test_silent_connections_and_idle_associations_are_ended_and_logged(make_node) -> None:
    node = make_node(network_timeout_s=2)
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as silent:
        line = wait_until(lambda: [x for x in node.log().splitlines() if "connection.dropped" in x], 15,
                          f"the silent connection's line; log:\n{node.log()}")[0]
        assert "peer_ip=127.0.0.1" in line and "no A-ASSOCIATE-RQ within 5 s (ARTIM)" in line
        assert silent.recv(1) == b"", "the node closed the connection"
    idle = associate(node, "IDLER")
    assert idle.is_established
    started = time.monotonic()
    wait_until(lambda: idle.is_aborted or not idle.is_alive(), 15, "the idle association to be ended")
    assert time.monotonic() - started < 10
    line = wait_until(lambda: [x for x in node.log().splitlines() if "association.timed_out peer_ae=IDLER" in x],
                      10, f"the idle association's line; log:\n{node.log()}")[0]
    assert "idle_s=2 (network_timeout_s)" in line
