"""``triagenode queue``: list, inspect, prioritize, retry, re-send, cancel and purge studies (and their models' tasks).

Each command opens the queue database through :func:`open_queue` (closed
however the command ends) and imports the storage layer, with SQLAlchemy,
only when it runs: ``--help`` and the other groups never pay for it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from triagenode.daemon.cli_shared import (
    EXIT_NO,
    EXIT_USAGE,
    LazyChoice,
    audit_action,
    cli_audit_trail,
    config_option,
    fail,
    human_bytes,
    json_option,
    open_queue,
    plural,
    print_json,
    print_table,
    settings_from,
)

if TYPE_CHECKING:
    from triagenode.config import Settings
    from triagenode.storage.queue import StudyQueue
    from triagenode.storage.reports import ReportBook


def _study_states() -> list[str]:
    """The values ``--state`` accepts: the queue's own states (imported when the option is parsed or shown)."""
    from triagenode.storage.states import StudyState

    return [s.value for s in StudyState]


@click.group()
def queue() -> None:
    """List, inspect, retry, cancel and purge studies."""


OUTCOME_WORDS = {"present": "present", "absent": "absent", "not applicable": "n/a"}
"""``outcome`` as the RESULT column shows it; '-' for a study without a result yet."""


@queue.command("ls")
@config_option
@json_option
@click.option("--state", type=LazyChoice(_study_states), help="Only studies in this state.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000), help="At most this many.")
@click.option("--model", metavar="NAME", help="Only studies with a task for this model.")
def queue_ls(config_path: Path | None, as_json: bool, state: str | None, limit: int, model: str | None) -> None:
    """Studies, most recently changed first, with each model's task and result."""
    from triagenode.storage.models import StudyState
    from triagenode.storage.overview import QueueOverview

    settings = settings_from(config_path)
    with open_queue(settings) as engine:
        studies = QueueOverview(engine).list_studies(StudyState(state) if state else None, limit, model)
    if as_json:
        print_json(studies)
        return
    if not studies:
        click.echo("no studies" + (f" in state {state}" if state else "") + (f" for model {model}" if model else ""))
        return
    print_table(
        [
            (s["study_uid"], s["state"], OUTCOME_WORDS.get(s["outcome"], "-"), s["modality"], s["study_date"],
             s["series"], s["instances"], s["updated_at"], _tasks_cell(s["tasks"], s["urgent"]))
            for s in studies
        ],
        ["study uid", "state", "result", "modality", "date", "series", "instances", "updated", "tasks"],
    )


def _tasks_cell(tasks: list[dict[str, Any]], urgent: bool) -> str:
    """``lung:sent/present mammo:queued``: each model's task, with its result once there is one."""
    cells = [
        f"{t['model']}:{t['state']}" + (f"/{OUTCOME_WORDS[t['outcome']]}" if t["outcome"] else "") for t in tasks
    ]
    return " ".join((["STAT"] if urgent else []) + cells) or "-"


@queue.command("show")
@config_option
@json_option
@click.argument("study_uid")
def queue_show(config_path: Path | None, as_json: bool, study_uid: str) -> None:
    """One study: its series, the AEs that sent it, the result, each destination's delivery and the history."""
    from triagenode.storage.overview import QueueOverview
    from triagenode.storage.queue import UnknownStudyError

    settings = settings_from(config_path)
    with open_queue(settings) as engine:
        try:
            details = QueueOverview(engine).study_details(study_uid)
        except UnknownStudyError as exc:
            fail(str(exc))
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
    if details["urgent"]:
        click.echo(f"{'priority:':15}urgent (STAT): its tasks go first")
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
    if details["routing"]:
        click.echo("")
        print_table(
            [(r["model"], "yes" if r["matched"] else "no", r["reason"]) for r in details["routing"]],
            ["model", "routed", "why"],
        )
    if not details["tasks"]:
        click.echo("")
        if details["routing"] and details["state"] == "reported":
            click.echo(f"{'result:':15}no model applies (see why above); nothing more will happen")
        else:
            print_result(None)
    for task in details["tasks"]:
        click.echo("")
        click.echo(f"{'task:':15}{task['model']}: {task['state']}, {task['attempts']} interrupted run(s)")
        print_result(task["result"], task["report_objects"])
        print_deliveries(task["deliveries"], task["result"])
    click.echo("")
    print_table(
        [(e["at"], e["model"] or "-", e["from"] or "-", e["to"], e["reason"]) for e in details["events"]],
        ["at", "model", "from", "to", "reason"],
    )


def print_result(result: dict[str, Any] | None, objects: Sequence[dict[str, Any]] = ()) -> None:
    """The model's answer for ``queue show``: finding, probability, threshold, key slice, lesions, images not
    read, timings, and the report's objects (the primary SR, then those sent with it)."""
    from triagenode.storage.reports import class_name

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
    lesions, skipped = result.get("lesions") or [], result.get("skipped") or []
    if lesions:
        click.echo(f"{'lesions:':15}{len(lesions)} marked")
        for number, lesion in enumerate(lesions, 1):
            click.echo(f"  lesion {number}: {lesion_line(lesion)}")
    for segment in result.get("segments") or []:
        click.echo(f"{'segment:':15}{segment['label']}: {segment['volume_ml']:.2f} ml ({segment['voxels']} voxels, "
                   f"mean probability {segment['certainty']:.3f})")
    if skipped:
        click.echo(f"{'not read:':15}{len(skipped)} image(s)")
        for reason in skipped:
            click.echo(f"  {reason}")
    timings = result.get("timings_ms") or {}
    if timings:
        click.echo(f"{'timings:':15}" + ", ".join(f"{stage} {ms:.0f} ms" for stage, ms in timings.items()))
    primary = next((o for o in objects if o["primary"]), None)
    kind = f" ({class_name(primary['sop_class_uid'])})" if primary and primary["sop_class_uid"] else ""
    click.echo(f"{'report:':15}{result['sr_sop_instance_uid'] or '- (none for this study)'}{kind}")
    for extra in (o for o in objects if not o["primary"]):
        click.echo(f"{'  and:':15}{extra['sop_instance_uid']} ({class_name(extra['sop_class_uid'])})")


def lesion_line(lesion: dict[str, Any]) -> str:
    """``mass, L CC, box 120.0 88.5 160.0 130.0, certainty 0.913 (image 1.2.3)``: one mark, as ``queue show``
    prints it; the box is x0 y0 x1 y1 in the image's pixels, as the report's SCOORD has it."""
    where = " ".join(part for part in (lesion.get("laterality"), lesion.get("view")) if part)
    box = " ".join(f"{value:.1f}" for value in lesion["box"])
    return ", ".join(
        part
        for part in (lesion["type"], where, f"box {box}", f"certainty {lesion['certainty']:.3f}")
        if part
    ) + f" (image {lesion['sop_instance_uid']})"


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
        ],
        ["destination", "state", "attempts", "next attempt", "sent", "last error"],
    )


