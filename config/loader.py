"""Reading the TOML file and the environment into :class:`config.settings.Settings`.

Nothing else in the node imports TOML. The rules an administrator relies on:

* ``--config PATH`` must exist; without it the default path is used when it
  exists, otherwise the embedded defaults with ``data_dir`` under the user's
  home, so that a newcomer runs without root.
* ``TRIAGENODE_<SECTION>__<KEY>`` overrides any key (``TRIAGENODE_NODE__PORT``);
  destinations by index: ``TRIAGENODE_DESTINATIONS__0__PORT``. The next index
  after the file's destinations, with all four keys (name, ae_title, host,
  port), adds a destination. Lists in the environment are comma-separated.
* An unknown key, a wrong type or an impossible value raises
  :class:`ConfigError`, whose text is one line naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from triagenode.config.settings import (
    DEFAULT_CONFIG_PATH,
    DeliverySettings,
    Destination,
    InferenceSettings,
    NodeSettings,
    SettingError,
    Settings,
    StudySettings,
    user_data_dir,
)

ENV_PREFIX = "TRIAGENODE_"

_SECTIONS: dict[str, type] = {
    "node": NodeSettings,
    "study": StudySettings,
    "inference": InferenceSettings,
    "delivery": DeliverySettings,
}


class ConfigError(Exception):
    """A configuration the node refuses to start with; ``str()`` is the one line to show."""


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load, override and validate the settings.

    ``path`` is the ``--config`` argument (``None`` when not given).
    """
    environ = os.environ if environ is None else environ
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist or is not a file; check --config")
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH

    raw: dict[str, Any] = {}
    source = "embedded defaults"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc

    try:
        settings = _build(raw, source, embedded=path is None)
    except SettingError as exc:
        raise ConfigError(f"config error in {source}: {exc.key}: {exc.message}") from exc
    try:
        settings = _apply_environment(settings, environ)
    except SettingError as exc:
        raise ConfigError(f"config error in environment: {exc.key}: {exc.message}") from exc
    try:
        settings.validate()
    except SettingError as exc:
        origin = origin_of(exc.key, environ, source)
        raise ConfigError(f"config error in {origin}: {exc.key}: {exc.message}") from exc
    return settings


