"""Labelled studies on disk, and a model's per-slice and per-study scores.

Training and evaluation find studies by Study Instance UID (the labels file
names studies, not folders), read each through :mod:`inference.preprocessing`
and score it the way the node will: per-slice probabilities of the finding,
aggregated to the study as the manifest says.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from torch import nn

from triagenode.inference.phantom import Nodule, PhantomStudy
from triagenode.inference.preprocessing import InputSpec, SeriesGeometryError, Volume, read_series

_HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "Modality", "ImageType"]


@dataclass
class SeriesFiles:
    study_uid: str
    series_uid: str
    modality: str
    files: list[Path]


def index_series(data_dir: Path) -> dict[str, list[SeriesFiles]]:
    """Every DICOM file below ``data_dir``, grouped: study UID -> its series (headers only)."""
    groups: dict[tuple[str, str], SeriesFiles] = {}
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (InvalidDicomError, OSError, ValueError):
            continue
        if "StudyInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
            continue
        if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]:
            continue
        key = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        if key not in groups:
            groups[key] = SeriesFiles(key[0], key[1], str(ds.get("Modality", "")), [])
        groups[key].files.append(path)
    studies: dict[str, list[SeriesFiles]] = defaultdict(list)
    for series in groups.values():
        studies[series.study_uid].append(series)
    return dict(studies)


class LabelledDataError(ValueError):
    """Labelled data that training or evaluation cannot use; the text says what to fix."""


def labelled_volumes(
    data_dir: Path, labels: dict[str, PhantomStudy], spec: InputSpec
) -> Iterator[tuple[PhantomStudy, Volume]]:
    """Each labelled study with the volume of its main series, refusing missing or unreadable studies."""
    index = index_series(data_dir)
    missing = [uid for uid in labels if uid not in index]
    if missing:
        raise LabelledDataError(
            f"{len(missing)} labelled studies are not under {data_dir}, e.g. {missing[0]}; "
            "check --data and --labels belong together"
        )
    for uid, labelled in labels.items():
        series = main_series(index[uid], spec)
        if series is None:
            raise LabelledDataError(f"study {uid} has no {spec.modality} series with at least {spec.min_slices} slices")
        try:
            yield labelled, read_series(series.files)
        except SeriesGeometryError as exc:
            raise LabelledDataError(f"study {uid}: {exc}") from None


def main_series(series: Iterable[SeriesFiles], spec: InputSpec) -> SeriesFiles | None:
    """The series a model reads from a labelled study: the right modality, then the most instances."""
    candidates = [s for s in series if s.modality == spec.modality and len(s.files) >= spec.min_slices]
    return max(candidates, key=lambda s: len(s.files), default=None)


def slice_labels(volume: Volume, nodules: list[Nodule]) -> np.ndarray:
    """1 for slices that pass through a nodule's central 80%, else 0 (positions along the normal)."""
    labels = np.zeros(len(volume.positions_mm), dtype=np.int64)
    for nodule in nodules:
        labels[np.abs(volume.positions_mm - nodule.z) <= 0.4 * nodule.diameter] = 1
    return labels


@torch.inference_mode()
def slice_probabilities(
    network: nn.Module, inputs: torch.Tensor, batch_size: int = 64, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Probability of the finding (class 1) for each slice."""
    network.eval()
    device = torch.device(device)
    out = [batch_probabilities(network, inputs[start : start + batch_size], device)
           for start in range(0, len(inputs), batch_size)]  # fmt: skip
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


@torch.inference_mode()
def batch_probabilities(network: nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One forward pass: channels-last input, bf16 autocast on CUDA; the probabilities back on the CPU."""
    batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = network(batch)
    return torch.softmax(logits.float(), dim=1)[:, 1].cpu()


def aggregate(probabilities: np.ndarray, how: str = "max") -> float:
    """A study's probability from its slices'."""
    if len(probabilities) == 0:
        return 0.0
    if how == "max":
        return float(np.max(probabilities))
    if how == "mean":
        return float(np.mean(probabilities))
    raise ValueError(f"unknown aggregation {how!r}; use 'max' or 'mean'")
