"""What the queue knows of a study when it routes it, and what routing decided: plain data, no SQLAlchemy.

When a study becomes complete, the scheduler hands a :class:`StudySummary`
(read from the queue's own tables: the series' modality, description, body
part, SOP classes and sizes, the study's description and the AEs that sent
it) to a router (``triagenode.inference.routing``), which answers one
:class:`RouteDecision` per configured model. The queue then records a task
for every model that matched and keeps every decision, with its reason, for
``queue show``. Kept apart from the router so that the storage layer never
imports the inference layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SeriesSummary:
    """One series of a complete study, as the receiver recorded it."""

    series_uid: str
    modality: str | None
    description: str | None
    """(0008,103E) Series Description."""
    body_part: str | None
    """(0018,0015) Body Part Examined of the series' first instance."""
    sop_classes: tuple[str, ...]
    instance_count: int


@dataclass(frozen=True)
class StudySummary:
    """A complete study, for routing."""

    study_uid: str
    description: str | None
    """(0008,1030) Study Description."""
    calling_aets: tuple[str, ...]
    """The AE titles that sent its instances."""
    series: tuple[SeriesSummary, ...]


@dataclass(frozen=True)
class RouteDecision:
    """Whether one configured model takes a study, and why (or why not)."""

    model: str
    matched: bool
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"model": self.model, "matched": self.matched, "reason": self.reason}


Router = Callable[[StudySummary], Sequence[RouteDecision]]
"""Decides, for a complete study, which models take it: one decision per configured model."""
