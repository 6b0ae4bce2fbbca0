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
    IMPLICIT_MODEL,
    SYSTEM_DATA_DIR,
    SettingError,
    check_ae_title,
    check_port,
)

__all__ = [
    "IMPLICIT_MODEL",
    "SECTIONS",
    "TABLE_ARRAYS",
    "AuditSettings",
    "DeliverySettings",
    "Destination",
    "InferenceSettings",
    "ModelRoute",
    "NodeSettings",
    "Peer",
    "Settings",
    "StorageSettings",
    "StudySettings",
    "TlsSettings",
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


def _model_name(value: str) -> str:
    """A name that is safe in file names and log lines as it stands, with no quoting or escaping."""
    if not _MODEL_NAME.fullmatch(value):
        raise SettingError(
            "", f"{value!r}: use 1-64 letters, digits, '.', '_' or '-'; the name goes into UIDs and file names"
        )
    return value


def _pattern(value: str) -> str:
    """A regular expression that compiles, so that a typo stops the start instead of every study's routing."""
    try:
        re.compile(value)
    except re.error as exc:
        message = f"{value!r} is not a valid regular expression ({exc}); fix it or leave it out"
        raise SettingError("", message) from None
    return value


_MODEL_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NAME_A_MODEL = "name a model package path, or a built-in model: 'demo', 'mammo-demo', 'brain-demo'"

AeTitle = Annotated[str, AfterValidator(_ae_title)]
Port = Annotated[int, AfterValidator(_port)]
Directory = Annotated[Path, Field(strict=False), BeforeValidator(_not_empty), AfterValidator(Path.expanduser)]
"""A path: lax, since TOML gives a string; ``~`` is the service user's home."""
ModelName = Annotated[str, AfterValidator(_model_name)]
Pattern = Annotated[str, AfterValidator(_pattern)]
"""A Python regular expression, searched (``re.search``) in a DICOM text; empty matches anything."""
SrSopClass = Literal["comprehensive3d", "comprehensive"]
MammoSr = Literal["tid1500", "mammography-cad", "both"]
"""What a mammography detector's report is: a TID 1500 measurement report (one planar ROI per lesion), a
Mammography CAD SR (TID 4000, what breast-imaging workstations draw CAD marks from), or both."""
ContentQualification = Literal["RESEARCH", "PRODUCT"]


class _Section(BaseModel):
    """Frozen (shared by threads, pickled to worker processes), closed to unknown keys, strict."""

    # defer_build: the validators are built on first use, not at import, which `--help` never reaches.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, defer_build=True)


def _listening_port(value: int) -> int:
    if value != 0:
        check_port("", value)
    return value


def _host_pattern(value: str) -> str:
    """An address, a network (CIDR) or a host name, checked now so that a typo stops the start.

    Written the way the peer's connections are compared: an IPv4-mapped IPv6 entry
    (``::ffff:10.1.2.3``) becomes the IPv4 address the node sees; ``10.1.2`` or ``010.1.2.3``,
    which the resolver would read as other addresses, are refused.
    """
    import ipaddress

    text = value.strip()
    if not text:
        raise SettingError("", "a host must not be empty; give an address, a network such as 10.1.2.0/24, or a name")
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    else:
        mapped = network.network_address.ipv4_mapped if network.version == 6 else None  # type: ignore[union-attr]
        if mapped is not None and network.prefixlen >= 96:
            return str(ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}", strict=False))
        return text
    labels = text.removesuffix(".").split(".")
    label_ok = all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label) for label in labels)
    if "/" in text or re.fullmatch(r"[0-9.]+", text) or not label_ok or len(text) > 253:
        message = f"{value!r} is neither an address (four numbers 0-255), a network (10.1.2.0/24) nor a host name"
        raise SettingError("", message)
    return text


ListeningPort = Annotated[int, AfterValidator(_listening_port)]
"""A port to listen on, or 0 for none (``[node] port = 0``: TLS only; ``[tls] port = 0``: no TLS)."""
HostPattern = Annotated[str, AfterValidator(_host_pattern)]
OptionalPath = Annotated[Path | None, Field(strict=False), BeforeValidator(_not_empty)]
"""A file, or None when not set."""


