"""DICOM TLS against real peers: DCMTK's storescu/echoscu/storescp with +tls, Python's ssl, and Orthanc.

A CA and its certificates are made in each test (tests/pki.py). What a
hospital's security review asks is tried here as it would be: a sender with
a good client certificate gets in; one without a certificate, with an
expired one, with one from another CA, speaking plain TCP to the TLS port,
or offering TLS 1.0/1.1 only is refused at the handshake, logged with its
address and audited; reports go out over TLS with the destination verified.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_factory import write_study
from nodes import NODE_AE, NodeProcess, free_port, wait_until
from orthanc import Orthanc
from pki import Issued, TestCA

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    """A CA with a server certificate for the node, a client certificate, an expired one, and another CA's."""
    ca = TestCA(tmp_path / "pki")
    other = TestCA(tmp_path / "other-pki", name="Somebody Else's CA")
    return {
        "ca": ca,
        "node": ca.issue("localhost"),
        "client": ca.issue("CT1"),
        "expired": ca.issue("OLDCT", expired=True),
        "foreign": other.issue("INTRUDER"),
        "other_ca": other,
    }


def tls_settings(pki: dict[str, Any], **extra: Any) -> dict[str, Any]:
    node: Issued = pki["node"]
    return {
        "port": free_port(),
        "certificate": str(node.certificate),
        "private_key": str(node.private_key),
        "ca_certificates": str(pki["ca"].certificate),
        **extra,
    }


def tls_node(make_node: Any, pki: dict[str, Any], **settings: Any) -> NodeProcess:
    return make_node(tls=tls_settings(pki, **settings.pop("tls", {})), **settings)


