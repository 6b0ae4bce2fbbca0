"""``triagenode serve``: the node's long-running process.

Start-up refuses, with one line each, what would fail a security review later:
a ``data_dir`` others can write, a TLS key others can read, a certificate that
does not match its key or has expired. Then the order matters for "a restart
loses nothing": the spool is emptied
(only unanswered transfers can be there), the database is migrated, leases
of the previous run are released and the stability clocks of studies still
``receiving`` restart, and only then does the port open. Shutdown runs the
other way: workers are told to finish their study and claim no other (and
are no longer restarted), the port closes, idle associations end at once
while a C-STORE in progress gets ``shutdown_grace_s``, the scheduler stops,
the workers are waited for, the database closes. A stop never fails on a
full disk or a locked database: what cannot be recorded then is logged.
The audit trail records the start and the stop (Application Activity).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from functools import partial

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from triagenode.config.settings import Settings
from triagenode.daemon.audit import AuditTrail, os_user
from triagenode.daemon.delivery import ReportDelivery
from triagenode.daemon.receiver import StorageReceiver
from triagenode.daemon.signals import stop_on_signals
from triagenode.daemon.supervisor import WorkerPool
from triagenode.daemon.systemd import notify
from triagenode.daemon.tls import CertificateInfo, check_destination_tls, load_node_certificate
from triagenode.inference.routing import ModelRouter, check_configured_models
from triagenode.storage.database import open_for_daemon
from triagenode.storage.filestore import SERVICE_UMASK, FileStore
from triagenode.storage.heartbeat import Heartbeat
from triagenode.storage.queue import MAX_PROCESSING_ATTEMPTS, StudyQueue
from triagenode.storage.reports import ReportBook
from triagenode.storage.retention import SWEEP_INTERVAL_S, Retention
from triagenode.storage.snapshot import HEARTBEAT_INTERVAL_S

log = logging.getLogger("triagenode.service")

LEASE_CHECK_INTERVAL_S = 5
CERTIFICATE_CHECK_INTERVAL_S = 24 * 3600
"""How often the certificate's expiry is looked at: the warning comes once a day, from expiry_warning_days on."""


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
        self.delivery: ReportDelivery | None = None
        self.queue: StudyQueue | None = None
        self.audit: AuditTrail | None = None
        self._retention: Retention | None = None
        self.certificate: CertificateInfo | None = None

    def start(self) -> None:
        node = self.settings.node
        self.store.secure()
        if self.settings.tls.enabled:
            self.certificate = load_node_certificate(self.settings.tls)
        check_destination_tls(self.settings)
        # Refuse a missing or broken model now, with one line, rather than in a restart loop of workers;
        # the router sends each complete study to the models whose route it fits.
        router = check_configured_models(self.settings)
        if router is None and self.settings.models:  # workers = 0: nothing runs, but studies are still routed
            router = ModelRouter.from_settings(self.settings)
        if router is not None:
            for route in router.routes:
                manifest = router.manifest(route.name)
                log.info("model name=%s package=%s version=%s threshold=%s priority=%d workers=%s", route.name,
                         manifest.name, manifest.version, manifest.threshold, route.priority,
                         route.workers or "shared")
        self._lock_fd = self.store.lock()
        self.audit = AuditTrail.for_settings(self.settings, process="serve")
        self.audit.application_activity(started=True, user=os_user())
        leftovers = self.store.prepare()
        if leftovers:
            log.info("spool.cleaned leftovers=%d reason='transfers interrupted before Success'", leftovers)
        self.engine = open_for_daemon(node.database_path)
        self.queue = queue = StudyQueue(self.engine)
        recovered = queue.recover_expired_leases(MAX_PROCESSING_ATTEMPTS, all_leases=True)
        resumed = queue.restart_stability_clocks()
        for model, count in queue.cancel_unconfigured([route.name for route in self.settings.routes()]).items():
            log.warning("model.unconfigured model=%s queued_tasks_cancelled=%d: no [[models]] entry has this name "
                        "any more; `triagenode queue retry UID --model %s` after configuring it again", model, count,
                        model)
        log.info(
            "node.starting data_dir=%s config=%r receiving_studies_resumed=%d leases_recovered=%d",
            node.data_dir,
            self.settings.source,
            resumed,
            len(recovered),
        )
        for destination in self.settings.destinations:
            log.info("destination name=%s ae_title=%s host=%s port=%d", destination.name, destination.ae_title,
                     destination.host, destination.port)
        if not self.settings.destinations:
            log.info("destination none: reports stay on the node (add [[destinations]] to send them)")
        self.receiver = StorageReceiver(self.settings, queue, self.store, self.audit)
        self.receiver.start()
        self._heartbeat = Heartbeat(self.engine)
        self._heartbeat.announce(node.ae_title, self.receiver.port)
        self._scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        stable = self.settings.study.stable_seconds
        # Without [[models]], every complete study goes to the one model, which says itself
        # whether it can read the study (not applicable, with an SR where the site wants one).
        routed = partial(queue.complete_stable_studies, router=router if self.settings.models else None)
        self._every(max(0.2, min(1.0, stable / 5)), "complete-stable-studies", routed, stable)
        self._every(HEARTBEAT_INTERVAL_S, "heartbeat", self._heartbeat.beat)
        if self.certificate is not None:
            self._check_certificate()
            self._every(CERTIFICATE_CHECK_INTERVAL_S, "certificate-expiry", self._check_certificate)
        if self.settings.inference.workers:
            self.workers = WorkerPool(self.settings, queue)
            self.workers.start()
            self._every(1, "watch-workers", self.workers.check)
        self._every(LEASE_CHECK_INTERVAL_S, "recover-expired-leases", self._recover_expired_leases)
        # Every run, whatever keep_days says: it also finishes a purge that was cut short. A keep_days
        # shorter than an hour (a test site) is swept within a tenth of it.
        self._retention = Retention(self.engine, node.data_dir, self.settings.storage.keep_days)
        keep_s = self.settings.storage.keep_days * 86400
        self._every(min(SWEEP_INTERVAL_S, max(1.0, keep_s / 10)) if keep_s else SWEEP_INTERVAL_S, "retention",
                    self._sweep)
        if self.settings.destinations:
            self.delivery = ReportDelivery(self.settings, ReportBook(self.engine), self.audit)
            self._every(1, "deliver-reports", self.delivery.run_due)
        self._scheduler.start()

    def _sweep(self) -> None:
        """Remove the studies final for longer than ``[storage] keep_days``, each with its Study Deleted message."""
        assert self._retention is not None and self.audit is not None
        self.audit.studies_purged(self._retention.purge_due())

    def _check_certificate(self) -> None:
        """Log the certificate once at start, and a warning each day from ``expiry_warning_days`` before it ends."""
        assert self.certificate is not None
        info, tls = self.certificate, self.settings.tls
        days = info.days_left()
        if days <= tls.expiry_warning_days:
            log.warning("tls.certificate_expiring subject=%r not_after=%s days_left=%.0f: install a renewed "
                        "certificate at %s and restart the node", info.subject, f"{info.not_after:%Y-%m-%d}", days,
                        tls.certificate)
        else:
            log.info("tls.certificate subject=%r issuer=%r not_after=%s days_left=%.0f", info.subject, info.issuer,
                     f"{info.not_after:%Y-%m-%d}", days)

    def _recover_expired_leases(self) -> None:
        """Expired leases of workers that are not alive go back to the queue (counted as interrupted runs)."""
        assert self.queue is not None
        alive = self.workers.alive() if self.workers is not None else []
        self.queue.recover_expired_leases(MAX_PROCESSING_ATTEMPTS, alive=alive)

    def _release_for_stop(self) -> None:
        """Studies a stop cut short go back to the queue now, not counted as interrupted runs."""
        assert self.queue is not None
        try:
            released = self.queue.release_for_stop()
        except SQLAlchemyError as exc:  # the next start recovers them (counted) instead
            log.warning("node.leases_not_released error=%s", type(exc).__name__)
            return
        if released:
            log.info("node.leases_released studies=%d reason='stopped mid-study; processed again at the next start'",
                     len(released))

    def _every(self, seconds: float, job_id: str, function: Callable[..., object], *args: object) -> None:
        assert self._scheduler is not None
        self._scheduler.add_job(_ScheduledJob(job_id, function, args), "interval", seconds=seconds, id=job_id)

    def stop(self) -> None:
        try:
            if self.workers is not None:
                self.workers.begin_stop()
            if self.receiver is not None:
                self.receiver.stop(self.settings.node.shutdown_grace_s)
            if self._scheduler is not None:
                self._scheduler.shutdown(wait=True)
            if self.delivery is not None:
                self.delivery.stop(5)  # a send cut off is repeated after the restart, with the same SR UID
        finally:
            # Workers are not daemonic (they own decoder processes): stop them whatever happened above.
            if self.workers is not None:
                self.workers.stop(self.settings.node.shutdown_grace_s)
                self._release_for_stop()
        if self._heartbeat is not None:
            try:
                self._heartbeat.stopped()
            except SQLAlchemyError as exc:  # a full disk or a locked database must not turn a stop into a crash
                log.warning("node.stop_not_recorded error=%s: `triagenode status` reads the lock instead",
                            type(exc).__name__)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        if self.engine is not None:
            self.engine.dispose()
            log.info("node.stopped")
        if self.audit is not None:
            self.audit.application_activity(started=False, user=os_user())
            self.audit.close()


