"""``triagenode serve``: the node's long-running process.

Start-up order matters for "a restart loses nothing": the spool is emptied
(only unanswered transfers can be there), the database is migrated, leases
of the previous run are released and the stability clocks of studies still
``receiving`` restart, and only then does the port open. Shutdown runs the
other way: workers are told to finish their study and claim no other (and
are no longer restarted), the port closes, idle associations end at once
while a C-STORE in progress gets ``shutdown_grace_s``, the scheduler stops,
the workers are waited for, the database closes. A stop never fails on a
full disk or a locked database: what cannot be recorded then is logged.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from config.settings import Settings
from daemon.delivery import ReportDelivery
from daemon.receiver import StorageReceiver
from daemon.supervisor import WorkerPool
from daemon.systemd import notify
from storage.database import open_for_daemon
from storage.filestore import FileStore
from storage.heartbeat import HEARTBEAT_INTERVAL_S, Heartbeat
from storage.queue import MAX_PROCESSING_ATTEMPTS, StudyQueue
from storage.reports import ReportBook

log = logging.getLogger("triagenode.service")

LEASE_CHECK_INTERVAL_S = 5


class Node:
    """The receiver, the workers, report delivery and the queue's scheduled jobs, started and stopped together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = FileStore(settings.node.data_dir)
        self.engine: Engine | None = None
        self.receiver: StorageReceiver | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._heartbeat: Heartbeat | None = None
        self._lock_fd: int | None = None
        self.workers: WorkerPool | None = None

    def start(self) -> None:
        node = self.settings.node
        if self.settings.inference.workers:
            # Refuse a missing or broken model now, with one line, rather than in a restart loop of workers.
            from inference.model_package import DEMO_MODEL, read_manifest

            model = self.settings.inference.model
            manifest = read_manifest(DEMO_MODEL if model == "demo" else Path(model))
            log.info("model name=%s version=%s threshold=%s", manifest.name, manifest.version, manifest.threshold)
        self._lock_fd = self.store.lock()
        leftovers = self.store.prepare()
        if leftovers:
            log.info("spool.cleaned leftovers=%d reason='transfers interrupted before Success'", leftovers)
        self.engine = open_for_daemon(node.database_path)
        queue = StudyQueue(self.engine)
        recovered = queue.recover_expired_leases(MAX_PROCESSING_ATTEMPTS, all_leases=True)
        resumed = queue.restart_stability_clocks()
        log.info(
            "node.starting data_dir=%s config=%r receiving_studies_resumed=%d leases_recovered=%d",
            node.data_dir,
            self.settings.source,
            resumed,
            len(recovered),
        )
        for destination in self.settings.destinations:
            log.info("destination name=%s ae_title=%s host=%s port=%d", destination.name, destination.ae_title,
                     destination.host, destination.port)  # fmt: skip
        if not self.settings.destinations:
            log.info("destination none: reports stay on the node (add [[destinations]] to send them)")
        self.receiver = StorageReceiver(node, queue, self.store)
        self.receiver.start()
        self._heartbeat = Heartbeat(self.engine)
        self._heartbeat.announce(node.ae_title, self.receiver.port)
        self._scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        stable = self.settings.study.stable_seconds
        self._scheduler.add_job(
            queue.complete_stable_studies,
            "interval",
            seconds=max(0.2, min(1.0, stable / 5)),
            args=[stable],
            id="complete-stable-studies",
        )
        self._scheduler.add_job(
            queue.recover_expired_leases,
            "interval",
            seconds=LEASE_CHECK_INTERVAL_S,
            args=[MAX_PROCESSING_ATTEMPTS],
            id="recover-expired-leases",
        )
        self._scheduler.add_job(self._heartbeat.beat, "interval", seconds=HEARTBEAT_INTERVAL_S, id="heartbeat")
        if self.settings.inference.workers:
            self.workers = WorkerPool(self.settings, queue)
            self.workers.start()
            self._scheduler.add_job(self.workers.check, "interval", seconds=1, id="watch-workers")
        if self.settings.destinations:
            delivery = ReportDelivery(self.settings, ReportBook(self.engine))
            self._scheduler.add_job(delivery.run_due, "interval", seconds=1, id="deliver-reports")
        self._scheduler.start()

    def stop(self) -> None:
        try:
            if self.workers is not None:
                self.workers.begin_stop()
            if self.receiver is not None:
                self.receiver.stop(self.settings.node.shutdown_grace_s)
            if self._scheduler is not None:
                self._scheduler.shutdown(wait=True)
        finally:
            # Workers are not daemonic (they own decoder processes): stop them whatever happened above.
            if self.workers is not None:
                self.workers.stop(self.settings.node.shutdown_grace_s)
        if self._heartbeat is not None:
            try:
                self._heartbeat.stopped()
            except SQLAlchemyError as exc:  # a full disk or a locked database must not turn a stop into a crash
                log.warning("node.stop_not_recorded error=%s: `triagenode status` reads the lock instead",
                            type(exc).__name__)  # fmt: skip
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        if self.engine is not None:
            self.engine.dispose()
            log.info("node.stopped")


def serve(settings: Settings) -> None:
    """Run the node in the foreground until SIGTERM or SIGINT."""
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("node.stopping signal=%s", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    node = Node(settings)
    try:
        node.start()
        assert node.receiver is not None
        notify("READY=1", f"STATUS=listening on port {node.receiver.port} as {settings.node.ae_title}")
        while not stop_requested.wait(0.2):
            pass
        notify("STOPPING=1")
    finally:
        node.stop()
