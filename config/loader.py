"""Reading the TOML file and the environment into :class:`triagenode.config.settings.Settings`.

Nothing else in the node imports TOML. The rules an administrator relies on:

* ``--config PATH`` must exist; without it the default path is used when it
  exists, otherwise the embedded defaults with ``data_dir`` under the user's
  home, so that a newcomer runs without root.
* ``TRIAGENODE_<SECTION>__<KEY>`` overrides any key (``TRIAGENODE_NODE__PORT``);
  the arrays of tables (``[[destinations]]``, ``[[models]]``) by index:
  ``TRIAGENODE_DESTINATIONS__0__PORT``, ``TRIAGENODE_MODELS__1__PRIORITY``. The
  next index after the file's entries, with every required key (a destination's
  name, ae_title, host and port; a model's name and package), adds an entry.
  Lists in the environment are comma-separated.
* An unknown key, a wrong type or an impossible value raises
  :class:`ConfigError`, whose text is one line naming the key and the file
  (or the environment variable that set it).

Types and constraints are pydantic's (the models); this module layers the
sources and words the first error. pydantic-settings' environment source was
measured and left out: it imports asyncio and ssl (~70 ms CPU more, on every command
that loads settings, ``status`` included), and the index-wise arrays of tables,
the refusal of unknown variables and the naming of the variable in errors
would still be ours. pydantic itself is imported on the first
:func:`load_settings`, not with this module, so ``--help`` does not pay for it.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_origin

from triagenode.config.values import DEFAULT_CONFIG_PATH, user_data_dir

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

    from triagenode.config.settings import Settings

ENV_PREFIX = "TRIAGENODE_"


class ConfigError(Exception):
    """A configuration the node refuses to start with; ``str()`` is the one line to show."""


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load, override and validate the settings.

    ``path`` is the ``--config`` argument (``None`` when not given).
    """
    from pydantic import ValidationError

    from triagenode.config.settings import SECTIONS, Settings

    environ = os.environ if environ is None else environ
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist or is not a file; check --config")
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH

    data: dict[str, Any] = {"node": {"data_dir": str(user_data_dir())}}
    source = "embedded defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        if "source" in data:  # a field of Settings, but not a section of the file
            raise ConfigError(f"config error in {source}: source: {_unknown_section('source', SECTIONS)}")

    _override(data, environ)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        key, message = _explain(exc.errors()[0])
        raise ConfigError(f"config error in {origin_of(key, environ, source)}: {key}: {message}") from None
    return settings.model_copy(update={"source": source})


def settings_as_dict(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data (``config show``), in TOML's shape.

    A whole number of seconds prints as the administrator wrote it, ``30``, not ``30.0``.
    """

    def plain(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, list):
            return [plain(item) for item in value]
        return value

    return plain(settings.model_dump(mode="json", exclude={"source"}))


def origin_of(key: str, environ: Mapping[str, str], source: str) -> str:
    """Name the environment variable when it set the bad key, the file otherwise."""
    base = re.sub(r"\[\d+\]$", "", key)  # node.allowed_calling_aets[2] -> the list's variable
    name = ENV_PREFIX + re.sub(r"\[(\d+)\]", r".\1", base).replace(".", "__").upper()
    return f"environment variable {name}" if name in environ else source


def _override(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Lay the ``TRIAGENODE_*`` variables over the file's tables, index-wise for the arrays of tables.

    A table the file got wrong (``node = 5``) is left for validation to name.
    """
    sections, arrays = _environment(environ)
    for section, values in sections.items():
        table = data.setdefault(section, {})
        if isinstance(table, dict):
            table.update(values)
    for section, entries in arrays.items():
        listed = data.setdefault(section, [])
        if isinstance(listed, list):
            _override_entries(section, listed, entries)


def _override_entries(section: str, listed: list[Any], entries: dict[int, dict[str, Any]]) -> None:
    """Override the file's entries of one array of tables by index; the next index adds one.

    An entry added from the environment must have every required key there: half an
    entry from the file and half from variables is not a configuration anyone can read.
    """
    from triagenode.config.settings import SECTIONS, TABLE_ARRAYS

    noun, prefix = TABLE_ARRAYS[section], f"{ENV_PREFIX}{section.upper()}"
    for index, values in sorted(entries.items()):
        variable = f"environment variable {prefix}__{index}__{next(iter(values)).upper()}"
        if index < len(listed):
            if isinstance(listed[index], dict):
                listed[index] = {**listed[index], **values}
            continue
        if index != len(listed):
            gap = f"{noun} {index} would leave a gap; the next {noun} is {len(listed)}"
            raise ConfigError(f"config error in {variable}: {gap}")
        fields = SECTIONS[section].model_fields
        missing = [key for key, field in fields.items() if field.is_required() and key not in values]
        if missing:
            needed = ", ".join(f"{prefix}__{index}__{key.upper()}" for key in missing)
            raise ConfigError(f"config error in {variable}: a {noun} defined in the environment also needs {needed}")
        listed.append(values)


def _environment(environ: Mapping[str, str]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[int, dict[str, Any]]]]:
    """The ``TRIAGENODE_<SECTION>__<KEY>`` variables as ``{section: {key: value}}``, and those of the
    arrays of tables, ``TRIAGENODE_<SECTION>__<N>__<KEY>``, as ``{section: {index: {key: value}}}``.

    Only names with ``__`` are settings: ``TRIAGENODE_TORCH`` belongs to the installer.
    """
    from triagenode.config.settings import SECTIONS, TABLE_ARRAYS

    sections: dict[str, dict[str, Any]] = {}
    arrays: dict[str, dict[int, dict[str, Any]]] = {}
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) == 2 and parts[0] in SECTIONS and parts[0] not in TABLE_ARRAYS:
            section, key = parts
            target, dotted = sections.setdefault(section, {}), f"{section}.{key}"
        elif len(parts) == 3 and parts[0] in TABLE_ARRAYS and parts[1].isdigit():
            section, index, key = parts[0], int(parts[1]), parts[2]
            target, dotted = arrays.setdefault(section, {}).setdefault(index, {}), f"{section}[{index}].{key}"
        else:
            raise ConfigError(
                f"config error in environment variable {name}: not a setting; "
                "use TRIAGENODE_<SECTION>__<KEY>, e.g. TRIAGENODE_NODE__PORT"
            )
        fields = SECTIONS[section].model_fields
        if key not in fields:
            raise ConfigError(
                f"config error in environment variable {name}: unknown key {dotted}; known keys: {', '.join(fields)}"
            )
        target[key] = _typed(name, dotted, fields[key].annotation, text)
    return sections, arrays