def settings_as_dict(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data (``config show``), in TOML's shape."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    out: dict[str, Any] = {}
    for name in _SECTIONS:
        section = getattr(settings, name)
        out[name] = {f.name: plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
    out["destinations"] = [
        {f.name: plain(getattr(d, f.name)) for f in dataclasses.fields(d)} for d in settings.destinations
    ]
    return out


def _build(raw: dict[str, Any], source: str, embedded: bool) -> Settings:
    for key in raw:
        if key not in _SECTIONS and key != "destinations":
            raise SettingError(key, f"unknown section [{key}]; known: {', '.join([*_SECTIONS, 'destinations'])}")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise SettingError(name, f"[{name}] must be a table")
        defaults: dict[str, Any] = {}
        if name == "node" and embedded:
            defaults["data_dir"] = user_data_dir()
        sections[name] = _make(cls, name, table, defaults)
    destinations_raw = raw.get("destinations", [])
    if not isinstance(destinations_raw, list):
        raise SettingError("destinations", "use [[destinations]] tables, one per peer")
    destinations = []
    for index, table in enumerate(destinations_raw):
        if not isinstance(table, dict):
            raise SettingError(f"destinations[{index}]", "must be a table")
        destinations.append(_make(Destination, f"destinations[{index}]", table, {}))
    return Settings(**sections, destinations=tuple(destinations), source=source)


def _make(cls: type, prefix: str, table: dict[str, Any], defaults: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(defaults)
    for key, value in table.items():
        if key not in known:
            raise SettingError(f"{prefix}.{key}", f"unknown key; known keys: {', '.join(known)}")
        values[key] = _coerce(f"{prefix}.{key}", hints[key], value)
    missing = [
        name
        for name, f in known.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise SettingError(f"{prefix}.{missing[0]}", "is required")
    return cls(**values)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check a TOML value against the field's type; ints pass as floats, strings as paths."""
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Path:
        if isinstance(value, str) and value:
            return Path(value).expanduser()
    elif typing.get_origin(hint) is tuple:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise SettingError(key, f"expected a list of strings, got {value!r}")
    raise SettingError(key, f"expected {_type_name(hint)}, got {type(value).__name__} {value!r}")


def _type_name(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(
        hint, str(hint)
    )


def _parse_env_value(key: str, hint: Any, text: str) -> Any:
    """Turn an environment string into the field's type, then check it like a TOML value."""
    value: Any = text
    try:
        if hint is int:
            value = int(text)
        elif hint is float:
            value = float(text)
        elif hint is bool:
            lowered = text.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no"}:
                raise ValueError(text)
            value = lowered in {"1", "true", "yes"}
        elif typing.get_origin(hint) is tuple:
            value = [part.strip() for part in text.split(",") if part.strip()]
    except ValueError:
        raise SettingError(key, f"expected {_type_name(hint)}, got {text!r}") from None
    return _coerce(key, hint, value)


def origin_of(key: str, environ: Mapping[str, str], source: str) -> str:
    """Name the environment variable when it set the bad key, the file otherwise."""
    base = re.sub(r"\[\d+\]$", "", key)  # node.allowed_calling_aets[2] -> the list's variable
    name = ENV_PREFIX + re.sub(r"\[(\d+)\]", r".\1", base).replace(".", "__").upper()
    return f"environment variable {name}" if name in environ else source


def _apply_environment(settings: Settings, environ: Mapping[str, str]) -> Settings:
    sections = {name: getattr(settings, name) for name in _SECTIONS}
    destinations = list(settings.destinations)
    new: dict[int, dict[str, tuple[str, str]]] = {}
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if parts[0] in _SECTIONS and len(parts) == 2:
            section = sections[parts[0]]
            hints = typing.get_type_hints(type(section))
            if parts[1] not in hints:
                raise SettingError(name, f"unknown key {parts[0]}.{parts[1]}; known keys: {', '.join(hints)}")
            value = _parse_env_value(f"{parts[0]}.{parts[1]}", hints[parts[1]], text)
            sections[parts[0]] = dataclasses.replace(section, **{parts[1]: value})
        elif parts[0] == "destinations" and len(parts) == 3 and parts[1].isdigit():
            index = int(parts[1])
            hints = typing.get_type_hints(Destination)
            if parts[2] not in hints:
                raise SettingError(name, f"unknown key; known keys: {', '.join(hints)}")
            key = f"destinations[{index}].{parts[2]}"
            if index >= len(destinations):
                new.setdefault(index, {})[parts[2]] = (name, text)
                continue
            destinations[index] = dataclasses.replace(
                destinations[index], **{parts[2]: _parse_env_value(key, hints[parts[2]], text)}
            )
        else:
            raise SettingError(name, "not a setting; use TRIAGENODE_<SECTION>__<KEY>, e.g. TRIAGENODE_NODE__PORT")
    for index in sorted(new):
        destinations.append(_destination_from_environment(index, len(destinations), new[index]))
    return dataclasses.replace(settings, destinations=tuple(destinations), **sections)


def _destination_from_environment(index: int, expected: int, values: dict[str, tuple[str, str]]) -> Destination:
    """A destination defined by the environment alone (a container, a quick test): all four keys, next index."""
    first = next(iter(values.values()))[0]
    if index != expected:
        raise SettingError(first, f"destination {index} would leave a gap; the next destination is {expected}")
    hints = typing.get_type_hints(Destination)
    missing = [key for key in hints if key not in values]
    if missing:
        needed = ", ".join(f"{ENV_PREFIX}DESTINATIONS__{index}__{key.upper()}" for key in missing)
        raise SettingError(first, f"a destination defined in the environment also needs {needed}")
    return Destination(
        **{key: _parse_env_value(f"destinations[{index}].{key}", hints[key], text) for key, (_, text) in values.items()}
    )
