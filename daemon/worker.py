"""A worker process: load the model once, then take queued studies by lease until told to stop.

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

from triagenode.config.settings import Settings
from triagenode.daemon.signals import stop_on_signals
from triagenode.inference.loader import SliceLoader, exit_when_orphaned
from triagenode.inference.model_package import ModelPackage, load_package
from triagenode.inference.pipeline import NotApplicable, SeriesGeometryError, analyse_study
from triagenode.inference.report import read_predecessor
from triagenode.inference.studies import read_study
from triagenode.inference.device import resolve_device
from triagenode.storage.database import open_for_daemon
from triagenode.storage.filestore import FileStore
from triagenode.storage.models import StudyState
from triagenode.storage.overview import QueueOverview
from triagenode.storage.queue import Claim, StudyQueue
from triagenode.storage.reports import Outcome, ReportBook

log = logging.getLogger("triagenode.worker")

LEASE_SECONDS = 60
IDLE_POLL_S = 0.5


def worker_main(
    settings: Settings, worker_id: str, busy_since: Synchronized, stop: threading.Event | None = None
) -> None:
    """Entry point of a worker process (spawned by the supervisor)."""
    from triagenode.daemon.logs import configure_logging

    configure_logging()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack to the log
    exit_when_orphaned()
    stop = stop or threading.Event()
    stop_on_signals(stop, [signal.SIGTERM])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
    inference = settings.inference
    package = load_package(inference.model)
    device = resolve_device(inference.device)
    package.network.to(device)
    loader = SliceLoader(inference.decoders())
    loader.start()
    engine = open_for_daemon(settings.node.database_path)
    queue, book, overview = StudyQueue(engine), ReportBook(engine), QueueOverview(engine)
    destinations = [d.name for d in settings.destinations]
    log.info(
        "worker.ready worker=%s model=%s version=%s device=%s decoders=%d",
        worker_id,
        package.manifest.name,
        package.manifest.version,
        device,
        loader.processes,
    )
    while not stop.is_set():
        claim = queue.claim(worker_id, LEASE_SECONDS)
        if claim is None:
            stop.wait(IDLE_POLL_S)
            continue
        busy_since.value = time.monotonic()  # the supervisor measures on the same (system-wide) clock
        renewer = _LeaseRenewer(queue, claim)
        renewer.start()
        try:
            _process(settings, package, device, loader, claim, overview, book, destinations)
        except SeriesGeometryError as exc:
            queue.finish(claim, StudyState.FAILED, f"the series cannot be read as one volume: {exc}")
        except BrokenProcessPool:
            # A decoder died (most likely killed for memory): like a worker crash, the study gets another try.
            log.error(
                "worker.decoder_died worker=%s study_uid=%s attempt=%d", worker_id, claim.study_uid, claim.attempt
            )
            queue.interrupted(claim, "a decoder process died (out of memory?)")
        except Exception as exc:  # noqa: BLE001 - the study fails with the reason; the worker goes on
            log.exception("worker.error worker=%s study_uid=%s", worker_id, claim.study_uid)
            queue.finish(claim, StudyState.FAILED, f"worker error: {type(exc).__name__}; see the node's log")
        finally:
            renewer.stop()
            busy_since.value = 0.0
    loader.close()
    engine.dispose()
    log.info("worker.stopped worker=%s", worker_id)


def _process(
    settings: Settings,
    package: ModelPackage,
    device: torch.device,
    loader: SliceLoader,
    claim: Claim,
    overview: QueueOverview,
    book: ReportBook,
    destinations: list[str],
) -> None:
    data_dir = settings.node.data_dir
    inference = settings.inference
    files = overview.instance_files(claim.study_uid, data_dir)
    previous = book.previous_report(claim.study_uid)  # a re-opened study's new report names the one it replaces
    predecessor = read_predecessor(data_dir / previous.sr_path) if previous is not None else None
    analysis = analyse_study(
        package, read_study(claim.study_uid, files), device, inference.batch_size, loader, inference,
        settings.node.ae_title, predecessor,
    )  # fmt: skip
    outcome, report, manifest = analysis.outcome, analysis.report, package.manifest
    started = time.perf_counter()
    sr: tuple[str | None, str | None] = (None, None)
    if report is not None:
        store = FileStore(data_dir)
        relative = Path("reports") / claim.study_uid / f"{report.SOPInstanceUID}.dcm"
        spooled = store.spool_dir / f"{report.SOPInstanceUID}.sr"
        report.save_as(spooled, enforce_file_format=True)
        store.commit_file(spooled, relative)
        sr = (str(relative), str(report.SOPInstanceUID))
    if isinstance(outcome, NotApplicable):
        recorded = book.record_result(
            claim, Outcome.not_applicable(manifest.name, manifest.version, outcome.reason), destinations, *sr
        )
        log.info("study.not_applicable study_uid=%s reason=%r report=%s recorded=%s", claim.study_uid, outcome.reason,
                 report is not None, recorded)  # fmt: skip
        return
    outcome.timings_ms["report"] = round(analysis.report_ms + (time.perf_counter() - started) * 1000, 1)
    finding = Outcome(
        model=outcome.model,
        model_version=outcome.model_version,
        finding=outcome.finding,
        probability=outcome.probability,
        threshold=outcome.threshold,
        series_uid=outcome.series_uid,
        key_instance_uid=outcome.key_instance_uid,
        slices=outcome.slices,
        timings_ms=outcome.timings_ms,
    )
    recorded = book.record_result(claim, finding, destinations, *sr)
    log.info(
        "study.result study_uid=%s finding=%s probability=%.4f recorded=%s timings_ms=%s",
        claim.study_uid,
        outcome.finding,
        outcome.probability,
        recorded,
        outcome.timings_ms,
    )


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
