"""Which models take a complete study: the ``[[models]]`` routes narrowed by each package's manifest.

The node's queue calls a :class:`ModelRouter` (a ``triagenode.storage.routes.Router``)
once per complete study, with what the receiver recorded of it, and records a
task for every model that matched and every decision's reason for ``queue show``.
A route matches when one series passes the manifest's input rules (its modality,
SOP classes and fewest slices: what the model can read at all) and every route
key given (modalities, body part, series description: what the site wants it to
read), and the study passes the study-wide keys (study description, calling AEs).

The worker still chooses the series with
:func:`triagenode.inference.studies.select_series`, which also looks at what the
summary does not hold (image type, pixel data); the rules here are the same
ones, so a routed study normally finds its series, and when it does not the
task ends "not applicable" with the worker's reason.

Runs in the receiver's process: it reads manifests only (``manifest.json`` from
the zip) and must never import torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from triagenode.config import ConfigError, origin_of
from triagenode.inference.input_spec import FOR_PROCESSING_CLASSES
from triagenode.inference.model_package import Manifest, ModelPackageError, package_file, read_manifest
from triagenode.storage.routes import RouteDecision, SeriesSummary, StudySummary

if TYPE_CHECKING:
    from pydicom import Dataset

    from triagenode.config import ModelRoute, Settings
    from triagenode.inference.studies import StudyHeaders

__all__ = ["ModelRouter", "check_configured_models", "package_manifest", "package_path", "summary_of"]


def package_path(package: str) -> Path:
    """The file a route's ``package`` names: a built-in model's name (``"demo"``, ``"mammo-demo"``) or a path."""
    return package_file(package)


def package_manifest(package: str) -> Manifest:
    """The manifest of a route's package, without its weights (no torch)."""
    return read_manifest(package_path(package))


@dataclass(frozen=True)
class _Rules:
    """One route's rules, with its patterns compiled and its lists upper-cased once."""

    route: ModelRoute
    manifest: Manifest
    modalities: frozenset[str]
    body_parts: frozenset[str]
    series_description: re.Pattern[str] | None
    study_description: re.Pattern[str] | None

    @classmethod
    def of(cls, route: ModelRoute, manifest: Manifest) -> _Rules:
        return cls(
            route,
            manifest,
            frozenset(value.upper() for value in route.modalities),
            frozenset(value.upper() for value in route.body_parts),
            re.compile(route.series_description) if route.series_description else None,
            re.compile(route.study_description) if route.study_description else None,
        )

    def decide(self, study: StudySummary) -> RouteDecision:
        refusal = self._study_refusal(study)
        if refusal is None:
            fitting = [series for series in study.series if self._series_refusal(series) is None]
            if fitting:
                first = fitting[0]
                more = f" and {len(fitting) - 1} more" if len(fitting) > 1 else ""
                count = f"{first.instance_count} instance{'' if first.instance_count == 1 else 's'}"
                return RouteDecision(
                    self.route.name, True, f"matched: series {first.series_uid} ({first.modality}, {count}){more}"
                )
            refusal = self._no_series(study)
        return RouteDecision(self.route.name, False, refusal)

    def _study_refusal(self, study: StudySummary) -> str | None:
        """Why the study as a whole is not this route's (the calling AEs, the study description), if it is not."""
        wanted = self.route.calling_aets
        if wanted and not set(wanted) & set(study.calling_aets):
            sent_by = ", ".join(study.calling_aets) or "an unknown AE"
            return f"sent by {sent_by}, not one of {', '.join(wanted)}"
        return _mismatch("study", self.study_description, study.description)

    def _no_series(self, study: StudySummary) -> str:
        """Every series' reason, each said once, in the order the series came."""
        if not study.series:
            return "no series fits: the study has no series"
        reasons = dict.fromkeys(str(self._series_refusal(series)) for series in study.series)
        return "no series fits: " + "; ".join(reasons)

    def _series_refusal(self, series: SeriesSummary) -> str | None:
        """Why this model does not read this series, if it does not: the manifest's rules first, then the route's."""
        spec = self.manifest.input
        modality = series.modality or "unknown"
        if series.modality != spec.modality:
            return f"modality {modality} is not {spec.modality}"
        if self.modalities and modality.upper() not in self.modalities:
            return f"modality {modality} is not one of {', '.join(self.route.modalities)}"
        other = sorted(set(series.sop_classes) - set(spec.sop_classes)) if spec.sop_classes else []
        if self.manifest.task == "detection":
            # As select_images: a detector reads image by image, so one readable image in the series is enough.
            if other and len(other) == len(series.sop_classes):
                if set(other) <= FOR_PROCESSING_CLASSES:
                    return f"For Processing images only (SOP class {other[0]}): raw data the model does not read"
                return f"SOP class {other[0]} is not one the model reads"
        elif other:  # as select_series: every instance of the series must be of a class the model reads
            return f"SOP class {other[0]} is not one the model reads"
        if series.instance_count < spec.min_slices:
            return f"{series.instance_count} instances, the model needs {spec.min_slices}"
        if self.body_parts and (series.body_part or "").upper() not in self.body_parts:
            part = series.body_part or "unknown"
            return f"body part {part} is not one of {', '.join(self.route.body_parts)}"
        return _mismatch("series", self.series_description, series.description)


