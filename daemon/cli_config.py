"""``triagenode config show``: the effective settings, as the node would run with them."""

from __future__ import annotations

import json
from pathlib import Path

import click

from triagenode.daemon.cli_shared import EXIT_USAGE, config_option, fail, json_option, print_json, settings_from


@click.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@config_option
@json_option
def config_show(config_path: Path | None, as_json: bool) -> None:
    """The effective settings, after the file and the TRIAGENODE_* environment variables."""
    from triagenode.config import ConfigError, settings_as_dict
    from triagenode.inference.model_package import check_configured_model  # the manifest only: no torch

    settings = settings_from(config_path)
    try:
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

