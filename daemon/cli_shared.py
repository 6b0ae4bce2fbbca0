"""What every ``triagenode`` command group shares: options, exit codes, settings, the queue, output.

Kept to click and the standard library at import time. Every command module
imports this one, and ``triagenode --help`` imports every command module,
so anything heavy here (SQLAlchemy ~0.3 s, pynetdicom, torch) would be paid
by every command, even one that only prints help. Heavy modules are imported
inside the function that needs them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from triagenode.config import Settings
    from triagenode.daemon.audit import AuditTrail

EXIT_NO = 1
"""The command ran and the answer is no: unknown study, receiver down, echo failed, no database."""
EXIT_USAGE = 2
"""Usage or configuration error: fix the command line or the config file."""

F = TypeVar("F", bound=Callable[..., Any])


def config_option(command: F) -> F:
    """``--config PATH`` (or ``TRIAGENODE_CONFIG``), the same on every command that reads settings."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        envvar="TRIAGENODE_CONFIG",
        help="TOML configuration file [default: /etc/triagenode/triagenode.toml if it exists, else embedded defaults].",
    )(command)


def json_option(command: F) -> F:
    """``--json``: scripts get the same data as the table, in the shapes the README documents."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")(command)


def fail(message: str, code: int = EXIT_NO) -> NoReturn:
    """One line on stderr that says what to do next, and the documented exit status.

    ``sys.exit`` unwinds through ``with`` blocks, so :func:`open_queue` still
    closes the database when a command fails inside it.
    """
    click.echo(f"triagenode: {message}", err=True)
    sys.exit(code)


def settings_from(config_path: Path | None) -> Settings:
    """The effective settings, or exit 2 with the loader's one line naming the key and the file."""
    from triagenode.config import ConfigError, load_settings

    try:
        return load_settings(config_path)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def settings_to_serve(config_path: Path | None) -> Settings:
    """The settings ``serve`` would run with, or exit 2: a missing or broken model package is a configuration
    error too (``serve`` and ``config show`` say the same). Reads the package's manifest only: no torch."""
    from triagenode.config import ConfigError
    from triagenode.inference.routing import check_configured_models

    settings = settings_from(config_path)
    try:
        check_configured_models(settings)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    return settings


@contextmanager
def open_queue(settings: Settings) -> Iterator[Engine]:
    """The node's queue database for one command, closed however the command ends.

    Never creates the database (see ``storage.database.open_for_cli``): a
    missing or too old one is exit 1 with what to do. SQLAlchemy is imported
    here, not at the top, so commands that never touch the queue start fast.
    """
    from triagenode.storage.database import DatabaseUnavailableError, open_for_cli

    try:
        engine = open_for_cli(settings.node.database_path)
    except DatabaseUnavailableError as exc:
        fail(str(exc))
    try:
        yield engine
    finally:
        engine.dispose()


def audit_action(settings: Settings, action: str, detail: str, study_uid: str | None = None) -> None:
    """Record an administrator's change (``queue retry``, ``model pause``...) in the audit trail, with the OS user.

    The study is named by its UID and, where an instance of it is still stored, its patient
    (as the audit trail requires; never printed). A CLI user who cannot write the audit
    files gets the audit trail's own warning, and the command still does its work: the
    change is made either way, so refusing it for the record's sake would help no one.
    """
    from triagenode.daemon.audit import AuditedStudy, os_user

    with cli_audit_trail(settings) as trail:
        study = AuditedStudy(study_uid=study_uid, **patient_of(settings, study_uid)) if study_uid else None
        trail.administrative_action(user=os_user(), action=action, study=study, detail=detail)


@contextmanager
def cli_audit_trail(settings: Settings) -> Iterator[AuditTrail]:
    """The audit trail for one command, closed (its repository messages sent) however the command ends."""
    from triagenode.daemon.audit import AuditTrail

    trail = AuditTrail.for_settings(settings, process="triagenode-cli")
    try:
        yield trail
    finally:
        trail.close()


def patient_of(settings: Settings, study_uid: str) -> dict[str, str]:
    """The patient of a study as its first readable stored instance names it (for the audit trail)."""
    from triagenode.storage.retention import patient_in

    try:
        files = sorted((settings.node.data_dir / "studies" / study_uid).glob("*/*.dcm"))
    except OSError:  # a CLI user who may not read the store
        files = []
    patient_id, patient_name, accession = patient_in(files)
    return {"patient_id": patient_id, "patient_name": patient_name, "accession_number": accession}


class LazyChoice(click.Choice):
    """A :class:`click.Choice` whose values are loaded when first needed (parsing, or the option's help).

    The queue's states live in ``storage.models``, which imports SQLAlchemy;
    building ``--state``'s choices when the command module is imported would
    make ``triagenode --help`` pay for it.
    """

    def __init__(self, load: Callable[[], Iterable[str]]) -> None:
        self._load = load
        self._loaded: tuple[str, ...] | None = None
        self.case_sensitive = True

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        if self._loaded is None:
            self._loaded = tuple(self._load())
        return self._loaded


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    """Left-aligned columns as wide as their widest cell; an empty cell for None."""
    cells = [[("" if value is None else str(value)) for value in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(headers)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(value.ljust(w) for value, w in zip(row, widths, strict=True)).rstrip())


def human_duration(seconds: float) -> str:
    """``3d 4h``, ``2h 5m``, ``1m 30s``, ``12s``: the two units a person reads at a glance."""
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
    """``512 B``, ``1.5 GiB``: sizes in binary units, as ``df -h`` shows them."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{count} B"


def plural(count: int, singular: str, many: str | None = None) -> str:
    """``1 study``, ``2 studies``: counts an administrator reads, in words that agree."""
    return f"{count} {singular if count == 1 else (many or singular + 's')}"
