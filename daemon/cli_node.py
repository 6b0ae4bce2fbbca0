"""``triagenode serve``, ``status`` and ``echo``: run the node, ask whether it runs, check a DICOM peer.

Imports only click at the top: ``status`` reads the queue with plain
``sqlite3`` (no SQLAlchemy), ``echo`` pays for pynetdicom when it
associates, ``serve`` for the whole node; ``--help`` for none of them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from triagenode.daemon.cli_shared import (
    EXIT_NO,
    EXIT_USAGE,
    config_option,
    fail,
    human_bytes,
    human_duration,
    json_option,
    print_json,
    settings_from,
    settings_to_serve,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from triagenode.config import Settings
    from triagenode.storage.snapshot import DestinationCounts


@click.command()
@config_option
@click.option("--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING"]))
def serve(config_path: Path | None, log_level: str) -> None:
    """Run the node in the foreground (logs to stderr; stops cleanly on SIGTERM)."""
    import logging

    from triagenode.daemon.logs import configure_logging
    from triagenode.daemon.service import serve as run
    from triagenode.daemon.tls import TlsSetupError
    from triagenode.inference.model_package import ModelPackageError
    from triagenode.storage.filestore import DataDirInUseError, UnsafeDataDirError
    from triagenode.storage.migrations import SchemaTooNewError

    settings = settings_to_serve(config_path)
    configure_logging(log_level)
    if settings.source == "embedded defaults":
        logging.getLogger("triagenode.service").info(
            "config.defaults reason='no config file' data_dir=%s", settings.node.data_dir
        )
    try:
        run(settings)
    except ModelPackageError as exc:  # a package that exists but is broken: the configuration names it
        fail(f"config error in {settings.source}: inference.model: {exc}", EXIT_USAGE)
    except (DataDirInUseError, SchemaTooNewError, TlsSetupError, UnsafeDataDirError) as exc:
        fail(str(exc))
    except OSError as exc:
        ports = [str(port) for port in (settings.node.port, settings.tls.port) if port]
        fail(
            f"cannot start on {settings.node.host}:{'/'.join(ports)} with data_dir {settings.node.data_dir}: "
            f"{exc.strerror or exc}; is another node running, or is [node] port, [tls] port or data_dir wrong?"
        )


@click.command()
@config_option
@json_option
def status(config_path: Path | None, as_json: bool) -> None:
    """Is the receiver up, how many studies are in each state, how much disk is free.

    Exits 1 when the receiver is not running, so monitoring can call it.
    """
    from triagenode.storage.filestore import FileStore
    from triagenode.storage.snapshot import DatabaseUnavailableError, read_snapshot
    from triagenode.storage.timeutil import iso, utcnow

    settings = settings_from(config_path)
    now = utcnow()
    try:
        # Plain sqlite3, not the ORM: a monitoring probe runs this every minute and waits for it.
        snapshot = read_snapshot(settings.node.database_path, now)
    except DatabaseUnavailableError as exc:
        fail(str(exc))
    receiver, counts = snapshot.receiver, snapshot.counts
    oldest = snapshot.oldest_waiting.as_dict() if snapshot.oldest_waiting else None
    free = FileStore(settings.node.data_dir).free_bytes()
    destinations = destination_rows(settings, snapshot.destinations)
    uptime = receiver.uptime_s(now)
    data = {
        "receiver": {
            "running": receiver.running,
            "pid": receiver.pid if receiver.running else None,
            "ae_title": receiver.ae_title or settings.node.ae_title,
            "port": receiver.port or settings.node.port,
            "started_at": iso(receiver.started_at) if receiver.running else None,
            "uptime_s": round(uptime, 1) if uptime is not None else None,
            "last_heartbeat_at": iso(receiver.heartbeat_at),
        },
        "counts": counts,
        "oldest_waiting": oldest,
        "disk": {
            "data_dir": str(settings.node.data_dir),
            "free_bytes": free,
            "min_free_bytes": settings.node.min_free_disk_mb * 1024 * 1024,
        },
        "destinations": destinations,
        "tasks": snapshot.tasks,
        "paused_models": sorted(snapshot.paused),
        "tls": tls_status(settings),
    }
    if as_json:
        print_json(data)
    else:
        if receiver.running:
            click.echo(
                f"receiver:  running, pid {receiver.pid}, {receiver.ae_title} on port {receiver.port}, "
                f"up {human_duration(uptime or 0)}"
            )
        else:
            seen = f" (last seen {iso(receiver.heartbeat_at)})" if receiver.heartbeat_at else ""
            click.echo(f"receiver:  NOT running{seen}")
        low = " (BELOW the floor: C-STOREs are refused)" if free < data["disk"]["min_free_bytes"] else ""
        click.echo(f"disk free: {human_bytes(free)} in {settings.node.data_dir}{low}")
        tls = data["tls"]
        if tls is not None:
            if "error" in tls:
                click.echo(f"tls:       port {tls['port']}, certificate UNREADABLE: {tls['error']}")
            else:
                soon = " (RENEW IT SOON)" if tls["days_left"] <= settings.tls.expiry_warning_days else ""
                click.echo(f"tls:       port {tls['port']}, {tls['subject']}, expires {tls['not_after'][:10]} "
                           f"(in {tls['days_left']:.0f} days){soon}")
        if oldest:
            click.echo(f"oldest waiting: {oldest['study_uid']} (queued {human_duration(oldest['waiting_s'])} ago)")
        click.echo("studies:   " + "  ".join(f"{state} {count}" for state, count in counts.items()))
        if snapshot.paused:
            click.echo(f"paused:    {', '.join(sorted(snapshot.paused))} (their tasks wait; `triagenode model resume`)")
        if not destinations:
            click.echo("reports:   no destinations configured (add [[destinations]] to send reports to a PACS)")
        for index, d in enumerate(destinations):
            label = "reports:" if index == 0 else ""
            where = f"{d['ae_title']}@{d['host']}:{d['port']}" if d["configured"] else "no longer configured"
            click.echo(
                f"{label:11}{d['name']} {where}: {d['pending']} pending, {d['failed']} failed, {d['sent']} sent"
            )
    if not receiver.running:
        sys.exit(EXIT_NO)


def tls_status(settings: Settings) -> dict[str, Any] | None:
    """The TLS port and the node's certificate (subject, issuer, expiry), or None without ``[tls]``."""
    if not settings.tls.enabled or settings.tls.certificate is None:
        return None
    from triagenode.daemon.tls import TlsSetupError, read_certificate

    try:
        info = read_certificate(settings.tls.certificate)
    except TlsSetupError as exc:
        return {"port": settings.tls.port, "error": str(exc)}
    return {
        "port": settings.tls.port,
        "subject": info.subject,
        "issuer": info.issuer,
        "not_after": info.not_after.isoformat(),
        "days_left": round(info.days_left(), 1),
        "sha256": info.sha256,
        "mutual": settings.tls.require_client_certificate,
    }


