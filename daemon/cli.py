"""``triagenode``: the admin CLI, a thin layer over config and storage.

Exit status: 0 done; 1 the command ran but the answer is "no" (unknown
study, receiver down, echo failed, database missing); 2 usage or
configuration error. Tables for people, ``--json`` for scripts.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from triagenode.config import ConfigError, Settings, load_settings, settings_as_dict
from triagenode.storage.database import DatabaseUnavailableError, open_for_cli
from triagenode.storage.filestore import DataDirInUseError, FileStore
from triagenode.storage.heartbeat import Heartbeat
from triagenode.storage.migrations import SchemaTooNewError
from triagenode.storage.models import StudyState
from triagenode.storage.overview import QueueOverview
from triagenode.storage.queue import StudyQueue, TransitionError, UnknownStudyError
from triagenode.storage.reports import NoReportError, ReportBook
from triagenode.storage.timeutil import iso, utcnow

EXIT_NO = 1
EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., Any])


def config_option(command: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        envvar="TRIAGENODE_CONFIG",
        help="TOML configuration file [default: /etc/triagenode/triagenode.toml if it exists, else embedded defaults].",
    )(command)


def json_option(command: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")(command)


def fail(message: str, code: int = EXIT_NO) -> NoReturn:
    click.echo(f"triagenode: {message}", err=True)
    sys.exit(code)


def settings_from(config_path: Path | None) -> Settings:
    try:
        return load_settings(config_path)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def overview_and_engine(settings: Settings) -> tuple[QueueOverview, Any]:
    try:
        engine = open_for_cli(settings.node.database_path)
    except DatabaseUnavailableError as exc:
        fail(str(exc))
    return QueueOverview(engine), engine


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    cells = [[("" if value is None else str(value)) for value in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(headers)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(value.ljust(w) for value, w in zip(row, widths, strict=True)).rstrip())


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{count} B"


def plural(count: int, singular: str, many: str | None = None) -> str:
    """``1 study``, ``2 studies``: counts an administrator reads, in words that agree."""
    return f"{count} {singular if count == 1 else (many or singular + 's')}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="triagenode")
def main() -> None:
    """Triage Node: receives studies over DICOM, queues them for AI triage, returns reports to the PACS."""


@main.command()
@config_option
@click.option("--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING"]))
def serve(config_path: Path | None, log_level: str) -> None:
    """Run the node in the foreground (logs to stderr; stops cleanly on SIGTERM)."""
    from triagenode.daemon.logs import configure_logging
    from triagenode.daemon.service import serve as run
    from triagenode.inference.model_package import ModelPackageError

    settings = settings_from(config_path)
    try:
        from triagenode.inference.model_package import check_configured_model  # the manifest only: no torch

        check_configured_model(settings)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    configure_logging(log_level)
    if settings.source == "embedded defaults":
        logging.getLogger("triagenode.service").info(
            "config.defaults reason='no config file' data_dir=%s", settings.node.data_dir
        )
    try:
        run(settings)
    except ModelPackageError as exc:  # a package that exists but is broken: the configuration names it
        fail(f"config error in {settings.source}: inference.model: {exc}", EXIT_USAGE)
    except (DataDirInUseError, SchemaTooNewError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(
            f"cannot start on {settings.node.host}:{settings.node.port} with data_dir {settings.node.data_dir}: "
            f"{exc.strerror or exc}; is another node running, or is [node].port or data_dir wrong?"
        )


@main.command()
@config_option
@json_option
def status(config_path: Path | None, as_json: bool) -> None:
    """Is the receiver up, how many studies are in each state, how much disk is free.

    Exits 1 when the receiver is not running, so monitoring can call it.
    """
    settings = settings_from(config_path)
    overview, engine = overview_and_engine(settings)
    now = utcnow()
    receiver = Heartbeat(engine).state(now)
    counts = overview.state_counts()
    oldest = overview.oldest_waiting()
    free = FileStore(settings.node.data_dir).free_bytes()
    destinations = destination_rows(settings, ReportBook(engine))
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
        if oldest:
            click.echo(f"oldest waiting: {oldest['study_uid']} (queued {human_duration(oldest['waiting_s'])} ago)")
        click.echo("studies:   " + "  ".join(f"{state} {count}" for state, count in counts.items()))
        if not destinations:
            click.echo("reports:   no destinations configured (add [[destinations]] to send reports to a PACS)")
        for index, d in enumerate(destinations):
            label = "reports:" if index == 0 else ""
            where = f"{d['ae_title']}@{d['host']}:{d['port']}" if d["configured"] else "no longer configured"
            click.echo(
                f"{label:11}{d['name']} {where}: {d['pending']} pending, {d['failed']} failed, {d['sent']} sent"
            )
    engine.dispose()
    if not receiver.running:
        sys.exit(EXIT_NO)


def destination_rows(settings: Settings, book: ReportBook) -> list[dict[str, Any]]:
    """Where reports go, with each destination's deliveries by state; ones only the database knows come last."""
    counts = book.destination_counts()
    rows = []
    for d in settings.destinations:
        c = counts.pop(d.name, None)
        rows.append(
            {"name": d.name, "ae_title": d.ae_title, "host": d.host, "port": d.port, "configured": True,
             "pending": c.pending if c else 0, "failed": c.failed if c else 0, "sent": c.sent if c else 0}
        )  # fmt: skip
    for name, c in sorted(counts.items()):
        rows.append(
            {"name": name, "ae_title": None, "host": None, "port": None, "configured": False,
             "pending": c.pending, "failed": c.failed, "sent": c.sent}
        )  # fmt: skip
    return rows