class NodeSettings(_Section):
    """``[node]``: the node's own DICOM identity, network and storage."""

    ae_title: AeTitle = "TRIAGENODE"
    host: Annotated[str, _required("host must not be empty; use 0.0.0.0 to listen on every address")] = "0.0.0.0"
    port: ListeningPort = 11112
    """The plain-TCP DICOM port; 0 accepts DICOM over TLS only (``[tls] port``)."""
    data_dir: Directory = SYSTEM_DATA_DIR
    allowed_calling_aets: tuple[AeTitle, ...] = Field((), strict=False)
    """Calling AE titles allowed to associate; empty accepts any peer."""
    max_associations: int = Field(10, ge=1)
    max_associations_per_peer: int = Field(5, ge=1)
    """Associations one calling AE title may hold at once (a ``[[peers]]`` entry may set its own), so that a
    sender that opens connections in a loop cannot take every one of ``max_associations``."""
    min_free_disk_mb: int = Field(2048, ge=0)
    """Below this much free space on ``data_dir`` C-STOREs are refused with 0xA700."""
    network_timeout_s: int = Field(60, ge=1)
    """An association with no traffic for this long is aborted."""
    shutdown_grace_s: int = Field(30, ge=0)
    """On SIGTERM, open associations get this long to finish before they are aborted."""

    @property
    def database_path(self) -> Path:
        return self.data_dir / "triagenode.db"


class TlsSettings(_Section):
    """``[tls]``: DICOM over TLS (PS3.15 B.12, the BCP 195 profiles) on a port of its own."""

    port: ListeningPort = 0
    """The DICOM TLS port (2762 is the registered one); 0: no TLS."""
    certificate: OptionalPath = None
    """The node's certificate (PEM), with any intermediate certificates after it."""
    private_key: OptionalPath = None
    """The certificate's private key (PEM, unencrypted), readable by the service user alone."""
    ca_certificates: OptionalPath = None
    """The trust anchors (PEM) that peers' certificates must chain to."""
    require_client_certificate: bool = True
    """Mutual TLS: a peer without a certificate signed by ``ca_certificates`` is refused at the handshake."""
    minimum_version: Literal["1.2", "1.3"] = "1.2"
    expiry_warning_days: int = Field(30, ge=0)
    """From this many days before the certificate expires, a warning is logged each day."""

    @property
    def enabled(self) -> bool:
        return self.port != 0

    @model_validator(mode="after")
    def _files_given(self) -> TlsSettings:
        if not self.enabled:
            return self
        for key in ("certificate", "private_key"):
            if getattr(self, key) is None:
                raise SettingError(key, "is required when [tls] port is set; see the README's DICOM TLS section")
        if self.require_client_certificate and self.ca_certificates is None:
            raise SettingError(
                "ca_certificates",
                "is required with require_client_certificate = true (the CA that signs the peers' certificates)",
            )
        return self


class Peer(_Section):
    """One ``[[peers]]`` entry: a calling AE title bound to the addresses it may associate from."""

    ae_title: AeTitle
    hosts: tuple[HostPattern, ...] = Field(strict=False, min_length=1)
    """Addresses, networks (CIDR) or host names (resolved when the peer associates)."""
    max_associations: int | None = Field(None, ge=1)
    """This peer's associations at once; ``[node] max_associations_per_peer`` when not set."""
    require_tls: bool = False
    """Refuse this AE title on the plain-TCP port."""
    certificate_names: tuple[str, ...] = Field((), strict=False)
    """Common names of the client certificates this AE title may present (mutual TLS): the CA signs many
    certificates, this binds the AE title to its own. Implies ``require_tls``; empty: any the CA signed."""


class AuditSettings(_Section):
    """``[audit]``: the DICOM audit trail (PS3.15 A.5, IHE ATNA)."""

    enabled: bool = True
    """Audit messages go to ``data_dir/audit/`` (one file a day, appended, never rewritten)."""
    syslog: str = ""
    """``host:port`` of an audit record repository; empty: the files only."""
    syslog_protocol: Literal["tls", "udp"] = "tls"
    """tls (RFC 5425, what ATNA asks) or udp (RFC 5426)."""
    syslog_ca_certificates: OptionalPath = None
    """Trust anchors for the repository's certificate; ``[tls] ca_certificates`` when not set. The node's
    ``[tls]`` certificate, when there is one, authenticates the node to it."""
    enterprise_site_id: str = Field("", max_length=64)
    """AuditEnterpriseSiteID of every message (the hospital, as the repository groups its sources); empty: none."""

    @field_validator("syslog")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and not re.fullmatch(r"[^\s:]+:\d{1,5}|\[[0-9A-Fa-f:.]+\]:\d{1,5}", value):
            raise SettingError("", f"{value!r}: use host:port, e.g. arr.example.org:6514")
        if value:
            check_port("", int(value.rsplit(":", 1)[1]))
        return value