def destination_rows(settings: Settings, known: Mapping[str, DestinationCounts]) -> list[dict[str, Any]]:
    """Where reports go, with each destination's deliveries by state; ones only the database knows come last."""
    counts = dict(known)
    rows = []
    for d in settings.destinations:
        c = counts.pop(d.name, None)
        rows.append(
            {"name": d.name, "ae_title": d.ae_title, "host": d.host, "port": d.port, "configured": True,
             "pending": c.pending if c else 0, "failed": c.failed if c else 0, "sent": c.sent if c else 0}
        )
    for name, c in sorted(counts.items()):
        rows.append(
            {"name": name, "ae_title": None, "host": None, "port": None, "configured": False,
             "pending": c.pending, "failed": c.failed, "sent": c.sent}
        )
    return rows


@click.command()
@config_option
@click.argument("target", metavar="AE@HOST:PORT")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for the peer.")
@click.option(
    "--tls", "use_tls", is_flag=True,
    help="Over DICOM TLS: the peer's certificate and host name checked against [tls] ca_certificates (else the "
    "system's trust store); the node's [tls] certificate shown to a peer that asks for one.",
)
def echo(config_path: Path | None, target: str, timeout: float, use_tls: bool) -> None:
    """C-ECHO a DICOM peer (a destination, or the node itself) and print the round-trip time."""
    from triagenode.daemon.verification import EchoError, parse_peer, verify

    settings = settings_from(config_path)
    try:
        peer = parse_peer(target)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    context = None
    if use_tls:
        from triagenode.config.settings import Destination
        from triagenode.daemon.tls import client_context

        try:
            context = client_context(Destination(name="echo", ae_title=peer.ae_title, host=peer.host,
                                                 port=peer.port, tls=True), settings.tls)
        except (OSError, ValueError) as exc:
            fail(f"the [tls] files in {settings.source} cannot be loaded: {exc}")
    try:
        elapsed = verify(peer, settings.node.ae_title, timeout, context)
    except EchoError as exc:
        fail(f"C-ECHO to {target} failed: {exc}")
    over = " over TLS" if use_tls else ""
    click.echo(f"C-ECHO {settings.node.ae_title} -> {target}{over}: Success in {elapsed * 1000:.1f} ms")