@main.group()
def queue() -> None:
    """List, inspect, retry and cancel studies."""


OUTCOME_WORDS = {"present": "present", "absent": "absent", "not applicable": "n/a"}
"""``outcome`` as the RESULT column shows it; '-' for a study without a result yet."""


@queue.command("ls")
@config_option
@json_option
@click.option("--state", type=click.Choice([s.value for s in StudyState]), help="Only studies in this state.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000), help="At most this many.")
def queue_ls(config_path: Path | None, as_json: bool, state: str | None, limit: int) -> None:
    """Studies, most recently changed first."""
    settings = settings_from(config_path)
    overview, engine = overview_and_engine(settings)
    studies = overview.list_studies(StudyState(state) if state else None, limit)
    engine.dispose()
    if as_json:
        print_json(studies)
        return
    if not studies:
        click.echo("no studies" + (f" in state {state}" if state else ""))
        return
    print_table(
        [
            (s["study_uid"], s["state"], OUTCOME_WORDS.get(s["outcome"], "-"), s["modality"], s["study_date"],
             s["series"], s["instances"], s["updated_at"])
            for s in studies
        ],
        ["study uid", "state", "result", "modality", "date", "series", "instances", "updated"],
    )


@queue.command("show")
@config_option
@json_option
@click.argument("study_uid")
def queue_show(config_path: Path | None, as_json: bool, study_uid: str) -> None:
    """One study: its series, the AEs that sent it, the result, each destination's delivery and the history."""
    settings = settings_from(config_path)
    overview, engine = overview_and_engine(settings)
    try:
        details = overview.study_details(study_uid)
    except UnknownStudyError as exc:
        fail(str(exc))
    finally:
        engine.dispose()
    if as_json:
        print_json(details)
        return
    for label, key in (
        ("study", "study_uid"),
        ("state", "state"),
        ("modality", "modality"),
        ("study date", "study_date"),
        ("description", "description"),
        ("instances", "instances"),
        ("received", "received_at"),
        ("last instance", "last_instance_at"),
        ("updated", "updated_at"),
    ):
        click.echo(f"{label + ':':15}{details[key] if details[key] is not None else '-'}")
    click.echo(f"{'size:':15}{human_bytes(details['bytes'])}")
    click.echo(f"{'sent by:':15}{', '.join(details['calling_aets']) or '-'}")
    if details["lease_owner"]:
        click.echo(f"{'lease:':15}{details['lease_owner']} until {details['lease_expires_at']}")
    click.echo("")
    print_table(
        [
            (s["series_number"], s["modality"], s["instances"], s["description"], s["series_uid"])
            for s in details["series"]
        ],
        ["series", "modality", "instances", "description", "series uid"],
    )
    click.echo("")
    print_result(details["result"])
    print_deliveries(details["deliveries"], details["result"])
    click.echo("")
    print_table(
        [(e["at"], e["from"] or "-", e["to"], e["reason"]) for e in details["events"]],
        ["at", "from", "to", "reason"],
    )


def print_result(result: dict[str, Any] | None) -> None:
    """The model's answer for ``queue show``: finding, probability, threshold, key slice, timings, report."""
    if result is None:
        click.echo(f"{'result:':15}- (not processed yet)")
        return
    model = f"{result['model']} {result['model_version']}"
    if not result["applicable"]:
        click.echo(f"{'result:':15}not applicable: {result['reason']}")
        click.echo(f"{'model:':15}{model}")
    else:
        verdict = "PRESENT" if result["finding"] else "absent"
        click.echo(f"{'finding:':15}{verdict}")
        threshold = f" (threshold {result['threshold']:.3f})" if result["threshold"] is not None else ""
        click.echo(f"{'probability:':15}{result['probability']:.3f}{threshold}")
        click.echo(f"{'model:':15}{model}")
        click.echo(f"{'key slice:':15}{result['key_instance_uid'] or '-'}")
        if result.get("slices") is not None:
            click.echo(f"{'slices read:':15}{result['slices']} in series {result['series_uid']}")
    timings = result.get("timings_ms") or {}
    if timings:
        click.echo(f"{'timings:':15}" + ", ".join(f"{stage} {ms:.0f} ms" for stage, ms in timings.items()))
    click.echo(f"{'report (SR):':15}{result['sr_sop_instance_uid'] or '- (none for this study)'}")


def print_deliveries(deliveries: list[dict[str, Any]], result: dict[str, Any] | None) -> None:
    """Each destination's delivery for ``queue show``: state, attempts, next attempt, last error."""
    if not deliveries:
        if result is not None and result.get("sr_sop_instance_uid"):
            click.echo(f"{'deliveries:':15}none (no destinations were configured when it was reported)")
        return
    click.echo("")
    print_table(
        [
            (d["destination"], d["state"], d["attempts"], d["next_attempt_at"] or "-", d["sent_at"] or "-",
             d["last_error"] or "-")
            for d in deliveries
        ],  # fmt: skip
        ["destination", "state", "attempts", "next attempt", "sent", "last error"],
    )


def _change_study(config_path: Path | None, action: Callable[[StudyQueue], str | None], done: str) -> None:
    settings = settings_from(config_path)
    _, engine = overview_and_engine(settings)
    try:
        outcome = action(StudyQueue(engine))
    except (UnknownStudyError, TransitionError) as exc:
        fail(str(exc))
    finally:
        engine.dispose()
    click.echo(f"{done}: {outcome}" if outcome else done)


@queue.command("retry")
@config_option
@click.argument("study_uid")
def queue_retry(config_path: Path | None, study_uid: str) -> None:
    """Try a failed or cancelled study again (re-send its report, or process it again).

    A report about to be re-sent is first rebuilt in [inference] sr_sop_class when it was made in the other class.
    """
    settings = settings_from(config_path)
    _, engine = overview_and_engine(settings)
    try:
        rebuilt = None
        book = ReportBook(engine)
        try:
            state, _, _ = book.report_of(study_uid)
        except NoReportError:
            state = None
        if state == StudyState.FAILED:
            rebuilt = _rebuild(settings, book, study_uid)
        outcome = StudyQueue(engine).retry(study_uid)
    except (UnknownStudyError, TransitionError) as exc:
        fail(str(exc))
    finally:
        engine.dispose()
    if rebuilt:
        click.echo(f"{study_uid}: {rebuilt}")
    click.echo(f"{study_uid}: {outcome}")


def _rebuild(settings: Settings, book: ReportBook, study_uid: str) -> str | None:
    """The stored report in the configured SR class (see daemon.delivery.rebuild_report); fails with a line."""
    from triagenode.daemon.delivery import rebuild_report

    try:
        return rebuild_report(settings, book, study_uid)
    except ValueError as exc:
        fail(
            f"cannot rebuild the report of {study_uid} as [inference] sr_sop_class = "
            f"{settings.inference.sr_sop_class!r} asks: {exc}; set it back to send the stored report"
        )
    except OSError as exc:
        fail(
            f"cannot rebuild the report of {study_uid} in {settings.node.data_dir}: {exc.strerror or exc}; "
            "run the command as the service user (sudo -u triagenode ...)"
        )


@queue.command("resend")
@config_option
@click.argument("study_uid")
@click.option(
    "--destination", "destination_name", metavar="NAME", help="Only this destination [default: every destination]."
)
def queue_resend(config_path: Path | None, study_uid: str, destination_name: str | None) -> None:
    """Send a study's report again: to a PACS added later, or to one that lost it.

    For a reported, sent or failed study that has a report. The report is
    rebuilt first when [inference] sr_sop_class names the other SR class.
    The running node sends it within a second (or when it next starts).
    """
    settings = settings_from(config_path)
    configured = [d.name for d in settings.destinations]
    if not configured:
        fail(
            f"no destinations in {settings.source}: add a [[destinations]] table (name, ae_title, host, port) "
            "and restart the node",
            EXIT_USAGE,
        )
    if destination_name is not None and destination_name not in configured:
        fail(
            f"no destination {destination_name!r} in {settings.source}; configured: {', '.join(configured)} "
            "(`triagenode status` lists them)",
            EXIT_USAGE,
        )
    targets = [destination_name] if destination_name else configured
    _, engine = overview_and_engine(settings)
    book = ReportBook(engine)
    try:
        book.report_of(study_uid)  # unknown study or no report: say so before touching anything
        rebuilt = _rebuild(settings, book, study_uid)
        book.resend(study_uid, targets)
        running = Heartbeat(engine).state(utcnow()).running
    except (UnknownStudyError, NoReportError, TransitionError) as exc:
        fail(str(exc))
    finally:
        engine.dispose()
    if rebuilt:
        click.echo(f"{study_uid}: {rebuilt}")
    click.echo(f"{study_uid}: report scheduled for {', '.join(targets)}")
    if not running:
        click.echo("the node is not running: it sends the report when it starts (`triagenode status`)")


@queue.command("cancel")
@config_option
@click.argument("study_uid")
def queue_cancel(config_path: Path | None, study_uid: str) -> None:
    """Stop a study: it will not be processed or sent (its files stay)."""
    _change_study(config_path, lambda q: q.cancel(study_uid), f"{study_uid}: cancelled")


@main.command()
@config_option
@click.argument("target", metavar="AE@HOST:PORT")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for the peer.")
def echo(config_path: Path | None, target: str, timeout: float) -> None:
    """C-ECHO a DICOM peer (a destination, or the node itself) and print the round-trip time."""
    from triagenode.daemon.verification import EchoError, parse_peer, verify

    settings = settings_from(config_path)
    try:
        peer = parse_peer(target)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    try:
        elapsed = verify(peer, settings.node.ae_title, timeout)
    except EchoError as exc:
        fail(f"C-ECHO to {target} failed: {exc}")
    click.echo(f"C-ECHO {settings.node.ae_title} -> {target}: Success in {elapsed * 1000:.1f} ms")


@main.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@config_option
@json_option
def config_show(config_path: Path | None, as_json: bool) -> None:
    """The effective settings, after the file and the TRIAGENODE_* environment variables."""
    settings = settings_from(config_path)
    try:
        from triagenode.inference.model_package import check_configured_model  # the manifest only: no torch

        check_configured_model(settings)
    except ConfigError as exc:  # the settings parse, but serve would refuse them: say so, like serve
        fail(str(exc), EXIT_USAGE)
    data = settings_as_dict(settings)
    if as_json:
        print_json({"source": settings.source, **data})
        return
    click.echo(f"# effective settings; source: {settings.source} (+ TRIAGENODE_* environment variables)")
    for section in ("node", "study", "inference", "delivery"):
        click.echo(f"\n[{section}]")
        for key, value in data[section].items():
            click.echo(f"{key} = {json.dumps(value)}")
    for destination in data["destinations"]:
        click.echo("\n[[destinations]]")
        for key, value in destination.items():
            click.echo(f"{key} = {json.dumps(value)}")


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--studies", default=10, show_default=True, type=click.IntRange(1), help="How many studies.")
@click.option("--positive-fraction", default=0.5, show_default=True, type=click.FloatRange(0, 1))
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same studies (pixels and UIDs).")
@click.option("--slices", default=64, show_default=True, type=click.IntRange(8, 2000))
@click.option("--matrix", default=256, show_default=True, type=click.IntRange(64, 1024))
def phantom(out_dir: Path, studies: int, positive_fraction: float, seed: int, slices: int, matrix: int) -> None:
    """Write synthetic chest CT studies (real DICOM, one folder each) and labels.csv.

    Positive studies carry 1-3 lung nodules of 4-25 mm; labels.csv gives each
    study's label and its nodules' positions and diameters. For tests, demos
    and training the demo model; not patient data.
    """
    from triagenode.inference.phantom import LABELS_FILE, write_phantoms

    written = write_phantoms(out_dir, studies, positive_fraction, seed, slices, matrix)
    positives = sum(study.label for study in written)
    click.echo(f"wrote {plural(len(written), 'study', 'studies')} ({positives} positive) and {out_dir / LABELS_FILE}")


@main.group()
def model() -> None:
    """Train, evaluate and inspect model packages (*.tnm)."""


@model.command("info")
@click.argument("package", metavar="FILE")
@json_option
def model_info(package: str, as_json: bool) -> None:
    """Print a model package's manifest (FILE may be 'demo')."""
    from triagenode.inference.model_package import DEMO_MODEL, ModelPackageError, read_manifest

    try:
        manifest = read_manifest(DEMO_MODEL if package == "demo" else Path(package))
    except ModelPackageError as exc:
        fail(str(exc))
    data = manifest.to_dict()
    if as_json:
        print_json(data)
        return
    click.echo(f"{manifest.name} {manifest.version} ({manifest.architecture}, created {manifest.created_at})")
    spec = manifest.input
    click.echo(
        f"input:      {spec.modality}, {spec.normalisation} {list(spec.window)}, {spec.matrix}x{spec.matrix}, "
        f"{spec.channels} channel(s), spacing {spec.pixel_spacing_mm or 'whole field of view'}"
    )
    click.echo(
        f"finding:    {manifest.finding.meaning} ({manifest.finding.scheme} {manifest.finding.value}), "
        f"threshold {manifest.threshold}, aggregation {manifest.aggregation}"
    )
    click.echo(f"training:   {json.dumps(manifest.training)}")
    click.echo(f"evaluation: {json.dumps(manifest.evaluation) if manifest.evaluation else 'none recorded'}")
    click.echo(f"sha256:     {manifest.weights_sha256}")
    click.echo(f"intended use: {manifest.intended_use or '-'}")


@model.command("train")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--labels", "labels_csv", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--arch", default="simplecnn", show_default=True, type=click.Choice(["simplecnn", "resnet18", "densenet121"])
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="The package to write (*.tnm)."
)
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--optimizer", default="adam", show_default=True, type=click.Choice(["adam", "sgd"]))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option(
    "--val-fraction", default=0.25, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True)
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--matrix", default=128, show_default=True, type=click.IntRange(32, 1024), help="Input size.")
@click.option(
    "--slice-context", default=1, show_default=True, type=click.IntRange(0, 5), help="Neighbours as channels."
)
@click.option(
    "--patience",
    default=6,
    show_default=True,
    type=click.IntRange(1),
    help="Early stop after N epochs without a better validation AUC.",
)
@click.option("--slices-per-epoch", default=None, type=click.IntRange(1), help="Cap on slices drawn per epoch.")
@click.option("--name", default="lung-nodule-triage", show_default=True)
@click.option("--version", "model_version", default="0.1.0", show_default=True)
@click.option("--intended-use", default="", help="Text stored in the manifest.")
@click.option(
    "--resume", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="Checkpoint (*.ckpt) to go on from."
)
def model_train(
    data_dir: Path,
    labels_csv: Path,
    arch: str,
    out: Path,
    epochs: int,
    batch_size: int,
    optimizer: str,
    lr: float,
    val_fraction: float,
    seed: int,
    device: str,
    matrix: int,
    slice_context: int,
    patience: int,
    slices_per_epoch: int | None,
    name: str,
    model_version: str,
    intended_use: str,
    resume: Path | None,
) -> None:
    """Train a CNN on labelled studies and write a model package.

    Writes OUT, OUT.ckpt (after every epoch, for --resume) and OUT.log.jsonl (one line per epoch).
    """
    from triagenode.inference.preprocessing import InputSpec
    from triagenode.inference.device import DeviceError
    from triagenode.inference.training import TrainingConfig, TrainingError, train

    config = TrainingConfig(
        data_dir=data_dir,
        labels=labels_csv,
        out=out,
        arch=arch,
        input=InputSpec(matrix=matrix, slice_context=slice_context),
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
        patience=patience,
        name=name,
        version=model_version,
        intended_use=intended_use,
        resume=resume,
        slices_per_epoch=slices_per_epoch,
    )
    try:
        train(config, log=lambda line: click.echo(line, err=True))
    except (TrainingError, DeviceError, ValueError) as exc:
        fail(str(exc))


