"""The node's policies as plain functions: retry backoff, decoder processes per worker."""

from __future__ import annotations

import random

import pytest

from triagenode.config.settings import DeliverySettings, InferenceSettings
from triagenode.daemon.delivery import backoff


def test_backoff_doubles_from_the_initial_wait_with_jitter_and_stops_at_the_cap() -> None:
    settings = DeliverySettings(max_attempts=8, initial_backoff_s=10, max_backoff_s=100)
    rng = random.Random(7)
    for attempt, base in [(1, 10), (2, 20), (3, 40), (4, 80)]:
        waits = [backoff(attempt, settings, rng) for _ in range(200)]
        assert min(waits) >= 0.8 * base and max(waits) <= 1.2 * base, (attempt, min(waits), max(waits))
        assert max(waits) - min(waits) > 0.2 * base, "jitter spreads retries of many studies apart"
    assert all(backoff(attempt, settings, rng) <= 100 for attempt in range(5, 40)), "never beyond max_backoff_s"


@pytest.mark.parametrize(
    ("configured", "cpus", "workers", "expected"),
    [
        (-1, 2, 1, 0),  # auto on two cores: decode in a thread of the worker
        (-1, 16, 1, 8),  # auto on 16 cores: up to 8 decoders
        (-1, 16, 4, 3),  # auto shares the cores between workers, less the worker's own
        (-1, 1, 1, 0),
        (0, 64, 1, 0),  # as configured
        (3, 2, 1, 3),
    ],
)
def test_decoder_processes_per_worker(configured: int, cpus: int, workers: int, expected: int) -> None:
    assert InferenceSettings(workers=workers, decode_processes=configured).decoders(cpus) == expected


def test_workers_are_reserved_per_model_and_none_is_left_without_a_model() -> None:
    from triagenode.config.settings import Settings
    from triagenode.daemon.supervisor import assign_models

    def slots(workers: int, *reserved: tuple[str, int]) -> list[tuple[str, ...]]:
        models = [{"name": name, "package": "demo", "workers": count} for name, count in reserved]
        return assign_models(Settings.model_validate({"inference": {"workers": workers}, "models": models}))

    assert slots(2, ("a", 0), ("b", 0)) == [("a", "b"), ("a", "b")]
    assert slots(3, ("heavy", 1), ("a", 0), ("b", 0)) == [("heavy",), ("a", "b"), ("a", "b")]
    assert slots(3, ("x", 1), ("y", 1)) == [("x",), ("y",), ("x", "y")], "the spare process serves every model"
    assert Settings.model_validate({"inference": {"workers": 2}}).routes()[0].name == "default"
    assert slots(2) == [("default",), ("default",)]
