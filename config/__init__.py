"""Typed settings of the node and the TOML loader with environment overrides.

The models (pydantic) are imported on first use, not with this package: ``from
triagenode.config import ConfigError, load_settings`` costs no pydantic import, so
commands that never load settings (``--help``, ``echo``) start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from triagenode.config.loader import ConfigError, load_settings, origin_of, settings_as_dict
from triagenode.config.values import DEFAULT_CONFIG_PATH, SettingError, user_data_dir

if TYPE_CHECKING:
    from triagenode.config.settings import (
        IMPLICIT_MODEL,
        DeliverySettings,
        Destination,
        InferenceSettings,
        ModelRoute,
        NodeSettings,
        Settings,
        StudySettings,
    )

_LAZY = {"IMPLICIT_MODEL", "DeliverySettings", "Destination", "InferenceSettings", "ModelRoute", "NodeSettings",
         "Settings", "StudySettings"}
"""The names :mod:`triagenode.config.settings` defines, which imports pydantic."""

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "IMPLICIT_MODEL",
    "ConfigError",
    "DeliverySettings",
    "Destination",
    "InferenceSettings",
    "ModelRoute",
    "NodeSettings",
    "SettingError",
    "Settings",
    "StudySettings",
    "load_settings",
    "origin_of",
    "settings_as_dict",
    "user_data_dir",
]


def __getattr__(name: str) -> Any:
    """The models (and IMPLICIT_MODEL), imported with pydantic when a caller first names one (PEP 562)."""
    if name in _LAZY:
        from triagenode.config import settings

        return getattr(settings, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
