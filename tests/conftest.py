"""Fixtures: real nodes, report destinations and a private Orthanc, each stopped when its test ends.

Also sorts the tests into two tiers (``pytest -m fast`` and the rest).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nodes import NodeProcess, free_port
from orthanc import Orthanc
from peers import HangingPeer, RecordingPacs

T = TypeVar("T")


@pytest.fixture
def stop_after_test() -> Iterator[Callable[[T, Callable[[T], object]], T]]:
    """``stop_after_test(thing, stop)`` returns ``thing`` and calls ``stop(thing)`` once the test is over.

    Registered before it starts, so a node or peer that failed half-way through
    starting is stopped too; the last started is stopped first.
    """
    made: list[tuple[Any, Callable[[Any], object]]] = []

    def keep(thing: T, stop: Callable[[T], object]) -> T:
        made.append((thing, stop))
        return thing

    yield keep
    for thing, stop in reversed(made):
        stop(thing)


@pytest.fixture
def make_node(tmp_path: Path, stop_after_test: Any) -> Callable[..., NodeProcess]:
    """Start ``triagenode serve`` processes: ``make_node(inference={...}, delivery={...}, ...)`` (see NodeProcess)."""

    def factory(name: str = "node", start: bool = True, **settings: Any) -> NodeProcess:
        node = stop_after_test(NodeProcess(tmp_path / name, **settings), lambda n: n.stop(signal.SIGKILL))
        return node.start() if start else node

    return factory


@pytest.fixture
def node(make_node: Any) -> NodeProcess:
    return make_node()


@pytest.fixture
def make_pacs(stop_after_test: Any) -> Callable[..., RecordingPacs]:
    """Start report destinations (:class:`peers.RecordingPacs`) on free ports: ``make_pacs("A")``."""

    def factory(ae_title: str = "PACS", port: int | None = None, **options: Any) -> RecordingPacs:
        return stop_after_test(RecordingPacs(port or free_port(), ae_title, **options), RecordingPacs.stop).start()

    return factory


@pytest.fixture
def make_hanging_peer(stop_after_test: Any) -> Callable[..., HangingPeer]:
    """Start destinations that accept connections and never answer (:class:`peers.HangingPeer`)."""
    return lambda port=None: stop_after_test(HangingPeer(port or free_port()), HangingPeer.stop).start()


@pytest.fixture
def make_orthanc(tmp_path: Path, stop_after_test: Any) -> Callable[..., Orthanc]:
    """Start private Orthancs (own config, storage, loopback ports); skips the test where Orthanc is not installed."""
    if not Orthanc.available():
        pytest.skip("Orthanc is not installed (.ci/run installs it)")

    def factory(name: str = "orthanc", start: bool = True, **options: Any) -> Orthanc:
        orthanc = stop_after_test(Orthanc(tmp_path / name, **options), Orthanc.stop)
        return orthanc.start() if start else orthanc

    return factory


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