def _typed(name: str, dotted: str, annotation: Any, text: str) -> Any:
    """An environment string as the value the strict model takes: numbers and booleans parsed
    by pydantic's string rules (``yes``/``no`` too), lists split at commas, the rest as text."""
    from pydantic import TypeAdapter, ValidationError

    if annotation in (int, float, bool):
        try:
            return TypeAdapter(annotation).validate_strings(text.strip())
        except ValidationError as exc:
            _, message = _explain(exc.errors()[0])
            raise ConfigError(f"config error in environment variable {name}: {dotted}: {message}") from None
    if get_origin(annotation) is tuple:
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string", "path": "a path"}


def _explain(error: ErrorDetails) -> tuple[str, str]:
    """The dotted key and an administrator's wording for one pydantic error."""
    from triagenode.config.settings import SECTIONS, TABLE_ARRAYS
    from triagenode.config.values import SettingError

    loc, kind, value, context = error["loc"], error["type"], error["input"], error.get("ctx", {})
    key = _dotted(loc)
    cause = context.get("error")
    if isinstance(cause, SettingError):  # the models' own checks; their key is relative to loc
        return _dotted((*loc, cause.key) if cause.key else loc), cause.message
    if kind == "missing":
        return key, "is required"
    if kind == "extra_forbidden":
        if len(loc) == 1:
            return key, _unknown_section(key, SECTIONS)
        return key, f"unknown key; known keys: {', '.join(SECTIONS[str(loc[0])].model_fields)}"
    if kind in ("model_type", "dict_type"):
        return key, f"[{key}] must be a table" if len(loc) == 1 else "must be a table"
    if kind in ("tuple_type", "list_type"):
        if len(loc) == 1 and key in TABLE_ARRAYS:
            return key, f"use [[{key}]] tables, one per {TABLE_ARRAYS[key]}"
        return key, f"expected a list of strings, got {value!r}"
    if kind == "literal_error":
        expected = str(context["expected"]).replace("'", "")  # 'a' or 'b' -> a or b, as the README writes them
        return key, f"{value!r}: use {expected}"
    if kind == "greater_than_equal":
        return key, f"{value} is below the minimum of {context['ge']}"
    if kind == "greater_than":
        field = SECTIONS[str(loc[0])].model_fields.get(str(loc[-1]))
        hint = f" ({field.description})" if field is not None and field.description else ""
        return key, f"{value:g} must be above {context['gt']:g}{hint}"
    expected = _EXPECTED.get(kind.partition("_")[0])  # int_type, int_parsing, bool_parsing, string_type...
    if expected:
        return key, f"expected {expected}, got {type(value).__name__} {value!r}"
    return key, str(cause) if cause is not None else error["msg"]  # pydantic's words for what we did not foresee


def _dotted(loc: tuple[int | str, ...]) -> str:
    """``("destinations", 0, "port")`` -> ``destinations[0].port``, the key as the README writes it."""
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
    return key


def _unknown_section(name: str, sections: Mapping[str, object]) -> str:
    return f"unknown section [{name}]; known: {', '.join(sections)}"