class _ScheduledJob:
    """A scheduler job whose failing disk or database is one log line per spell, not a traceback a second.

    On a full disk or a database locked by someone else every job fails on
    every run until the administrator acts; the node keeps receiving what
    fits and answers the rest with a status, so the log must say what is
    wrong once, and once more when it is over.
    """

    def __init__(self, name: str, function: Callable[..., object], args: tuple[object, ...]) -> None:
        self._name, self._function, self._args = name, function, args
        self._failing_since: float | None = None

    def __call__(self) -> None:
        try:
            self._function(*self._args)
        except (SQLAlchemyError, OSError) as exc:
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                detail = str(getattr(exc, "orig", exc))
                log.error("job.failing job=%s error=%s detail=%r: retried every run; check the disk and "
                          "`triagenode status`", self._name, type(exc).__name__, detail)
            return
        except Exception as exc:  # a bug: once per spell with its traceback, not a traceback every run
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.error("job.failing job=%s error=%s: a bug in the node, retried every run; please report it",
                          self._name, type(exc).__name__, exc_info=True)
            return
        if self._failing_since is not None:
            log.info("job.recovered job=%s after_s=%.0f", self._name, time.monotonic() - self._failing_since)
            self._failing_since = None


def serve(settings: Settings) -> None:
    """Run the node in the foreground until SIGTERM or SIGINT."""
    os.umask(SERVICE_UMASK)  # what SQLite and the libraries create follows the node's file modes too
    stop_requested = threading.Event()
    received: list[signal.Signals] = []  # appended by the handler: no lock taken there
    stop_on_signals(stop_requested, on_signal=received.append)
    node = Node(settings)
    try:
        node.start()
        assert node.receiver is not None
        notify("READY=1", f"STATUS=listening on port {node.receiver.port} as {settings.node.ae_title}")
        while not stop_requested.wait(0.2):
            pass
        log.info("node.stopping signal=%s", received[0].name if received else "?")
        notify("STOPPING=1")
    finally:
        node.stop()