class StorageSettings(_Section):
    """``[storage]``: how long a study's files stay on the node."""

    keep_days: float = Field(0.0, ge=0, le=36500, allow_inf_nan=False, strict=False)
    """Days after a study reached a final state (reported and sent, failed, cancelled) before its files and
    rows are removed; 0 keeps everything (the disk then fills: watch it)."""


class StudySettings(_Section):
    """``[study]``: when a study counts as complete."""

    stable_seconds: float = Field(30.0, gt=0, description="seconds without a new instance")
    """A study with no new instance for this long moves from ``receiving`` to ``queued``."""


class InferenceSettings(_Section):
    """``[inference]``: which model runs, where, and what report it writes."""

    model: Annotated[str, _required(_NAME_A_MODEL)] = "demo"
    """A built-in model ('demo': lung nodules on CT; 'mammo-demo': lesions on mammograms; 'brain-demo': lesions
    on brain MRI) or the path of a model package (*.tnm)."""
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
    mammo_sr: MammoSr = "tid1500"
    """A detection model's report: tid1500, mammography-cad (Mammography CAD SR) or both; a ``[[models]]``
    entry may set its own."""

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
    tls: bool = False
    """Send over DICOM TLS, verifying the destination's certificate and host name."""
    ca_certificates: OptionalPath = None
    """Trust anchors for the destination's certificate; ``[tls] ca_certificates``, else the system's, when not set."""
    certificate: OptionalPath = None
    """Client certificate for mutual TLS; ``[tls] certificate`` when not set."""
    private_key: OptionalPath = None
    """Its private key; ``[tls] private_key`` when not set."""

    @model_validator(mode="after")
    def _client_pair(self) -> Destination:
        """A key without its certificate (or the reverse) would be paired with the node's: not what anyone meant."""
        if (self.certificate is None) != (self.private_key is None):
            given, missing = ("certificate", "private_key") if self.private_key is None else ("private_key",
                                                                                             "certificate")
            raise SettingError(missing, f"is required with {given}: a client certificate and its key go together")
        return self


class ModelRoute(_Section):
    """One ``[[models]]`` entry: a model package the node serves and the studies it takes.

    Every route key given must match for the model to take a study; a key left out matches
    anything. The package's manifest already says what input the model reads (modality, SOP
    classes, fewest slices); a route can only narrow that (``triagenode.inference.routing``).
    """

    name: ModelName
    """Unique; shown everywhere, and part of the model's task, series and SR UIDs and file names."""
    package: Annotated[str, _required(_NAME_A_MODEL)]
    """A built-in model ('demo', 'mammo-demo') or the path of a model package (*.tnm); two routes may share one."""
    priority: int = 0
    """Higher runs first (after urgent studies); equal priorities go by the time the study became complete."""
    modalities: tuple[str, ...] = Field((), strict=False)
    """(0008,0060) Modality of the series the model would read, within the one its manifest reads."""
    body_parts: tuple[str, ...] = Field((), strict=False)
    """(0018,0015) Body Part Examined of that series, compared case-insensitively."""
    series_description: Pattern = ""
    """Regex searched in (0008,103E) Series Description of that series."""
    study_description: Pattern = ""
    """Regex searched in (0008,1030) Study Description."""
    calling_aets: tuple[AeTitle, ...] = Field((), strict=False)
    """Only studies sent by one of these AEs."""
    destinations: tuple[str, ...] = Field((), strict=False)
    """Names of ``[[destinations]]`` that get this model's reports; empty: all of them."""
    workers: int = Field(0, ge=0)
    """Worker processes reserved for this model alone (a heavy model must not starve a light one);
    0: the model is served by the workers no model reserved."""
    mammo_sr: MammoSr | None = None
    """This entry's detection report (see ``[inference] mammo_sr``, which applies when this is not set)."""


