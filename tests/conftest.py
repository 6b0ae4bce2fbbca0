"""Fixtures: real nodes, report destinations and a private Orthanc, each stopped when its test ends.

Also sorts the tests into two tiers (``pytest -m fast`` and the rest).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodes import NodeProcess, free_port
from orthanc import Orthanc
from peers import HangingPeer, RecordingPacs


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Any]:
    nodes: list[NodeProcess] = []

    def factory(name: str = "node", start: bool = True, **settings: Any) -> NodeProcess:
        node = NodeProcess(tmp_path / name, **settings)
        nodes.append(node)
        return node.start() if start else node

    yield factory
    for node in nodes:
        if node.process and node.process.poll() is None:
            node.stop(signal.SIGKILL)


@pytest.fixture
def node(make_node: Any) -> NodeProcess:
    return make_node()


@pytest.fixture
def make_pacs() -> Iterator[Any]:
    """Start report destinations (:class:`peers.RecordingPacs`) on free ports; all stop after the test."""
    started: list[RecordingPacs] = []

    def factory(ae_title: str = "PACS", port: int | None = None, **options: Any) -> RecordingPacs:
        pacs = RecordingPacs(port or free_port(), ae_title, **options).start()
        started.append(pacs)
        return pacs

    yield factory
    for pacs in started:
        pacs.stop()


@pytest.fixture
def make_hanging_peer() -> Iterator[Any]:
    """Start destinations that accept connections and never answer (:class:`peers.HangingPeer`)."""
    started: list[HangingPeer] = []

    def factory(port: int | None = None) -> HangingPeer:
        peer = HangingPeer(port or free_port()).start()
        started.append(peer)
        return peer

    yield factory
    for peer in started:
        peer.stop()


@pytest.fixture
def make_orthanc(tmp_path: Path) -> Iterator[Any]:
    """Start private Orthancs (own config, storage, loopback ports); skips the test where Orthanc is not installed."""
    if not Orthanc.available():
        pytest.skip("Orthanc is not installed (.ci/run installs it)")
    started: list[Orthanc] = []

    def factory(name: str = "orthanc", start: bool = True, **options: Any) -> Orthanc:
        orthanc = Orthanc(tmp_path / name, **options)
        started.append(orthanc)
        return orthanc.start() if start else orthanc

    yield factory
    for orthanc in started:
        orthanc.stop()


NODE_FIXTURES = frozenset({"make_node", "node", "make_orthanc"})
SLOW_MODULES = frozenset(
    {
        "test_deploy",  # install scripts, pip, image roots
        "test_layers",  # builds a wheel, runs lint-imports
        "test_model_lifecycle",  # trains and evaluates models
        "test_orthanc",  # a private Orthanc
        "test_phantom",  # the CLI and dciodvfy
        "test_readme",  # installs the project as the README says
        "test_report",  # the CLI's infer, DCMTK's dsr2html and dciodvfy
        "test_series_selection",  # models on phantoms
    }
)
"""Modules whose tests start processes or run models although they start no node."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fast: the fast tier: no node process, no model run (`pytest -m fast`)")
    config.addinivalue_line("markers", "slow: runs processes or a model, starts no node; not in the fast tier")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that starts no node and is not marked ``slow`` belongs to the fast tier.

    ``.ci/run`` runs the fast tier first (a broken build shows in under a
    minute), then the rest.
    """
    for item in items:
        slow = (
            not NODE_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))
            or item.get_closest_marker("slow") is not None
            or item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES
        )
        if not slow:
            item.add_marker(pytest.mark.fast)
