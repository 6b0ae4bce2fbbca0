"""The default paths and the rules for single DICOM values, without pydantic.

Kept apart from the models in :mod:`triagenode.config.settings` so that a command that
checks an AE title or a port without loading settings (``triagenode echo``, every
``--help``) does not pay for importing pydantic: the CLI's start-up time is a target.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_CONFIG_PATH = Path("/etc/triagenode/triagenode.toml")
"""Where ``serve`` and the CLI look when ``--config`` is not given."""

SYSTEM_DATA_DIR = Path("/var/lib/triagenode")
"""``data_dir`` of an installed node (a config file exists)."""


def user_data_dir() -> Path:
    """``data_dir`` when no config file exists: a newcomer runs without root."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "triagenode"


class SettingError(ValueError):
    """A value that cannot be right; ``key`` is the dotted TOML key.

    Inside the models ``key`` is relative to where pydantic found the value (empty: the
    value itself), so that the loader can name the full key, e.g. ``destinations[1].name``.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


_AE_TITLE_FORBIDDEN = re.compile(r"[\\\x00-\x1f\x7f]")


def check_ae_title(key: str, value: str) -> None:
    """An AE title is 1-16 characters of the default repertoire, not all spaces (PS3.5 6.2)."""
    if not value.strip():
        raise SettingError(key, "an AE title must not be empty")
    if len(value) > 16:
        raise SettingError(key, f"AE title {value!r} is {len(value)} characters; DICOM allows at most 16")
    if _AE_TITLE_FORBIDDEN.search(value) or not value.isascii():
        raise SettingError(key, f"AE title {value!r} holds a backslash, a control or a non-ASCII character")


def check_port(key: str, value: int) -> None:
    """A TCP port a peer can connect to; 0 ("any free port") is no address to give a PACS."""
    if not 1 <= value <= 65535:
        raise SettingError(key, f"port {value} is out of range; use 1..65535")


IMPLICIT_MODEL = "default"
"""The name of the one route a configuration without ``[[models]]`` gets, for ``[inference] model``:
its tasks in the queue carry it (storage imports it from here, without pydantic)."""
