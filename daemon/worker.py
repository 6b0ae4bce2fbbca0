"""A worker process (:class:`Worker`): load its models once, then take queued tasks by lease until told to stop.

It runs in its own (spawned) process, so a crash, an out-of-memory kill or a
hang never takes the receiver down: the supervisor in ``triagenode serve``
restarts it, the study's lease expires and the queue gives the study back
(three strikes and it is ``failed``). While a study runs, a thread renews the
lease; the worker publishes when it started the study so that the supervisor
can kill it after ``study_timeout_s``.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

import torch
from pydicom import Dataset

from triagenode.config.settings import ModelRoute, Settings
from triagenode.daemon.signals import stop_on_signals
from triagenode.inference.device import resolve_device
from triagenode.inference.loader import SliceLoader, exit_when_orphaned
from triagenode.inference.model_package import ModelPackage, load_package
from triagenode.inference.pipeline import NotApplicable, SeriesGeometryError, analyse_study
from triagenode.inference.report import read_predecessor
from triagenode.inference.studies import read_study
from triagenode.storage.database import open_for_daemon
from triagenode.storage.filestore import FileStore
from triagenode.storage.models import StudyState
from triagenode.storage.overview import QueueOverview
from triagenode.storage.queue import Claim, StudyQueue
from triagenode.storage.reports import Outcome, ReportBook, ReportObject

log = logging.getLogger("triagenode.worker")

LEASE_SECONDS = 60
IDLE_POLL_S = 0.5


def worker_main(
    settings: Settings, worker_id: str, busy_since: Synchronized, models: tuple[str, ...], node_pid: int
) -> None:
    """Entry point of a worker process (spawned by the supervisor): set the process up, then run a Worker.

    ``models``: the names of the models (routes) this worker serves; ``node_pid``: the process that
    spawned it, whose death ends the worker too.
    """
    from triagenode.daemon.logs import configure_logging

    configure_logging()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack to the log
    exit_when_orphaned(node_pid)
    stop = threading.Event()
    stop_on_signals(stop, [signal.SIGTERM])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
    Worker(settings, worker_id, busy_since, stop, models).run()


class Worker:
    """One worker: its models, decoders and queue connection, its loop of claims, and what it does with a task.

    The loop (:meth:`run`) takes a task (one model's work on one study)
    under a lease, has a thread renew the lease, publishes when it started
    (the supervisor kills it after ``study_timeout_s``), runs :meth:`process`
    and ends the lease with the task's next state: ``reported`` with the
    outcome, ``failed`` with the reason, or back to the queue when a decoder
    died (an interrupted run). Each model is loaded once; two routes naming
    the same package share it.
    """

    def __init__(
        self,
        settings: Settings,
        worker_id: str,
        busy_since: Synchronized,
        stop: threading.Event,
        models: tuple[str, ...] | None = None,
    ) -> None:
        self.settings, self.worker_id = settings, worker_id
        self._busy_since, self._stop = busy_since, stop
        inference = settings.inference
        routes = settings.routes()
        self.routes: dict[str, ModelRoute] = {r.name: r for r in routes if models is None or r.name in models}
        self.device: torch.device = resolve_device(inference.device)
        loaded: dict[str, ModelPackage] = {}
        for route in self.routes.values():
            if route.package in loaded:
                continue
            try:
                loaded[route.package] = load_package(route.package)
                loaded[route.package].network.to(self.device)
            except (RuntimeError, MemoryError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
                held = ", ".join(f"{package} {_megabytes(model)} MB" for package, model in loaded.items()) or "none"
                log.error(
                    "worker.cannot_load worker=%s model=%s package=%s device=%s already_loaded=%r error=%r: give "
                    "the heavy model processes of its own ([[models]] workers) or fewer models per device",
                    worker_id, route.name, route.package, self.device, held, str(exc)[:300],
                )
                raise
        self.packages: dict[str, ModelPackage] = {name: loaded[r.package] for name, r in self.routes.items()}
        self.explicit = bool(settings.models)
        """With [[models]], each report series is its entry's own; the one implicit model keeps today's."""
        self.priorities = {name: route.priority for name, route in self.routes.items()}
        self.loader = SliceLoader(inference.decoders())
        self._engine = open_for_daemon(settings.node.database_path)
        self.queue, self.book = StudyQueue(self._engine), ReportBook(self._engine)
        self.overview = QueueOverview(self._engine)
        self.store = FileStore(settings.node.data_dir)
        self.destinations = [d.name for d in settings.destinations]

    def run(self) -> None:
        """Take tasks until told to stop, then close what the worker holds."""
        self.loader.start()
        models = ", ".join(
            f"{name}={package.manifest.name} {package.manifest.version} ({_megabytes(package)} MB)"
            for name, package in self.packages.items()
        )
        first = next(iter(self.packages.values())).manifest
        log.info("worker.ready worker=%s model=%s version=%s models=%r device=%s decoders=%d", self.worker_id,
                 first.name, first.version, models, self.device, self.loader.processes)
        try:
            while not self._stop.is_set():
                claim = self.queue.claim(
                    self.worker_id, LEASE_SECONDS, models=list(self.routes), priorities=self.priorities
                )
                if claim is None:
                    self._stop.wait(IDLE_POLL_S)
                    continue
                self._run_claimed(claim)
        finally:
            self.loader.close()
            self._engine.dispose()
            log.info("worker.stopped worker=%s", self.worker_id)

    def _run_claimed(self, claim: Claim) -> None:
        self._busy_since.value = time.monotonic()  # the supervisor measures on the same (system-wide) clock
        renewer = _LeaseRenewer(self.queue, claim)
        renewer.start()
        try:
            self.process(claim)
        except SeriesGeometryError as exc:
            self.queue.finish(claim, StudyState.FAILED, f"the series cannot be read as one volume: {exc}")
        except BrokenProcessPool:
            # A decoder died (most likely killed for memory): like a worker crash, the study gets another try.
            log.error("worker.decoder_died worker=%s study_uid=%s attempt=%d", self.worker_id, claim.study_uid,
                      claim.attempt)
            self.queue.interrupted(claim, "a decoder process died (out of memory?)")
        except Exception as exc:  # the study fails with the reason; the worker goes on
            log.exception("worker.error worker=%s study_uid=%s", self.worker_id, claim.study_uid)
            self.queue.finish(claim, StudyState.FAILED, f"worker error: {type(exc).__name__}; see the node's log")
        finally:
            renewer.stop()
            self._busy_since.value = 0.0

    def process(self, claim: Claim) -> None:
        """One claimed task: its model analyses the study (result and SR), the SR is kept, the outcome recorded."""
        data_dir = self.settings.node.data_dir
        inference = self.settings.inference
        route, package = self.routes[claim.model], self.packages[claim.model]
        destinations = list(route.destinations) or self.destinations
        files = self.overview.instance_files(claim.study_uid, data_dir)
        # A re-opened study's new report names the old one of the same model.
        previous = self.book.previous_report(claim.study_uid, claim.model)
        predecessor = read_predecessor(data_dir / previous.sr_path) if previous is not None else None
        others = [read_predecessor(data_dir / path) for path in (previous.extra_paths if previous else ())]
        analysis = analyse_study(
            package, read_study(claim.study_uid, files), self.device, inference.batch_size, self.loader,
            inference, self.settings.node.ae_title, predecessor, route=claim.model if self.explicit else None,
            mammo_sr=route.mammo_sr, more_predecessors=[other for other in others if other is not None],
        )
        outcome, manifest = analysis.outcome, package.manifest
        started = time.perf_counter()
        stored = [self._keep(claim.study_uid, document) for document in analysis.reports]
        sr: tuple[str | None, str | None] = (stored[0].path, stored[0].sop_instance_uid) if stored else (None, None)
        more, sr_class = stored[1:], stored[0].sop_class_uid if stored else None
        if isinstance(outcome, NotApplicable):
            recorded = self.book.record_result(
                claim, Outcome.not_applicable(manifest.name, manifest.version, outcome.reason), destinations, *sr,
                extra_objects=more, sr_sop_class_uid=sr_class,
            )
            log.info("study.not_applicable study_uid=%s model=%s reason=%r report=%s recorded=%s", claim.study_uid,
                     claim.model, outcome.reason, bool(stored), recorded)
            return
        outcome.timings_ms["report"] = round(analysis.report_ms + (time.perf_counter() - started) * 1000, 1)
        recorded = self.book.record_result(claim, outcome.to_outcome(), destinations, *sr, extra_objects=more,
                                           sr_sop_class_uid=sr_class)
        log.info("study.result study_uid=%s model=%s finding=%s probability=%.4f lesions=%d reports=%d recorded=%s "
                 "timings_ms=%s", claim.study_uid, claim.model, outcome.finding, outcome.probability,
                 len(outcome.lesions), len(stored), recorded, outcome.timings_ms)

    def _keep(self, study_uid: str, document: Dataset) -> ReportObject:
        """Write a report document durably under ``reports/<study>/`` (spooled, fsync'd, renamed into place)."""
        relative = Path("reports") / study_uid / f"{document.SOPInstanceUID}.dcm"
        spooled = self.store.spool_dir / f"{document.SOPInstanceUID}.sr"
        document.save_as(spooled, enforce_file_format=True)
        self.store.commit_file(spooled, relative)
        return ReportObject(str(relative), str(document.SOPInstanceUID), str(document.SOPClassUID))


def _megabytes(package: ModelPackage) -> int:
    """The model's weights in memory, for the log line that says what a worker holds."""
    return round(sum(p.numel() * p.element_size() for p in package.network.parameters()) / 1e6)


class _LeaseRenewer(threading.Thread):
    """Renews a lease every third of its length while the study is processed."""

    def __init__(self, queue: StudyQueue, claim: Claim) -> None:
        super().__init__(daemon=True)
        self._queue, self._claim = queue, claim
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(LEASE_SECONDS / 3):
            renewed = self._queue.renew(self._claim, LEASE_SECONDS)
            if renewed is None:
                log.warning("worker.lease_lost study_uid=%s", self._claim.study_uid)
                return
            self._claim = renewed

    def stop(self) -> None:
        self._stopped.set()