def dcmtk_tls(tool: str, identity: Issued | None, ca: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool over TLS (``+tls key cert``, or ``+tla`` without a certificate)."""
    who = ["+tls", str(identity.private_key), str(identity.certificate), "-pw"] if identity else ["+tla"]
    command = [tool, *who, "+cf", str(ca), "-aec", NODE_AE, "-to", "10", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=DCMTK_ENV)


def refusals(node: NodeProcess) -> list[str]:
    return [line for line in node.log().splitlines() if "tls.refused" in line]


def test_dcmtk_stores_and_echoes_over_mutual_tls(make_node, pki, tmp_path: Path) -> None:
    node = tls_node(make_node, pki)
    study = write_study(tmp_path / "study", slices=3)
    files = [str(path) for path in study.files]
    echo = dcmtk_tls("echoscu", pki["client"], pki["ca"].certificate, "-aet", "CT1", "127.0.0.1", str(node.tls_port))
    assert echo.returncode == 0, echo.stderr
    sent = dcmtk_tls("storescu", pki["client"], pki["ca"].certificate, "-aet", "CT1", "127.0.0.1",
                     str(node.tls_port), *files)
    assert sent.returncode == 0, sent.stderr
    details = node.wait_for_state(study.study_uid, "queued", timeout=20)
    assert details["instances"] == 3 and details["calling_aets"] == ["CT1"]
    line = wait_until(lambda: [x for x in node.log().splitlines() if "association.closed peer_ae=CT1" in x
                               and "instances=3" in x], 10, "the association's closing line")[0]
    assert "tls=yes" in line and "peer_certificate='CT1'" in line
    assert not refusals(node)


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        ("none", "the peer sent no client certificate"),  # +tla: TLS without a certificate
        ("expired", "the peer's certificate has expired"),
        ("foreign", "the peer's certificate is not signed by [tls] ca_certificates"),
    ],
)
def test_a_peer_without_a_valid_certificate_is_refused_at_the_handshake(
    make_node, pki, tmp_path: Path, identity: str, expected: str
) -> None:
    node = tls_node(make_node, pki)
    study = write_study(tmp_path / "study", slices=1)
    who = None if identity == "none" else pki[identity]
    sent = dcmtk_tls("storescu", who, pki["ca"].certificate, "-aet", "CT1", "127.0.0.1", str(node.tls_port),
                     str(study.files[0]))
    assert sent.returncode != 0
    [line] = wait_until(lambda: refusals(node), 10, f"a tls.refused line; log:\n{node.log()}")
    assert "peer_ip=127.0.0.1" in line and expected in line, line
    assert node.study(study.study_uid) is None, "nothing of a refused peer is stored"


def test_a_plain_tcp_sender_on_the_tls_port_is_refused(make_node, pki, tmp_path: Path) -> None:
    node = tls_node(make_node, pki)
    study = write_study(tmp_path / "study", slices=1)
    sent = subprocess.run(["storescu", "-aec", NODE_AE, "-to", "10", "127.0.0.1", str(node.tls_port),
                           str(study.files[0])], capture_output=True, text=True, timeout=60, env=DCMTK_ENV)
    assert sent.returncode != 0
    [line] = wait_until(lambda: refusals(node), 10, f"a tls.refused line; log:\n{node.log()}")
    assert "peer_ip=127.0.0.1" in line and "not TLS" in line, line
    # And the plain port still takes the same file: TLS is beside it, not instead of it.
    plain = subprocess.run(["storescu", "-aec", NODE_AE, "127.0.0.1", str(node.port), str(study.files[0])],
                           capture_output=True, text=True, timeout=60, env=DCMTK_ENV)
    assert plain.returncode == 0, plain.stderr


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_1_0_and_1_1_are_refused(make_node, pki, version: ssl.TLSVersion) -> None:
    node = tls_node(make_node, pki)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.minimum_version = context.maximum_version = version
    context.load_cert_chain(pki["client"].certificate, pki["client"].private_key)
    with socket.create_connection(("127.0.0.1", node.tls_port), timeout=10) as raw, pytest.raises(ssl.SSLError):
        with context.wrap_socket(raw) as tls:
            tls.recv(1)
    [line] = wait_until(lambda: refusals(node), 10, f"a tls.refused line; log:\n{node.log()}")
    assert "the peer offers only TLS versions below [tls] minimum_version" in line, line


def test_a_silent_connection_on_the_tls_port_does_not_hold_up_other_peers(make_node, pki, tmp_path: Path) -> None:
    """pynetdicom would do the handshake in its accept loop: one silent peer would stop every other one."""
    node = tls_node(make_node, pki)
    study = write_study(tmp_path / "study", slices=1)
    with socket.create_connection(("127.0.0.1", node.tls_port), timeout=10):
        started = time.monotonic()
        sent = dcmtk_tls("storescu", pki["client"], pki["ca"].certificate, "-aet", "CT1", "127.0.0.1",
                         str(node.tls_port), str(study.files[0]))
        assert sent.returncode == 0, sent.stderr
        assert time.monotonic() - started < 4, "the silent connection held the accept loop"
        [line] = wait_until(lambda: [x for x in node.log().splitlines() if "connection.dropped" in x], 15,
                            f"the silent connection's line; log:\n{node.log()}")
    assert "tls=yes" in line and "no TLS ClientHello within 5 s (ARTIM)" in line
    # A port check (connect, close) is neither a refusal nor a security alert: monitoring does it every minute.
    socket.create_connection(("127.0.0.1", node.tls_port), timeout=10).close()
    time.sleep(0.5)
    assert not refusals(node)
    assert "110113" not in "".join(path.read_text() for path in (node.data_dir / "audit").glob("*.log"))


def test_the_node_refuses_to_start_on_unsafe_or_broken_tls_files(make_node, pki) -> None:
    ca: TestCA = pki["ca"]
    loose = ca.issue("loose")
    os.chmod(loose.private_key, 0o644)
    node = make_node("loose", start=False, tls=tls_settings(pki, private_key=str(loose.private_key),
                                                            certificate=str(loose.certificate)))
    assert "can be read or changed by others than the service user (mode 0644" in node.refused_start()
    assert "chmod 0640" in node.refused_start()

    other = ca.issue("other")
    node = make_node("mismatch", start=False, tls=tls_settings(pki, private_key=str(other.private_key)))
    assert "does not match private_key" in node.refused_start()

    expired = pki["expired"]
    node = make_node("expired", start=False, tls=tls_settings(pki, private_key=str(expired.private_key),
                                                              certificate=str(expired.certificate)))
    assert "expired on" in node.refused_start()


def test_status_shows_the_certificate_and_the_node_warns_before_it_expires(make_node, pki) -> None:
    soon = pki["ca"].issue("soon", days=10)
    node = tls_node(make_node, pki, tls={"certificate": str(soon.certificate), "private_key": str(soon.private_key)})
    status = node.cli_json("status")
    assert status["tls"]["port"] == node.tls_port and status["tls"]["subject"] == "CN=soon"
    assert 9 <= status["tls"]["days_left"] <= 10
    text = node.cli("status").stdout
    assert "CN=soon" in text and "expires" in text
    assert "tls.certificate_expiring" in node.log() and "days_left=10" in node.log()


def storescp_tls(tmp_path: Path, identity: Issued, ca: Path, port: int) -> subprocess.Popen[bytes]:
    out = tmp_path / "received"
    out.mkdir()
    return subprocess.Popen(
        ["storescp", "+tls", str(identity.private_key), str(identity.certificate), "-pw", "+cf", str(ca),
         "-aet", "TLSPACS", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=DCMTK_ENV,
    )


def test_reports_go_to_a_tls_destination_verified(make_node, pki, tmp_path: Path) -> None:
    port = free_port()
    pacs_identity = pki["ca"].issue("pacs")
    pacs = storescp_tls(tmp_path, pacs_identity, pki["ca"].certificate, port)
    try:
        destination = {"name": "pacs", "ae_title": "TLSPACS", "host": "localhost", "port": port, "tls": True}
        node = tls_node(make_node, pki, inference={"workers": 1, "device": "cpu"}, destinations=[destination],
                        allowed_calling_aets=["PROBE", "TESTSCU"])
        from triagenode.inference.phantom import write_phantom_study

        study = write_phantom_study(tmp_path / "ph", seed=5, index=0, positive=True, slices=24, matrix=128)
        from nodes import send

        files = sorted(study.directory.glob("*.dcm"))  # type: ignore[union-attr]
        assert send(node.port, files) == [0] * len(files)
        node.wait_for_state(study.study_uid, "sent", timeout=120)
        [received] = wait_until(lambda: list((tmp_path / "received").glob("SR*")), 10, "the SR at storescp")
        assert dcmread(received).StudyInstanceUID == study.study_uid
    finally:
        pacs.terminate()
        pacs.wait(10)


def test_a_tls_destination_with_a_certificate_from_another_ca_gets_nothing(make_node, pki, tmp_path: Path) -> None:
    port = free_port()
    pacs = storescp_tls(tmp_path, pki["foreign"], pki["other_ca"].certificate, port)
    try:
        destination = {"name": "pacs", "ae_title": "TLSPACS", "host": "localhost", "port": port, "tls": True}
        node = tls_node(make_node, pki, inference={"workers": 1, "device": "cpu"}, destinations=[destination],
                        delivery={"initial_backoff_s": 60})
        from triagenode.inference.phantom import write_phantom_study

        study = write_phantom_study(tmp_path / "ph", seed=6, index=0, positive=False, slices=24, matrix=128)
        from nodes import send

        assert set(send(node.port, sorted(study.directory.glob("*.dcm")))) == {0}  # type: ignore[union-attr]
        def attempted() -> dict[str, Any] | None:
            deliveries = (node.study(study.study_uid) or {}).get("deliveries") or [{}]
            return deliveries[0] if deliveries[0].get("attempts") else None

        error = wait_until(attempted, 120, "a failed attempt")["last_error"]
        assert "over TLS" in error, error
        assert not list((tmp_path / "received").iterdir())
    finally:
        pacs.terminate()
        pacs.wait(10)


def tls_orthanc(root: Path, pki: dict[str, Any], modalities: dict[str, Any]) -> Orthanc:
    """A private Orthanc with DICOM TLS on its DICOM port, trusting the test CA, requiring client certificates."""
    identity = pki["ca"].issue("orthanc")
    orthanc = Orthanc(root)
    config = json.loads(orthanc.config_path.read_text())
    config.update(
        {
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(identity.certificate),
            "DicomTlsPrivateKey": str(identity.private_key),
            "DicomTlsTrustedCertificates": str(pki["ca"].certificate),
            "DicomTlsRemoteCertificateRequired": True,
            "DicomModalities": modalities,
        }
    )
    orthanc.config_path.write_text(json.dumps(config))
    return orthanc


def test_orthanc_sends_and_receives_over_dicom_tls(make_node, stop_after_test, pki, tmp_path: Path) -> None:
    if not Orthanc.available():
        pytest.skip("Orthanc is not installed (.ci/run installs it)")
    tls = tls_settings(pki)
    orthanc = tls_orthanc(tmp_path / "orthanc", pki, {
        "node": {"AET": NODE_AE, "Host": "127.0.0.1", "Port": tls["port"], "UseDicomTls": True},
    })
    stop_after_test(orthanc, Orthanc.stop)
    orthanc.start()
    destination = {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port,
                   "tls": True}
    node = make_node(tls=tls, inference={"workers": 1, "device": "cpu"}, destinations=[destination])
    from triagenode.inference.phantom import write_phantom_study

    study = write_phantom_study(tmp_path / "ph", seed=7, index=0, positive=True, slices=24, matrix=128)
    for path in sorted(study.directory.glob("*.dcm")):  # type: ignore[union-attr]
        orthanc.upload(path)
    request = {"Resources": [orthanc.study_id(study.study_uid)], "Synchronous": True}
    job = orthanc.rest("/modalities/node/store", method="POST", data=json.dumps(request).encode())
    assert job["FailedInstancesCount"] == 0, job
    details = node.wait_for_state(study.study_uid, "sent", timeout=120)
    assert details["calling_aets"] == ["ORTHANC"]
    assert "tls=yes peer_certificate='orthanc'" in node.log()
    orthanc_study = orthanc.rest(f"/studies/{orthanc.study_id(study.study_uid)}")
    modalities = {orthanc.rest(f"/series/{s}")["MainDicomTags"]["Modality"] for s in orthanc_study["Series"]}
    assert "SR" in modalities, "the report came back to Orthanc over TLS"


def test_triagenode_echo_checks_a_tls_peer(make_node, pki) -> None:
    node = tls_node(make_node, pki)
    result = node.cli("echo", "--tls", f"{NODE_AE}@localhost:{node.tls_port}")
    assert "over TLS: Success" in result.stdout
    plain = node.cli("echo", "--tls", f"{NODE_AE}@localhost:{node.port}", "--timeout", "5", check=False)
    assert plain.returncode == 1 and "no association over TLS" in plain.stderr


def test_a_peer_bound_to_tls_and_its_certificate_is_refused_otherwise(make_node, pki, tmp_path: Path) -> None:
    """The CA signs many certificates: CT1 must come over TLS, from its address, with its own."""
    node = tls_node(make_node, pki, peers=[{"ae_title": "CT1", "hosts": ["127.0.0.1"], "require_tls": True,
                                            "certificate_names": ["CT1"]}])
    study = write_study(tmp_path / "study", slices=1)
    plain = subprocess.run(["storescu", "-aet", "CT1", "-aec", NODE_AE, "127.0.0.1", str(node.port),
                            str(study.files[0])], capture_output=True, text=True, timeout=60, env=DCMTK_ENV)
    assert plain.returncode != 0
    other = pki["ca"].issue("CT_OTHER")
    borrowed = dcmtk_tls("storescu", other, pki["ca"].certificate, "-aet", "CT1", "127.0.0.1", str(node.tls_port),
                         str(study.files[0]))
    assert borrowed.returncode != 0
    lines = [line for line in node.log().splitlines() if "association.refused peer_ae=CT1" in line]
    assert "must use the TLS port" in lines[0] and "tls=no" in lines[0]
    assert "must show a certificate for CT1; it showed CT_OTHER" in lines[1] and "tls=yes" in lines[1]
    own = dcmtk_tls("storescu", pki["client"], pki["ca"].certificate, "-aet", "CT1", "127.0.0.1",
                    str(node.tls_port), str(study.files[0]))
    assert own.returncode == 0, own.stderr
    alerts = [line for path in (node.data_dir / "audit").glob("*.log") for line in path.read_text().splitlines()
              if 'csd-code="110113"' in line and "CT1" in line]
    assert len(alerts) == 2
