"""The worker processes of ``triagenode serve``: started, watched, restarted and stopped here.

Workers are spawned (never forked after CUDA), one per slot. Every second
the supervisor checks them: a worker that died is restarted and its lease
released at once (the queue's attempt count stops a crash loop); a worker
busy with one study for longer than ``study_timeout_s`` is killed, which
counts as one interrupted attempt for that study. Busy time is measured on
the monotonic clock, so a step of the wall clock never kills a healthy worker.

Once the node begins to stop (:meth:`WorkerPool.begin_stop`), no worker is
restarted and every worker is asked to finish its study and claim no other;
a worker that the stop's SIGTERM ended (systemd signals the whole control
group at once) is a normal stop, not a death.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized

from triagenode.config.settings import Settings
from triagenode.storage.queue import StudyQueue

log = logging.getLogger("triagenode.supervisor")

RESTART_DELAY_S = 2.0
"""Wait before restarting a worker that died; doubles with each restart in a row, up to 30 times this."""

RAN_WELL_S = 300.0
"""A worker alive this long ran well: its slot's restart count starts again from zero, so an
occasional crash weeks apart is restarted after 2 s, not after the 60 s of a crash loop."""


def _run_worker(
    settings: Settings, worker_id: str, busy_since: Synchronized, models: tuple[str, ...], node_pid: int
) -> None:
    """A worker process's entry point: imports the worker, and torch with it, in the child only.

    Naming :func:`triagenode.daemon.worker.worker_main` as the target would
    import that module in the node's main process to pickle the reference,
    loading torch (~200 MB) into the receiver for nothing.
    """
    from triagenode.daemon.worker import worker_main

    worker_main(settings, worker_id, busy_since, models, node_pid)


def assign_models(settings: Settings) -> list[tuple[str, ...]]:
    """The models each worker process serves, one entry per ``[inference] workers``.

    A ``[[models]]`` entry with ``workers = N`` gets N processes of its own (a heavy
    model must not starve a light one); the other processes serve every model
    that reserved none. Without reservations every process serves every model.
    """
    routes = settings.routes()
    # Processes left over after the reservations serve the models that reserved none, or, when every
    # model reserved its own, every model (a process with nothing to serve would only crash-loop).
    shared = tuple(route.name for route in routes if route.workers == 0) or tuple(route.name for route in routes)
    slots: list[tuple[str, ...]] = []
    for route in routes:
        slots += [(route.name,)] * route.workers
    slots += [shared] * (settings.inference.workers - len(slots))
    return slots[: settings.inference.workers]


@dataclass
class _Slot:
    index: int
    models: tuple[str, ...] = ()
    """The models (routes) this slot's worker serves."""
    worker_id: str = ""
    process: BaseProcess | None = None
    busy_since: Synchronized | None = None
    restarts: int = 0
    """Restarts in a row: reset once a worker has run for RAN_WELL_S."""
    not_before: float = field(default=0.0)
    started_at: float = 0.0
    timed_out: bool = False
    """The supervisor killed this worker for study_timeout_s (not a crash of its own)."""
    crashed: bool = False
    """The restart waiting in ``not_before`` follows a crash, so it counts toward the back-off."""


class WorkerPool:
    def __init__(self, settings: Settings, queue: StudyQueue) -> None:
        self._settings = settings
        self._queue = queue
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(index, models) for index, models in enumerate(assign_models(settings))]
        self._stopping = False
        self._lock = threading.Lock()
        """Held by :meth:`check` and :meth:`begin_stop`, so no restart can slip in after a stop began."""

    def start(self) -> None:
        for slot in self._slots:
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        slot.worker_id = f"worker{slot.index}-{uuid.uuid4().hex[:6]}"
        slot.busy_since = self._context.Value("d", 0.0)
        slot.process = self._context.Process(
            target=_run_worker, args=(self._settings, slot.worker_id, slot.busy_since, slot.models, os.getpid()),
            name=slot.worker_id,
        )  # not daemonic: a worker starts its own decoder processes; stop() ends it, and it exits if we die
        slot.process.start()
        slot.started_at = time.monotonic()
        log.info("worker.started worker=%s pid=%s models=%s", slot.worker_id, slot.process.pid, ",".join(slot.models))

    def check(self) -> None:
        """Restart dead workers, kill hung ones (a scheduler job, every second)."""
        with self._lock:
            if not self._stopping:
                self._check()

    def _check(self) -> None:
        timeout = self._settings.inference.study_timeout_s
        for slot in self._slots:
            process = slot.process
            if process is None:
                continue
            busy = slot.busy_since.value if slot.busy_since is not None else 0.0
            if process.is_alive() and busy and time.monotonic() - busy > timeout:
                log.error("worker.timeout worker=%s pid=%s study_timeout_s=%d: killing it", slot.worker_id,
                          process.pid, timeout)
                os.kill(process.pid, signal.SIGKILL)  # type: ignore[arg-type]
                process.join(5)
                slot.timed_out = True
            if process.is_alive():
                if slot.restarts and time.monotonic() - slot.started_at > RAN_WELL_S:
                    slot.restarts = 0
                continue
            if slot.not_before == 0.0:
                # Exit 0 or SIGTERM: the group's stop signal reached the worker before begin_stop().
                stopped = process.exitcode in (0, -signal.SIGTERM) and not slot.timed_out
                if not slot.timed_out:
                    log.log(logging.INFO if stopped else logging.ERROR, "worker.%s worker=%s pid=%s exitcode=%s",
                            "exited" if stopped else "died", slot.worker_id, process.pid, process.exitcode)
                why = f"killed after study_timeout_s={timeout}" if slot.timed_out else None
                returned = self._queue.recover_expired_leases(owner=slot.worker_id, why=why)
                for study_uid in returned:
                    log.warning("study.lease_released study_uid=%s worker=%s", study_uid, slot.worker_id)
                # A crash loop backs off. A worker killed for its study's time restarts at once and is
                # no crash: the study was the trouble, and study_timeout_s itself paces a model that
                # hangs on every study.
                slot.crashed = not slot.timed_out
                slot.timed_out = False
                backoff = RESTART_DELAY_S * min(2**slot.restarts, 30) if slot.crashed else 0.0
                slot.not_before = time.monotonic() + backoff
            if time.monotonic() >= slot.not_before:
                if slot.crashed:
                    slot.restarts += 1
                slot.not_before = 0.0
                self._spawn(slot)

    def alive(self) -> list[str]:
        """The ids of the workers running now (their leases are theirs, whatever the wall clock says)."""
        return [slot.worker_id for slot in self._slots if slot.process is not None and slot.process.is_alive()]

    def begin_stop(self) -> None:
        """No more restarts; ask every worker (SIGTERM) to finish its study and claim no other."""
        with self._lock:
            self._stopping = True
        for slot in self._slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.terminate()

    def stop(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for the workers to finish their studies, then kill what is left.

        A study cut short this way keeps its lease; the next start gives it back to the queue.
        """
        self.begin_stop()
        deadline = time.monotonic() + grace_s
        for slot in self._slots:
            if slot.process is not None:
                slot.process.join(max(0.0, deadline - time.monotonic()))
                if slot.process.is_alive():
                    log.warning("worker.killed worker=%s pid=%s reason='still busy after shutdown_grace_s=%g'",
                                slot.worker_id, slot.process.pid, grace_s)
                    slot.process.kill()
                    slot.process.join(5)
                else:
                    log.info("worker.exited worker=%s exitcode=%s", slot.worker_id, slot.process.exitcode)
