"""``triagenode model ls``, ``model pause`` and ``model resume``: the node's configured models, seen and steered.

Apart from ``cli_model`` (the model lifecycle, which loads torch): these read
the configuration, the packages' manifests (no weights) and the queue, so
they start as fast as ``queue ls``. A pause lives in the queue database
(``model_pauses``), so it holds across restarts and every worker sees it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from triagenode.daemon.cli_shared import (
    EXIT_USAGE,
    audit_action,
    config_option,
    fail,
    json_option,
    open_queue,
    print_json,
    print_table,
    settings_from,
)

if TYPE_CHECKING:
    from triagenode.config.settings import ModelRoute, Settings


def route_text(route: ModelRoute) -> str:
    """A route's keys in one line (``any`` for a route that narrows nothing beyond its manifest)."""
    parts = []
    if route.modalities:
        parts.append("modality " + ",".join(route.modalities))
    if route.body_parts:
        parts.append("body part " + ",".join(route.body_parts))
    if route.series_description:
        parts.append(f"series /{route.series_description}/")
    if route.study_description:
        parts.append(f"study /{route.study_description}/")
    if route.calling_aets:
        parts.append("from " + ",".join(route.calling_aets))
    if route.destinations:
        parts.append("to " + ",".join(route.destinations))
    return "; ".join(parts) or "any study its model can read"


def model_rows(settings: Settings) -> list[dict[str, Any]]:
    """Every configured model with its package, version, route, priority, pause and tasks per state."""
    from triagenode.inference.model_package import ModelPackageError
    from triagenode.inference.routing import package_manifest
    from triagenode.storage.snapshot import DatabaseUnavailableError, read_snapshot
    from triagenode.storage.timeutil import iso, utcnow

    try:
        snapshot = read_snapshot(settings.node.database_path, utcnow())
        tasks, paused = snapshot.tasks, snapshot.paused
    except DatabaseUnavailableError:  # the node has not run yet: no tasks, nothing paused
        tasks, paused = {}, {}
    rows = []
    configured = {route.name for route in settings.routes()}
    for name in sorted(set(tasks) - configured):  # tasks left by a model renamed or removed since
        rows.append({"name": name, "package": None, "version": None, "problem": "no longer configured",
                     "route": "-", "priority": None, "workers": None, "paused": name in paused,
                     "paused_at": iso(paused[name]) if name in paused else None, "tasks": tasks[name]})
    for route in settings.routes():
        try:
            manifest = package_manifest(route.package)
            version: str | None = f"{manifest.name} {manifest.version}"
        except ModelPackageError as exc:
            version = None
            problem = str(exc)
        rows.append(
            {
                "name": route.name,
                "package": route.package,
                "version": version,
                "problem": None if version else problem,
                "route": route_text(route),
                "priority": route.priority,
                "workers": route.workers or "shared",
                "paused": route.name in paused,
                "paused_at": iso(paused[route.name]) if route.name in paused else None,
                "tasks": tasks.get(route.name, {}),
            }
        )
    return rows


def register(model: click.Group) -> None:
    """Add ``ls``, ``pause`` and ``resume`` to the ``model`` group."""
    model.add_command(model_ls)
    model.add_command(model_pause)
    model.add_command(model_resume)


@click.command("ls")
@config_option
@json_option
def model_ls(config_path: Path | None, as_json: bool) -> None:
    """The node's models: package, version, route, priority, paused or not, tasks per state."""
    rows = model_rows(settings_from(config_path))
    if as_json:
        print_json(rows)
        return
    print_table(
        [
            (
                r["name"] + (" (PAUSED)" if r["paused"] else ""),
                r["version"] or (r["problem"] if r["package"] is None else f"UNREADABLE: {r['problem']}"),
                r["priority"],
                r["workers"],
                " ".join(f"{state} {count}" for state, count in sorted(r["tasks"].items())) or "-",
                r["route"],
            )
            for r in rows
        ],
        ["model", "package", "priority", "workers", "tasks", "route"],
    )


def _set_pause(config_path: Path | None, name: str, paused: bool) -> bool:
    """Pause or resume a configured model in the queue; whether that changed anything. Unknown name: exit 2."""
    from triagenode.storage.queue import StudyQueue

    settings = settings_from(config_path)
    names = [route.name for route in settings.routes()]
    if name not in names:
        fail(f"no model {name!r} in {settings.source}; configured: {', '.join(names)} (`triagenode model ls`)",
             EXIT_USAGE)
    with open_queue(settings) as engine:
        queue = StudyQueue(engine)
        changed = queue.pause(name) if paused else queue.resume(name)
    if changed:
        audit_action(settings, f"model {'pause' if paused else 'resume'}", f"model {name}")
    return changed


@click.command("pause")
@config_option
@click.argument("name")
def model_pause(config_path: Path | None, name: str) -> None:
    """Stop a model taking new tasks (they wait, queued; the other models go on). Holds across restarts."""
    done = "paused" if _set_pause(config_path, name, True) else "already paused"
    click.echo(f"{name}: {done}; `triagenode model resume {name}` resumes it")


@click.command("resume")
@config_option
@click.argument("name")
def model_resume(config_path: Path | None, name: str) -> None:
    """Let a paused model take tasks again; its waiting tasks run in their turn."""
    click.echo(f"{name}: {'resumed' if _set_pause(config_path, name, False) else 'was not paused'}")
