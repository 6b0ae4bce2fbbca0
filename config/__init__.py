"""Typed settings of the node and the TOML loader with environment overrides."""

from triagenode.config.loader import ConfigError, load_settings, settings_as_dict
from triagenode.config.settings import Destination, NodeSettings, Settings, StudySettings

__all__ = [
    "ConfigError",
    "Destination",
    "NodeSettings",
    "Settings",
    "StudySettings",
    "load_settings",
    "settings_as_dict",
]
