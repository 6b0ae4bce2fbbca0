"""Typed settings of the node.

Every section of the TOML file is one frozen pydantic model here; field names are the
TOML keys, so the reference in the README, the example file in ``deploy/`` and this
module say the same thing. The types and the constraints below are the whole check:
the loader (:mod:`triagenode.config.loader`) only layers the file and the environment
and turns pydantic's first error into one line naming the key.

The models are strict: ``port = "11112"`` in the file is refused rather than guessed
(the loader parses environment strings into numbers and booleans before validation).
Paths and lists are lax only so that TOML's strings and arrays fill them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from triagenode.config.values import (
    SYSTEM_DATA_DIR,
    SettingError,
    check_ae_title,
    check_port,
)

__all__ = [
    "SECTIONS",
    "DeliverySettings",
    "Destination",
    "InferenceSettings",
    "NodeSettings",
    "Settings",
    "StudySettings",
]


def _ae_title(value: str) -> str:
    check_ae_title("", value)  # "": the key is where pydantic found the value
    return value


def _port(value: int) -> int:
    check_port("", value)
    return value


def _not_empty(value: object) -> object:
    if value == "":  # Path("") would be the current directory
        raise SettingError("", "a path must not be empty")
    return value


def _required(advice: str) -> AfterValidator:
    """A string that must say something; ``advice`` tells the administrator what to write."""

    def check(value: str) -> str:
        if not value.strip():
            raise SettingError("", advice)
        return value

    return AfterValidator(check)


AeTitle = Annotated[str, AfterValidator(_ae_title)]
Port = Annotated[int, AfterValidator(_port)]
Directory = Annotated[Path, Field(strict=False), BeforeValidator(_not_empty), AfterValidator(Path.expanduser)]
"""A path: lax, since TOML gives a string; ``~`` is the service user's home."""
SrSopClass = Literal["comprehensive3d", "comprehensive"]
ContentQualification = Literal["RESEARCH", "PRODUCT"]


class _Section(BaseModel):
    """Frozen (shared by threads, pickled to worker processes), closed to unknown keys, strict."""

    # defer_build: the validators are built on first use, not at import, which `--help` never reaches.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, defer_build=True)


class NodeSettings(_Section):
    """``[node]``: the node's own DICOM identity, network and storage."""

    ae_title: AeTitle = "TRIAGENODE"
    host: Annotated[str, _required("host must not be empty; use 0.0.0.0 to listen on every address")] = "0.0.0.0"
    port: Port = 11112
    data_dir: Directory = SYSTEM_DATA_DIR
    allowed_calling_aets: tuple[AeTitle, ...] = Field((), strict=False)
    """Calling AE titles allowed to associate; empty accepts any peer."""
    max_associations: int = Field(10, ge=1)
    min_free_disk_mb: int = Field(2048, ge=0)
    """Below this much free space on ``data_dir`` C-STOREs are refused with 0xA700."""
    network_timeout_s: int = Field(60, ge=1)
    """An association with no traffic for this long is aborted."""
    shutdown_grace_s: int = Field(30, ge=0)
    """On SIGTERM, open associations get this long to finish before they are aborted."""

    @property
    def database_path(self) -> Path:
        return self.data_dir / "triagenode.db"


class StudySettings(_Section):
    """``[study]``: when a study counts as complete."""

    stable_seconds: float = Field(30.0, gt=0, description="seconds without a new instance")
    """A study with no new instance for this long moves from ``receiving`` to ``queued``."""


class InferenceSettings(_Section):
    """``[inference]``: which model runs, where, and what report it writes."""

    model: Annotated[str, _required("name a model package path, or 'demo'")] = "demo"
    """'demo' (the built-in demo model) or the path of a model package (*.tnm)."""
    device: str = "auto"
    """auto (a GPU when there is one), cpu, cuda or cuda:N."""
    workers: int = Field(1, ge=0)
    """Worker processes; 0 receives and queues only (no inference)."""
    batch_size: int = Field(32, ge=1)
    decode_processes: int = Field(-1, ge=-1)
    """Processes per worker that decode and preprocess slices ahead of the model; 0 decodes in a
    thread of the worker itself; -1 (auto) leaves that to :meth:`decoders`."""
    study_timeout_s: int = Field(600, ge=1)
    sr_sop_class: SrSopClass = "comprehensive3d"
    """comprehensive3d, or comprehensive for archives that refuse Comprehensive 3D SR."""
    content_qualification: ContentQualification = "RESEARCH"
    """RESEARCH, or PRODUCT once the site has validated the model."""
    report_not_applicable: bool = False
    """Also send an SR (finding Indeterminate, with the reason) for studies the model cannot read."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", value):
            raise SettingError("", f"{value!r}: use auto, cpu, cuda or cuda:N")
        return value

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


class DeliverySettings(_Section):
    """``[delivery]``: how hard the node tries to get a report to each destination."""

    max_attempts: int = Field(8, ge=1)
    initial_backoff_s: float = Field(10.0, gt=0)
    max_backoff_s: float = Field(1800.0, validate_default=True)
    """Checked against initial_backoff_s even when left at its default (a large initial_backoff_s alone)."""

    @field_validator("max_backoff_s")
    @classmethod
    def _not_below_initial(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("initial_backoff_s")  # absent when it was refused itself
        if initial is not None and value < initial:
            raise SettingError("", f"{value:g} is below initial_backoff_s ({initial:g}); raise this or lower that")
        return value


class Destination(_Section):
    """One ``[[destinations]]`` entry: a DICOM peer that receives the reports."""

    name: Annotated[str, _required("a destination needs a name")]
    ae_title: AeTitle
    host: Annotated[str, _required("host must not be empty")]
    port: Port


class Settings(_Section):
    """All settings of one node, as ``serve`` and the CLI use them."""

    node: NodeSettings = Field(default_factory=NodeSettings)
    study: StudySettings = Field(default_factory=StudySettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    destinations: tuple[Destination, ...] = Field((), strict=False)  # lax: TOML gives an array
    source: str = "embedded defaults"
    """Where the settings came from (a file path or 'embedded defaults'), for messages; not a TOML key."""

    @model_validator(mode="after")
    def _names_once(self) -> Settings:
        names: set[str] = set()
        for index, destination in enumerate(self.destinations):
            if destination.name in names:
                raise SettingError(f"destinations[{index}].name", f"name {destination.name!r} is used twice")
            names.add(destination.name)
        return self


SECTIONS: dict[str, type[_Section]] = {
    "node": NodeSettings,
    "study": StudySettings,
    "inference": InferenceSettings,
    "delivery": DeliverySettings,
    "destinations": Destination,
}
"""The TOML file's top-level keys and the model of each table (``destinations``: of each entry)."""