@model.command("evaluate")
@click.option("--model", "package", required=True, help="Model package (*.tnm) or 'demo'.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--labels", "labels_csv", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write metrics.json, roc.png, confusion.png here.",
)
@click.option("--target-sensitivity", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--device", default="auto", show_default=True)
@click.option("--record", is_flag=True, help="Store this evaluation in the package's manifest.")
@json_option
def model_evaluate(
    package: str,
    data_dir: Path,
    labels_csv: Path,
    out_dir: Path | None,
    target_sensitivity: float,
    device: str,
    record: bool,
    as_json: bool,
) -> None:
    """Measure a model on labelled local studies: accuracy, sensitivity, specificity, PPV, NPV, F1, ROC AUC."""
    from triagenode.inference.evaluation import EvaluationError, evaluate
    from triagenode.inference.model_package import ModelPackageError, load_package
    from triagenode.inference.device import DeviceError, resolve_device

    try:
        loaded = load_package(package)
        report = evaluate(
            loaded,
            data_dir,
            labels_csv,
            out_dir,
            target_sensitivity,
            resolve_device(device),
            record,
            log=(lambda line: click.echo(line, err=True)) if as_json else click.echo,
        )
    except (ModelPackageError, EvaluationError, DeviceError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        print_json(report)


@main.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@config_option
@click.option("--model", "model_path", help="Model package or 'demo' [default: [inference].model].")
@click.option("--device", help="auto, cpu, cuda or cuda:N [default: [inference].device].")
@click.option(
    "--sr-out", type=click.Path(path_type=Path), help="Write the report: a file for one study, else a folder."
)
@json_option
def infer(
    config_path: Path | None, path: Path, model_path: str | None, device: str | None, sr_out: Path | None, as_json: bool
) -> None:
    """Run the model on DICOM files (a folder or one file) without a daemon and print the result per study.

    The same series selection, preprocessing and aggregation as the node's workers, so the
    number matches what the node reports. Exits 1 when a study could not be read.
    """
    from triagenode.inference.model_package import ModelPackageError, load_package
    from triagenode.inference.pipeline import NotApplicable, SeriesGeometryError, files_by_study, run_study
    from triagenode.inference.device import DeviceError, resolve_device
    from triagenode.inference.report import report_for

    settings = settings_from(config_path)
    inference = settings.inference
    try:
        package = load_package(model_path or inference.model)
        torch_device = resolve_device(device or inference.device)
    except (ModelPackageError, DeviceError) as exc:
        fail(str(exc))
    studies = files_by_study(path)
    if not studies:
        fail(f"no DICOM files with a Study Instance UID under {path}")
    package.network.to(torch_device)
    results: list[dict[str, Any]] = []
    failed = False
    for study_uid, files in studies.items():
        try:
            outcome = run_study(package, study_uid, files, torch_device, inference.batch_size)
        except SeriesGeometryError as exc:
            results.append({"study_uid": study_uid, "status": "failed", "reason": str(exc)})
            failed = True
            continue
        if isinstance(outcome, NotApplicable):
            entry: dict[str, Any] = {"study_uid": study_uid, "status": "not applicable", "reason": outcome.reason}
        else:
            entry = {"status": "reported", **outcome.to_dict()}
        report = report_for(outcome, package.manifest, inference, settings.node.ae_title) if sr_out else None
        if sr_out is not None and report is not None:
            target = sr_out / f"{study_uid}.dcm" if len(studies) > 1 or sr_out.is_dir() else sr_out
            target.parent.mkdir(parents=True, exist_ok=True)
            report.save_as(target, enforce_file_format=True)
            entry["sr"] = {"path": str(target), "sop_instance_uid": str(report.SOPInstanceUID)}
        results.append(entry)
    if as_json:
        print_json(results)
    else:
        for entry in results:
            written = f"; report {entry['sr']['path']}" if "sr" in entry else ""
            if entry["status"] != "reported":
                click.echo(f"{entry['study_uid']}: {entry['status']}: {entry['reason']}{written}")
                continue
            verdict = "PRESENT" if entry["finding"] else "absent"
            click.echo(
                f"{entry['study_uid']}: {package.manifest.finding.meaning.lower()} {verdict}, probability "
                f"{entry['probability']:.3f} (threshold {entry['threshold']:.3f}), "
                f"key slice {entry['key_instance_uid']}, {plural(entry['slices'], 'slice')}, "
                f"{entry['timings_ms']['total']:.0f} ms{written}"
            )
    if failed:
        sys.exit(EXIT_NO)
