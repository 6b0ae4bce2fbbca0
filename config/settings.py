"""Typed settings of the node.

Every section of the TOML file is one frozen dataclass here; the loader
(:mod:`config.loader`) fills them from the file and the environment and then
calls each ``validate`` so that an impossible value stops the start with one
line naming the key. Field names are the TOML keys, so the reference in the
README, the example file in ``deploy/`` and this module say the same thing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
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
    """A value that cannot be right; ``key`` is the dotted TOML key."""

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
    if not 1 <= value <= 65535:
        raise SettingError(key, f"port {value} is out of range; use 1..65535")


def check_at_least(key: str, value: int | float, minimum: int | float) -> None:
    if value < minimum:
        raise SettingError(key, f"{value} is below the minimum of {minimum}")


@dataclass(frozen=True)
class NodeSettings:
    """``[node]``: the node's own DICOM identity, network and storage."""

    ae_title: str = "TRIAGENODE"
    host: str = "0.0.0.0"
    port: int = 11112
    data_dir: Path = SYSTEM_DATA_DIR
    allowed_calling_aets: tuple[str, ...] = ()
    """Calling AE titles allowed to associate; empty accepts any peer."""
    max_associations: int = 10
    min_free_disk_mb: int = 2048
    """Below this much free space on ``data_dir`` C-STOREs are refused with 0xA700."""
    network_timeout_s: int = 60
    """An association with no traffic for this long is aborted."""
    shutdown_grace_s: int = 30
    """On SIGTERM, open associations get this long to finish before they are aborted."""

    def validate(self) -> None:
        check_ae_title("node.ae_title", self.ae_title)
        check_port("node.port", self.port)
        if not self.host:
            raise SettingError("node.host", "host must not be empty; use 0.0.0.0 to listen on every address")
        for index, aet in enumerate(self.allowed_calling_aets):
            check_ae_title(f"node.allowed_calling_aets[{index}]", aet)
        check_at_least("node.max_associations", self.max_associations, 1)
        check_at_least("node.min_free_disk_mb", self.min_free_disk_mb, 0)
        check_at_least("node.network_timeout_s", self.network_timeout_s, 1)
        check_at_least("node.shutdown_grace_s", self.shutdown_grace_s, 0)

    @property
    def database_path(self) -> Path:
        return self.data_dir / "triagenode.db"


@dataclass(frozen=True)
class StudySettings:
    """``[study]``: when a study counts as complete."""

    stable_seconds: float = 30
    """A study with no new instance for this long moves from ``receiving`` to ``queued``."""

    def validate(self) -> None:
        if self.stable_seconds <= 0:
            raise SettingError("study.stable_seconds", f"{self.stable_seconds:g} must be above 0 (seconds without a new instance)")


@dataclass(frozen=True)
class InferenceSettings:
    """``[inference]``: which model runs, where, and what report it writes."""

    model: str = "demo"
    """'demo' (the built-in demo model) or the path of a model package (*.tnm)."""
    device: str = "auto"
    """auto (a GPU when there is one), cpu, cuda or cuda:N."""
    workers: int = 1
    """Worker processes; 0 receives and queues only (no inference)."""
    batch_size: int = 32
    decode_processes: int = -1
    """Processes per worker that decode and preprocess slices ahead of the model; 0 decodes in a
    thread of the worker itself; -1 (auto) leaves that to :meth:`decoders`."""
    study_timeout_s: int = 600
    sr_sop_class: str = "comprehensive3d"
    """comprehensive3d, or comprehensive for archives that refuse Comprehensive 3D SR."""
    content_qualification: str = "RESEARCH"
    """RESEARCH, or PRODUCT once the site has validated the model."""
    report_not_applicable: bool = False
    """Also send an SR (finding Indeterminate, with the reason) for studies the model cannot read."""

    def validate(self) -> None:
        if not self.model:
            raise SettingError("inference.model", "name a model package path, or 'demo'")
        if self.device != "auto" and self.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise SettingError("inference.device", f"{self.device!r}: use auto, cpu, cuda or cuda:N")
        check_at_least("inference.workers", self.workers, 0)
        check_at_least("inference.batch_size", self.batch_size, 1)
        check_at_least("inference.decode_processes", self.decode_processes, -1)
        check_at_least("inference.study_timeout_s", self.study_timeout_s, 1)
        if self.sr_sop_class not in ("comprehensive3d", "comprehensive"):
            raise SettingError("inference.sr_sop_class", f"{self.sr_sop_class!r}: use comprehensive3d or comprehensive")
        if self.content_qualification not in ("RESEARCH", "PRODUCT"):
            raise SettingError("inference.content_qualification", "use RESEARCH or PRODUCT")

    def decoders(self, cpu_count: int | None = None) -> int:
        """Decoder processes per worker: as configured, or for auto the worker's share of the cores less one.

        With two cores or fewer per worker, auto decodes in a thread of the worker: the
        model's own threads already use those cores, and extra processes only
        contended with them (measured on 2 cores: 0.8-1.2 s per 300-slice CT
        with 0, 1 or 2 decoders alike).
        """
        if self.decode_processes >= 0:
            return self.decode_processes
        share = (cpu_count or os.cpu_count() or 1) // max(1, self.workers)
        return 0 if share <= 2 else min(8, share - 1)


@dataclass(frozen=True)
class DeliverySettings:
    """``[delivery]``: how hard the node tries to get a report to each destination."""

    max_attempts: int = 8
    initial_backoff_s: float = 10
    max_backoff_s: float = 1800

    def validate(self) -> None:
        check_at_least("delivery.max_attempts", self.max_attempts, 1)
        if self.initial_backoff_s <= 0:
            raise SettingError("delivery.initial_backoff_s", f"{self.initial_backoff_s} must be above 0")
        if self.max_backoff_s < self.initial_backoff_s:
            raise SettingError("delivery.max_backoff_s", "must be at least initial_backoff_s")


@dataclass(frozen=True)
class Destination:
    """One ``[[destinations]]`` entry: a DICOM peer that receives the reports."""

    name: str
    ae_title: str
    host: str
    port: int

    def validate(self, index: int) -> None:
        key = f"destinations[{index}]"
        if not self.name.strip():
            raise SettingError(f"{key}.name", "a destination needs a name")
        check_ae_title(f"{key}.ae_title", self.ae_title)
        check_port(f"{key}.port", self.port)
        if not self.host:
            raise SettingError(f"{key}.host", "host must not be empty")


@dataclass(frozen=True)
class Settings:
    """All settings of one node, as ``serve`` and the CLI use them."""

    node: NodeSettings = field(default_factory=NodeSettings)
    study: StudySettings = field(default_factory=StudySettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    destinations: tuple[Destination, ...] = ()
    source: str = "embedded defaults"
    """Where the settings came from (a file path or 'embedded defaults'), for messages."""

    def validate(self) -> None:
        self.node.validate()
        self.study.validate()
        self.inference.validate()
        self.delivery.validate()
        names: set[str] = set()
        for index, destination in enumerate(self.destinations):
            destination.validate(index)
            if destination.name in names:
                raise SettingError(f"destinations[{index}].name", f"name {destination.name!r} is used twice")
            names.add(destination.name)