MODEL_OPTION = click.option("--model", metavar="NAME", help="Only this model's task [default: every task].")


def _change_study(
    config_path: Path | None, action: Callable[[StudyQueue], str | None], done: str, audited: tuple[str, str]
) -> None:
    """Apply one state change through the queue's own rules; an unknown study or a refused change is exit 1.

    ``audited`` is (the command, the study's UID): a change made is recorded in the audit trail.
    """
    from triagenode.storage.queue import StudyQueue, TransitionError, UnknownStudyError

    settings = settings_from(config_path)
    with open_queue(settings) as engine:
        try:
            outcome = action(StudyQueue(engine))
        except (UnknownStudyError, TransitionError) as exc:
            fail(str(exc))
    command, study_uid = audited
    audit_action(settings, command, f"{done}: {outcome}" if outcome else done, study_uid)
    click.echo(f"{done}: {outcome}" if outcome else done)


@queue.command("retry")
@config_option
@click.argument("study_uid")
@MODEL_OPTION
def queue_retry(config_path: Path | None, study_uid: str, model: str | None) -> None:
    """Try a failed or cancelled study (or one model's task) again: re-send its report, or process it again.

    A report about to be re-sent is first rebuilt in [inference] sr_sop_class when it was made in the other class.
    """
    from triagenode.storage.queue import StudyQueue, TransitionError, UnknownStudyError
    from triagenode.storage.reports import NoReportError, ReportBook
    from triagenode.storage.states import TaskState

    settings = settings_from(config_path)
    rebuilt: list[str] = []
    with open_queue(settings) as engine:
        try:
            book = ReportBook(engine)
            for name in [model] if model else book.tasks_with_reports(study_uid):
                try:
                    state, _, _ = book.report_of(study_uid, name)
                except NoReportError:
                    continue
                if state == TaskState.FAILED and (sentence := _rebuild(settings, book, study_uid, name)):
                    rebuilt.append(sentence)
            outcome = StudyQueue(engine).retry(study_uid, model=model)
        except (UnknownStudyError, TransitionError) as exc:
            fail(str(exc))
    audit_action(settings, "queue retry", f"{outcome}" + (f" (model {model})" if model else ""), study_uid)
    for sentence in rebuilt:
        click.echo(f"{study_uid}: {sentence}")
    click.echo(f"{study_uid}: {outcome}")


@queue.command("prioritize")
@config_option
@click.argument("study_uid")
def queue_prioritize(config_path: Path | None, study_uid: str) -> None:
    """Mark a study urgent (as STAT in Requested Procedure Priority does): its tasks go before all others."""

    def mark(queue: StudyQueue) -> str:
        return "marked urgent" if queue.prioritize(study_uid) else "already urgent"

    _change_study(config_path, mark, study_uid, ("queue prioritize", study_uid))