class Settings(_Section):
    """All settings of one node, as ``serve`` and the CLI use them."""

    node: NodeSettings = Field(default_factory=NodeSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    study: StudySettings = Field(default_factory=StudySettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    destinations: tuple[Destination, ...] = Field((), strict=False)  # lax: TOML gives an array
    peers: tuple[Peer, ...] = Field((), strict=False)
    """Calling AE titles bound to addresses; an AE title not listed here falls under ``allowed_calling_aets``."""
    models: tuple[ModelRoute, ...] = Field((), strict=False)
    """The models the node serves; when there are none, ``[inference] model`` is the one (:meth:`routes`)."""
    source: str = "embedded defaults"
    """Where the settings came from (a file path or 'embedded defaults'), for messages; not a TOML key."""

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        _names_once("destinations", self.destinations)
        _names_once("models", self.models)
        self._check_listening()
        configured = [destination.name for destination in self.destinations]
        for index, route in enumerate(self.models):
            unknown = [name for name in route.destinations if name not in configured]
            if unknown:
                known = f"configured: {', '.join(configured)}" if configured else "none is configured"
                message = f"no [[destinations]] is named {unknown[0]!r}; {known}"
                raise SettingError(f"models[{index}].destinations", message)
        self._check_reserved_workers()
        return self

    def _check_listening(self) -> None:
        """A node that listens nowhere, or twice on one port, is a typo, not a configuration."""
        if self.node.port == 0 and not self.tls.enabled:
            raise SettingError("node.port", "0 (TLS only) needs [tls] port; set a port here or configure [tls]")
        if self.tls.enabled and self.tls.port == self.node.port:
            raise SettingError("tls.port", f"{self.tls.port} is also [node] port; DICOM TLS needs a port of its own")
        seen: set[str] = set()
        for index, peer in enumerate(self.peers):
            if peer.ae_title.strip() in seen:
                raise SettingError(f"peers[{index}].ae_title", f"{peer.ae_title!r} is listed twice; merge its hosts")
            seen.add(peer.ae_title.strip())
            if peer.require_tls and not self.tls.enabled:
                raise SettingError(f"peers[{index}].require_tls", "needs [tls] port: the node has no TLS port")
            if peer.certificate_names and not (self.tls.enabled and self.tls.require_client_certificate):
                raise SettingError(
                    f"peers[{index}].certificate_names",
                    "needs [tls] port with require_client_certificate = true: only then do peers show certificates",
                )

    def peer(self, ae_title: str) -> Peer | None:
        """The ``[[peers]]`` entry of a calling AE title, or None."""
        wanted = ae_title.strip()
        return next((peer for peer in self.peers if peer.ae_title.strip() == wanted), None)

    def _check_reserved_workers(self) -> None:
        """Reserved workers come out of ``[inference] workers``; the models that reserve none need one left over.

        A node with ``workers = 0`` runs no model at all (it receives and queues), so its
        reservations wait unchecked for the day it gets workers: a maintenance override of
        ``TRIAGENODE_INFERENCE__WORKERS=0`` must not stop the start.
        """
        total = self.inference.workers
        if not total:
            return
        reserved = 0
        for index, route in enumerate(self.models):
            reserved += route.workers
            if route.workers and reserved > total:
                raise SettingError(
                    f"models[{index}].workers",
                    f"{reserved} worker processes reserved up to this entry, more than [inference] workers ({total}); "
                    "raise inference.workers or reserve fewer",
                )
        shared = [index for index, route in enumerate(self.models) if not route.workers]
        if reserved == total and shared:
            raise SettingError(
                f"models[{shared[0]}].workers",
                f"every one of the {total} worker processes is reserved, so model {self.models[shared[0]].name!r} "
                "would never run; raise inference.workers or reserve fewer",
            )

    def routes(self) -> tuple[ModelRoute, ...]:
        """The models the node serves, in configuration order.

        The ``[[models]]`` entries when there are any, and then ``[inference] model`` adds no
        route of its own (the other ``[inference]`` keys still apply). Without them, one
        implicit route named :data:`IMPLICIT_MODEL` for ``[inference] model``, which narrows
        nothing: the manifest's own input rules decide, as on a single-model node.
        """
        if self.models:
            return self.models
        return (ModelRoute(name=IMPLICIT_MODEL, package=self.inference.model),)


def _names_once(section: str, entries: tuple[Destination, ...] | tuple[ModelRoute, ...]) -> None:
    """Names are what the administrator, the CLI and the queue refer to an entry by: one each."""
    names: set[str] = set()
    for index, entry in enumerate(entries):
        if entry.name in names:
            raise SettingError(f"{section}[{index}].name", f"name {entry.name!r} is used twice")
        names.add(entry.name)


SECTIONS: dict[str, type[_Section]] = {
    "node": NodeSettings,
    "tls": TlsSettings,
    "study": StudySettings,
    "inference": InferenceSettings,
    "delivery": DeliverySettings,
    "storage": StorageSettings,
    "audit": AuditSettings,
    "destinations": Destination,
    "models": ModelRoute,
    "peers": Peer,
}
"""The TOML file's top-level keys and the model of each table (``destinations``, ``models``: of each entry)."""

TABLE_ARRAYS: dict[str, str] = {"destinations": "destination", "models": "model", "peers": "peer"}
"""The sections that are arrays of tables (``[[destinations]]``), overridden index-wise from the
environment, and what messages call one entry."""
