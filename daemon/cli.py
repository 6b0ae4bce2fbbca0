"""``triagenode``: the admin CLI, a thin layer over config and storage.

Exit status: 0 done; 1 the command ran but the answer is "no" (unknown
study, receiver down, echo failed, database missing); 2 usage or
configuration error. Tables for people, ``--json`` for scripts.

This module is the entry point (``triagenode.daemon.cli:main``) and holds
only the root group; the commands live beside it by what they deal with:

- ``cli_node``: ``serve``, ``status``, ``echo`` (the running node and its peers);
- ``cli_queue``: ``queue ls/show/retry/resend/cancel``;
- ``cli_config``: ``config show``;
- ``cli_model``: ``phantom``, ``model info/train/evaluate``, ``infer`` (the only ones that load torch);
- ``cli_models``: ``model ls/pause/resume``, the node's configured models;
- ``cli_shared``: options, exit codes, settings, :func:`~triagenode.daemon.cli_shared.open_queue`, output.

Every one of them imports only click at the top and the heavy libraries
(SQLAlchemy, pynetdicom, torch) inside the command that uses them: a
monitoring probe that runs ``triagenode status`` every few seconds, or an
administrator reading ``--help``, should not wait for libraries the command
never touches (``tests/bench/cli_startup.py`` measures it).
"""

from __future__ import annotations

import click

from triagenode.daemon.cli_config import config_group
from triagenode.daemon.cli_model import infer, model, phantom
from triagenode.daemon.cli_models import register as register_model_admin
from triagenode.daemon.cli_node import echo, serve, status
from triagenode.daemon.cli_queue import queue
from triagenode.daemon.cli_shared import EXIT_NO, EXIT_USAGE

__all__ = ["EXIT_NO", "EXIT_USAGE", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="triagenode")
def main() -> None:
    """Triage Node: receives studies over DICOM, queues them for AI triage, returns reports to the PACS."""


register_model_admin(model)
for _command in (serve, status, echo, queue, config_group, phantom, model, infer):
    main.add_command(_command)