def _rebuild(settings: Settings, book: ReportBook, study_uid: str, model: str | None = None) -> str | None:
    """The stored report in the configured SR class (see daemon.delivery.rebuild_report); fails with a line."""
    from triagenode.daemon.delivery import rebuild_report

    try:
        return rebuild_report(settings, book, study_uid, model)
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
@click.option("--model", metavar="NAME", help="Only this model's report [default: every report of the study].")
def queue_resend(config_path: Path | None, study_uid: str, destination_name: str | None, model: str | None) -> None:
    """Send a study's report again: to a PACS added later, or to one that lost it.

    For a reported, sent or failed study that has a report. The report is
    rebuilt first when [inference] sr_sop_class names the other SR class.
    The running node sends it within a second (or when it next starts).
    """
    from triagenode.storage.queue import TransitionError, UnknownStudyError
    from triagenode.storage.reports import NoReportError, ReportBook
    from triagenode.storage.snapshot import read_receiver_state
    from triagenode.storage.timeutil import utcnow

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
    routes = {route.name: route for route in settings.routes()}

    def targets(name: str | None) -> list[str]:
        """The named destination, else where the model's route sends its reports (all, unless it names some)."""
        route = routes.get(name or "")
        return [destination_name] if destination_name else list(route.destinations if route else ()) or configured

    rebuilt: list[str] = []
    scheduled: list[str] = []
    with open_queue(settings) as engine:
        book = ReportBook(engine)
        try:
            models: list[str | None] = [model] if model else list(book.tasks_with_reports(study_uid)) or [None]
            for name in models:  # unknown study, no report, nothing to re-send: say so before touching anything
                state, _, _ = book.report_of(study_uid, name)
                if state not in ("reported", "sent", "failed"):
                    raise TransitionError(f"study {study_uid}: the report of {name or 'its model'} is {state}; "
                                          "only reported, sent or failed ones can be re-sent")
            for name in models:
                if sentence := _rebuild(settings, book, study_uid, name):
                    rebuilt.append(sentence)
                sent_to = book.resend(study_uid, targets(name), model=name)
                scheduled.append(", ".join(sent_to) + (f" ({name})" if len(models) > 1 else ""))
        except (UnknownStudyError, NoReportError, TransitionError) as exc:
            fail(str(exc))
    audit_action(settings, "queue resend", f"report scheduled for {'; '.join(scheduled)}", study_uid)
    running = read_receiver_state(settings.node.database_path, utcnow()).running
    for sentence in rebuilt:
        click.echo(f"{study_uid}: {sentence}")
    click.echo(f"{study_uid}: report scheduled for {'; '.join(scheduled)}")
    if not running:
        click.echo("the node is not running: it sends the report when it starts (`triagenode status`)")


@queue.command("cancel")
@config_option
@click.argument("study_uid")
@MODEL_OPTION
def queue_cancel(config_path: Path | None, study_uid: str, model: str | None) -> None:
    """Stop a study (or one model's task): it will not be processed or sent (its files stay)."""
    done = f"{study_uid}: cancelled" + (f" for {model}" if model else "")
    _change_study(config_path, lambda q: q.cancel(study_uid, model=model), done, ("queue cancel", study_uid))


@queue.command("purge")
@config_option
@click.argument("study_uids", nargs=-1, required=True, metavar="STUDY_UID...")
def queue_purge(config_path: Path | None, study_uids: tuple[str, ...]) -> None:
    """Remove finished studies now: their files (instances, reports) and rows, as [storage] keep_days does in time.

    For a sent, failed or cancelled study, or a reported one with nothing left
    to send. A study still in work (receiving, queued, processing, a report on
    its way) is refused: cancel it first. Each study is purged or refused on
    its own; the exit status is 1 when any was refused. A purge cut short
    (the study stays "purging") is finished by running it again.
    """
    from triagenode.daemon.audit import AuditedStudy, os_user
    from triagenode.storage.queue import TransitionError, UnknownStudyError
    from triagenode.storage.retention import PurgeBusyError, Retention

    settings = settings_from(config_path)
    data_dir = settings.node.data_dir
    refused = False
    with open_queue(settings) as engine, cli_audit_trail(settings) as trail:
        retention = Retention(engine, data_dir, settings.storage.keep_days)
        for study_uid in dict.fromkeys(study_uids):  # each once, in the order given
            try:
                purged = retention.purge(study_uid)
            except (UnknownStudyError, TransitionError, PurgeBusyError) as exc:
                click.echo(f"triagenode: {exc}", err=True)
                refused = True
                continue
            except OSError as exc:
                # Some files may be gone already: the attempt is on record, failed; the purge that finishes
                # it records the deletion.
                trail.study_deleted(user=os_user(), study=AuditedStudy(study_uid=study_uid), success=False,
                                    reason=f"queue purge cut short: {exc.strerror or exc}")
                click.echo(
                    f"triagenode: cannot remove the files of {study_uid} in {data_dir}: {exc.strerror or exc}; run "
                    "the command as the service user (sudo -u triagenode ...); until a purge finishes it, the study "
                    "stays purging",
                    err=True,
                )
                refused = True
                continue
            trail.studies_purged([purged], user=os_user())
            resumed = ", finishing a purge that was cut short" if purged.resumed else ""
            click.echo(
                f"{study_uid}: purged ({plural(purged.instances, 'instance')}, "
                f"{plural(purged.reports_removed, 'report object')}, {human_bytes(purged.bytes_freed)} freed{resumed})"
            )
    if refused:
        sys.exit(EXIT_NO)
