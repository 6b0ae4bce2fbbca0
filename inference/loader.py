"""Slices decoded and preprocessed in decoder processes, ahead of the model.

The model must not wait for the CPU. pydicom's parsing and pylibjpeg's
decoders hold the GIL, so threads do not help (measured: 0.53 s with four
threads against 0.38 s alone for 300 CT slices); processes do. Each worker
keeps a small pool of spawned decoder processes for its whole life. For a
study, the worker lays the series out from its headers (slice order along
the normal), then hands the decoders runs of consecutive slices. Each decoder
reads its files, applies the modality LUT and, when the model's
preprocessing works slice by slice (window normalisation), normalises,
denoises and resamples them too, writing the result straight to its place
in a shared-memory volume. The worker gives the model a batch as soon as its
slices and their 2.5D neighbours are in, so decoding overlaps the forward
pass. Z-score normalisation needs the whole volume's statistics: then the
decoders write modality values and the worker prepares the volume once all
are in.

With no decoder processes (a machine with two cores or fewer per worker),
one thread of the worker decodes ahead of the model instead: pydicom holds
the GIL, but the forward pass releases it, so the two still overlap.

A decoder process exits when its worker dies (it polls its parent), so a
worker killed by the supervisor leaves no orphans behind.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom import dcmread

from triagenode.inference.preprocessing import (
    InputSpec,
    SeriesLayout,
    modality_values,
    prepare_slices,
    stack_neighbours,
)

RUN_SLICES = 16
"""Slices per decoder task: small enough that the first batch is ready early, large enough to amortise a task."""


def exit_when_orphaned(parent: int, poll_s: float = 1.0) -> None:
    """Exit this process when its parent ``parent`` (the pid that spawned it) is gone.

    Spawned children of a process that is SIGKILLed are not killed with it;
    a worker or decoder left behind would hold memory (and a GPU) forever. The
    parent's pid comes from the parent itself: a child reading ``getppid()``
    once started would take the adopting init for its parent when the parent
    died while the child was still importing (seconds, with torch), and never exit.
    """
    if os.getppid() != parent:
        os._exit(0)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _decoder_init(worker: int) -> None:
    torch.set_num_threads(1)  # the pool is the parallelism; one thread per process avoids oversubscription
    # A signal to the node's process group (Ctrl-C, `kill -TERM -- -PGID`) must not
    # reach the decoders: one that died of it would break its worker's study
    # mid-way. The worker, told to stop, finishes the study and closes the pool;
    # a decoder also exits when its worker is gone. (Under systemd the unit's
    # KillMode=mixed sends SIGTERM to the main process only, for the same reason.)
    os.setpgrp()
    exit_when_orphaned(worker)


def _warm() -> int:
    time.sleep(0.05)  # long enough that every process of the pool gets one task
    return os.getpid()


@dataclass
class DecodeTimings:
    """Where the time of loading a series went (milliseconds)."""

    decode_ms: float = 0.0
    """CPU time in the decoders reading files and decoding pixels, summed over processes."""
    preprocess_ms: float = 0.0
    """CPU time normalising, denoising and resampling, summed over processes (and the worker)."""
    wait_ms: float = 0.0
    """Time the model waited for slices: zero when decoding keeps ahead."""


def decode_run(
    shm_name: str,
    shape: tuple[int, ...],
    start: int,
    paths: Sequence[Path],
    pixel_spacing_mm: tuple[float, float],
    spec: InputSpec | None,
) -> tuple[float, float]:
    """Decode ``paths`` (consecutive slices from ``start``) into the shared volume; returns (decode, preprocess) ms.

    With ``spec`` the slices are also prepared for the model (window
    normalisation, denoising, resampling); without, they stay modality values.
    """
    started = time.perf_counter()
    datasets = [dcmread(path) for path in paths]
    values = np.empty((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), dtype=np.float32)
    modality_values(datasets, values)
    decoded = time.perf_counter()
    result = values if spec is None else prepare_slices(torch.from_numpy(values), pixel_spacing_mm, spec).numpy()
    prepared = time.perf_counter()
    shm = SharedMemory(name=shm_name)
    try:
        np.ndarray(shape, dtype=np.float32, buffer=shm.buf)[start : start + len(paths)] = result
    finally:
        shm.close()
    return (decoded - started) * 1000, (prepared - decoded) * 1000


def pool_is_broken(pool: Executor) -> bool:
    """Whether a process pool lost a process and can run nothing more.

    concurrent.futures has no public way to ask; this reads the executor's
    private ``_broken``, and ``tests/test_model_lifecycle.py`` checks that it
    still means what it meant (CPython 3.11-3.13).
    """
    return bool(getattr(pool, "_broken", False))


class SliceLoader:
    """A worker's decoder processes; ``processes=0`` decodes in one thread of the calling process instead."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: Executor | None = None

    def start(self) -> None:
        """Start the decoder processes now, so that the first study does not wait for them.

        A pool one of whose processes died (killed for memory, say) cannot be
        used again; it is replaced here, before the next study.
        """
        if self._pool is not None and pool_is_broken(self._pool):
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if not self.processes and self._pool is None:
            # One thread ahead of the model: pydicom holds the GIL, but torch's forward pass releases it.
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="decoder")
        if self.processes and self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("spawn"), initializer=_decoder_init,
                initargs=(os.getpid(),),
            )
            futures = [self._pool.submit(_warm) for _ in range(self.processes)]
            for future in futures:
                future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> SliceLoader:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def batches(
        self,
        files: Sequence[Path],
        layout: SeriesLayout,
        spec: InputSpec,
        batch_size: int,
        timings: DecodeTimings,
        pin_memory: bool = False,
    ) -> Iterator[torch.Tensor]:
        """The model's input for ``files`` (the series' files in the order of ``layout``), batch by batch.

        Each batch is (n, channels, matrix, matrix) float32, in slice order,
        its own memory (pinned when ``pin_memory``, for non-blocking copies to a GPU).
        """
        self.start()
        n = len(files)
        slicewise = spec.normalisation == "window"
        shape = (n, 1, spec.matrix, spec.matrix) if slicewise else (n, layout.rows, layout.columns)
        shm = SharedMemory(create=True, size=max(1, math.prod(shape) * 4))
        # (slices ready once this run is in, the run's future)
        pending: list[tuple[int, Future]] = []
        volume: torch.Tensor | None = None
        prepared: torch.Tensor | None = None
        try:
            task_spec = spec if slicewise else None
            for start in range(0, n, RUN_SLICES):
                paths = list(files[start : start + RUN_SLICES])
                run = (shm.name, shape, start, paths, layout.pixel_spacing_mm, task_spec)
                pending.append((start + len(paths), self._submit(decode_run, *run)))
            volume = torch.from_numpy(np.ndarray(shape, dtype=np.float32, buffer=shm.buf))
            if slicewise:
                prepared = volume
            context = spec.slice_context
            emitted = 0
            for ready, future in pending:
                waited = time.perf_counter()
                decode_ms, preprocess_ms = future.result()
                timings.wait_ms += (time.perf_counter() - waited) * 1000
                timings.decode_ms += decode_ms
                timings.preprocess_ms += preprocess_ms
                if prepared is None:
                    if ready < n:
                        continue
                    mark = time.perf_counter()
                    prepared = prepare_slices(volume, layout.pixel_spacing_mm, spec)
                    timings.preprocess_ms += (time.perf_counter() - mark) * 1000
                while emitted < n and (ready == n or emitted + batch_size + context <= ready):
                    stop = min(n, emitted + batch_size)
                    batch = stack_neighbours(prepared, context, emitted, stop)
                    batch = batch if context else batch.clone()  # without context it is a view of the shared volume
                    yield batch.pin_memory() if pin_memory else batch
                    emitted = stop
        finally:
            volume = prepared = None  # views of the shared memory must go before it is closed
            for _, future in pending:
                if not future.cancel():
                    try:
                        future.result()  # a running decoder still writes into the shared volume
                    except Exception:  # noqa: BLE001, S110 - already reported to the consumer, or moot
                        pass
            shm.close()
            shm.unlink()

    def submit(self, function: Any, *args: Any) -> Future:
        """Run ``function(*args)`` in a decoder (a module-level function: it is pickled to the process)."""
        self.start()
        return self._submit(function, *args)

    def _submit(self, *task: Any) -> Future:
        assert self._pool is not None, "start() first"
        return self._pool.submit(*task)


__all__ = ["DecodeTimings", "SliceLoader", "decode_run", "exit_when_orphaned"]