def _mismatch(level: str, pattern: re.Pattern[str] | None, description: str | None) -> str | None:
    """Why a study's or a series' description is not what the route asks for, if it is not.

    A missing description is searched as empty text, so ``^$`` can route studies that have none.
    """
    if pattern is None or pattern.search(description or ""):
        return None
    return f"{level} description {description or ''!r} does not match {pattern.pattern!r}"


class ModelRouter:
    """Decides, for a complete study, which of the configured models take it (a ``Router``).

    Built from the routes (:meth:`triagenode.config.Settings.routes`) and the manifest of
    each route's package; :meth:`from_settings` reads those. Immutable once built, so the
    queue's threads may share one.
    """

    def __init__(self, routes: Sequence[ModelRoute], manifests: Mapping[str, Manifest]) -> None:
        """``manifests`` maps each route's name to its package's manifest (two routes may share one)."""
        missing = [route.name for route in routes if route.name not in manifests]
        if missing:
            raise ValueError(f"no manifest for model {missing[0]!r}")
        self._rules = tuple(_Rules.of(route, manifests[route.name]) for route in routes)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        read_manifest: Callable[[str], Manifest] = package_manifest,
        environ: Mapping[str, str] | None = None,
    ) -> ModelRouter:
        """The router of the configured models, reading each package's manifest once (no weights, no torch).

        A package that is missing or unreadable, or a route whose ``modalities`` leave out the
        only modality its model reads, is a :class:`ConfigError` naming the key
        (``models[i].package``, or ``inference.model`` without ``[[models]]``) and where it was set.
        """
        environ = os.environ if environ is None else environ

        def refusal(key: str, message: str) -> ConfigError:
            return ConfigError(f"config error in {origin_of(key, environ, settings.source)}: {key}: {message}")

        read: dict[str, Manifest] = {}
        manifests: dict[str, Manifest] = {}
        for index, route in enumerate(settings.routes()):
            if route.package not in read:
                try:
                    read[route.package] = read_manifest(route.package)
                except ModelPackageError as exc:
                    key = f"models[{index}].package" if settings.models else "inference.model"  # the implicit route
                    raise refusal(key, str(exc)) from exc
            manifest = manifests[route.name] = read[route.package]
            modality = manifest.input.modality
            if route.modalities and modality.upper() not in {value.upper() for value in route.modalities}:
                raise refusal(
                    f"models[{index}].modalities",
                    f"model {manifest.name!r} reads {modality} only, so this route never matches; "
                    f"add {modality} or leave modalities out",
                )
        return cls(settings.routes(), manifests)

    @property
    def routes(self) -> tuple[ModelRoute, ...]:
        """The routes, in configuration order."""
        return tuple(rules.route for rules in self._rules)

    def manifest(self, model: str) -> Manifest:
        """The manifest of the named model's package (``model ls`` shows its name and version)."""
        for rules in self._rules:
            if rules.route.name == model:
                return rules.manifest
        raise KeyError(model)

    def __call__(self, study: StudySummary) -> list[RouteDecision]:
        """One decision per configured model, in configuration order, each with its reason."""
        return [rules.decide(study) for rules in self._rules]



def check_configured_models(settings: Settings, environ: Mapping[str, str] | None = None) -> ModelRouter | None:
    """The router of the configured models, or a :class:`ConfigError` for a package that is missing or unreadable.

    Kept out of :func:`triagenode.config.load_settings` on purpose: ``status``
    and ``queue`` must keep working on a node whose model file went missing.
    ``serve`` and ``config show`` call it, so both say the same thing and exit
    2. A node without workers (``workers = 0``) runs no model, so nothing is
    checked (None). Reads manifests only: no torch.
    """
    if not settings.inference.workers:
        return None
    return ModelRouter.from_settings(settings, environ=environ)


def summary_of(study: StudyHeaders) -> StudySummary:
    """What routing sees of a study read from files (``triagenode infer``): as the queue would record it.

    Files carry no calling AE, so a route limited to ``calling_aets`` matches no such study.
    """
    first = next((series.headers[0] for series in study.series if series.headers), None)
    return StudySummary(
        study_uid=study.study_uid,
        description=_header_text(first, "StudyDescription"),
        calling_aets=(),
        series=tuple(
            SeriesSummary(
                series.series_uid,
                series.modality or None,
                _header_text(series.headers[0] if series.headers else None, "SeriesDescription"),
                _header_text(series.headers[0] if series.headers else None, "BodyPartExamined"),
                tuple(sorted(series.sop_classes)),
                len(series.files),
            )
            for series in study.series
        ),
    )


def _header_text(header: Dataset | None, keyword: str) -> str | None:
    value = header.get(keyword) if header is not None else None
    return str(value).strip() or None if value not in (None, "") else None
