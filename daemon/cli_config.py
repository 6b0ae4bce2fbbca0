"""``triagenode config show``: the effective settings, as the node would run with them."""

from __future__ import annotations

import json
from pathlib import Path

import click

from triagenode.daemon.cli_shared import config_option, json_option, print_json, settings_to_serve


@click.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@config_option
@json_option
def config_show(config_path: Path | None, as_json: bool) -> None:
    """The effective settings, after the file and the TRIAGENODE_* environment variables."""
    from triagenode.config import settings_as_dict

    settings = settings_to_serve(config_path)  # settings that parse but that serve would refuse: say so, like serve
    data = settings_as_dict(settings)
    if as_json:
        print_json({"source": settings.source, **data})
        return
    click.echo(f"# effective settings; source: {settings.source} (+ TRIAGENODE_* environment variables)")
    for section in ("node", "study", "inference", "delivery"):
        click.echo(f"\n[{section}]")
        for key, value in data[section].items():
            click.echo(f"{key} = {json.dumps(value)}")
    for table in ("destinations", "models"):
        for entry in data[table]:
            click.echo(f"\n[[{table}]]")
            for key, value in entry.items():
                click.echo(f"{key} = {json.dumps(value)}")

