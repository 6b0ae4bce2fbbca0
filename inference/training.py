"""``triagenode model train``: a CNN trained on a site's labelled studies, packaged for the node.

* Studies are split into training and validation by study, stratified by
  label, never by slice: no study leaks into validation.
* Slice-level training where the labels give nodule positions (slices through
  a nodule are positive); multiple-instance learning otherwise (a study's
  score is the max over its slices, and the loss is on that score).
* Augmentation on whole batches (flips, small rotations and shifts, intensity
  jitter, noise), cross-entropy, Adam or SGD with momentum, a cosine learning
  rate schedule, early stopping on the validation AUC with the best weights
  kept, a JSON line per epoch, and a checkpoint after every epoch to resume.
* Deterministic for a seed on CPU; mixed precision (bf16) and pinned memory on CUDA.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from triagenode.config.settings import InferenceSettings
from triagenode.inference.architectures import CLASSIFIERS, build_network
from triagenode.inference.device import resolve_device
from triagenode.inference.labelled import LabelledDataError, labelled_series, slice_labels
from triagenode.inference.loader import SliceLoader
from triagenode.inference.metrics import roc_auc, threshold_for_sensitivity
from triagenode.inference.model_package import Manifest, save_package
from triagenode.inference.phantom import PhantomStudy, read_labels
from triagenode.inference.pipeline import SeriesGeometryError, series_inputs
from triagenode.inference.preprocessing import InputSpec
from triagenode.inference.studies import aggregate, slice_probabilities


class TrainingError(RuntimeError):
    """Training cannot run on this data or configuration; the text says what to change."""


@dataclass
class TrainingConfig:
    data_dir: Path
    labels: Path
    out: Path
    arch: str = "simplecnn"
    arch_params: dict[str, Any] = field(default_factory=dict)
    input: InputSpec = field(default_factory=InputSpec)
    epochs: int = 20
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.25
    seed: int = 0
    device: str = "auto"
    patience: int = 6
    target_sensitivity: float = 0.95
    """The operating threshold is the highest one reaching this sensitivity on validation."""
    name: str = "lung-nodule-triage"
    version: str = "0.1.0"
    intended_use: str = ""
    resume: Path | None = None
    slices_per_epoch: int | None = None
    """Cap on training slices drawn per epoch (slice-level mode); None uses every training slice once."""
    decoders: int | None = None
    """Decoder processes reading the studies; None: as a node's worker would on this machine."""
    lesions: Path | None = None
    """Detection: the lesion boxes (``lesions.csv``); None: ``lesions.csv`` next to the labels."""
    crop: int = 256
    """Detection: side of the square crops trained on, in input pixels (a multiple of the output stride)."""
    crops_per_epoch: int = 1024
    """Detection: crops drawn per epoch."""
    target_fp_per_image: float = 0.02
    """Detection: the operating threshold allows this many validation false positives per image (0.08 per
    four-view study); see ``inference.detection_training.operating_threshold``."""


@dataclass
class LabelledStudy:
    study_uid: str
    label: int
    series_uid: str
    """The series read: the one the node would read for this study (the manifest's selection rules)."""
    inputs: torch.Tensor
    """(slices, channels, H, W), float16 on the CPU."""
    slice_labels: np.ndarray | None
    """Per-slice labels from nodule positions; None for multiple-instance learning."""


def load_studies(
    data_dir: Path,
    labels: dict[str, PhantomStudy],
    spec: InputSpec,
    log: Callable[[str], None],
    decoders: int | None = None,
) -> list[LabelledStudy]:
    """Read and preprocess every labelled study once, as the node would; refuse missing or unreadable ones.

    The series is the node's choice and its input comes from the node's decoders
    and preprocessing (:func:`series_inputs`), so the model trains on the numbers
    it will see in production.
    """
    out = []
    started = time.perf_counter()
    with SliceLoader(InferenceSettings().decoders() if decoders is None else decoders) as loader:
        for labelled in labelled_series(data_dir, labels, spec):
            truth = labelled.truth
            try:
                layout, inputs = series_inputs(labelled.series, spec, loader)
            except SeriesGeometryError as exc:
                raise LabelledDataError(f"study {truth.study_uid}: {exc}") from None
            if truth.label == 1 and not truth.nodules:
                per_slice = None
            else:
                per_slice = slice_labels(layout.positions_mm, truth.nodules)
            out.append(LabelledStudy(truth.study_uid, truth.label, labelled.series.series_uid,
                                     inputs.to(torch.float16), per_slice))
    log(f"read {len(out)} studies in {time.perf_counter() - started:.1f} s")
    return out


class _Labelled(Protocol):
    label: int


def stratified_split(studies: Sequence[_Labelled], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of training and validation studies, each label split in the same proportion."""
    rng = random.Random(seed)  # noqa: S311 - reproducible augmentation for a seed
    train, validation = [], []
    for label in (0, 1):
        members = [i for i, s in enumerate(studies) if s.label == label]
        rng.shuffle(members)
        count = max(1, round(len(members) * fraction)) if len(members) > 1 else 0
        validation += members[:count]
        train += members[count:]
    if not validation or len({studies[i].label for i in validation}) < 2:
        raise TrainingError(
            "validation needs positive and negative studies: label at least 2 of each, or raise --val-fraction"
        )
    return sorted(train), sorted(validation)


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flips, rotations up to 10 degrees, shifts up to 6%, intensity jitter and noise, per sample."""
    n = batch.shape[0]
    device = batch.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return (torch.rand(shape or (n,), generator=generator) * (high - low) + low).to(device)

    angle = uniform(-math.pi / 18, math.pi / 18)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, uniform(-0.06, 0.06)], dim=1),
            torch.stack([sin * flip, cos, uniform(-0.06, 0.06)], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out * uniform(0.9, 1.1)[:, None, None, None] + uniform(-0.05, 0.05)[:, None, None, None]
    noise = torch.randn(out.shape, generator=generator).to(device) * 0.02
    return out + noise


def _evaluate(
    network: nn.Module, studies: list[LabelledStudy], device: torch.device
) -> tuple[float | None, np.ndarray]:
    scores = np.array(
        [aggregate(slice_probabilities(network, s.inputs.float(), 128, device)) for s in studies], dtype=float
    )
    labels = np.array([s.label for s in studies])
    return roc_auc(labels, scores), scores


def make_optimizer(
    config: TrainingConfig, network: nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW, or SGD with Nesterov momentum (the seed's recipe), and a cosine schedule over the epochs."""
    if config.optimizer not in ("adam", "sgd"):
        raise TrainingError(f"--optimizer {config.optimizer!r}: use adam or sgd")
    if config.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            network.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
    else:
        optimizer = torch.optim.SGD(
            network.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
        )
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))


def save_checkpoint(
    path: Path,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    state: dict[str, Any],
) -> None:
    """Everything ``--resume`` needs to go on exactly where an epoch ended: weights, optimiser, schedule, RNGs."""
    torch.save(
        {
            "network": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "state": state,
        },
        path,
    )


def load_checkpoint(
    path: Path,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the training state (epoch, best so far)."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    network.load_state_dict(saved["network"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    return saved["state"]


def seed_everything(seed: int, device: torch.device) -> torch.Generator:
    """Python's, numpy's and torch's RNGs from one seed (deterministic on CPU); returns the augmentation's generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def keep_if_best(state: dict[str, Any], key: str, score: float | None, epoch: int, network: nn.Module) -> bool:
    """End an epoch's bookkeeping: keep a copy of the weights when ``score`` beats ``state[key]``, else count a
    stale epoch (early stopping); returns whether it improved. A None score (undefined) never improves."""
    improved = score is not None and score > state[key] + 1e-6
    if improved:
        state.update({key: score, "best_epoch": epoch, "stale": 0})
        state["best_weights"] = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    else:
        state["stale"] += 1
    state["epoch"] = epoch
    return improved


def write_epoch_line(handle: TextIO, record: dict[str, Any]) -> None:
    """One JSON line per epoch in the training log, flushed (a killed run keeps every finished epoch)."""
    handle.write(json.dumps(record) + "\n")
    handle.flush()
    if sys.stderr.isatty():
        print("\r", end="", file=sys.stderr)  # end the progress line


def train(config: TrainingConfig, log: Callable[[str], None] = print) -> Manifest:
    """Train, keep the best epoch by validation AUC, write the model package; returns its manifest."""
    if config.optimizer not in ("adam", "sgd"):
        raise TrainingError(f"--optimizer {config.optimizer!r}: use adam or sgd")
    if config.arch not in CLASSIFIERS:
        raise TrainingError(f"--arch {config.arch!r} is a detector; train it with --task detection, or classify "
                            f"with one of {', '.join(CLASSIFIERS)}")
    device = resolve_device(config.device)
    generator = seed_everything(config.seed, device)

    labels = read_labels(config.labels)
    studies = load_studies(config.data_dir, labels, config.input, log, config.decoders)
    train_idx, val_idx = stratified_split(studies, config.val_fraction, config.seed)
    train_studies = [studies[i] for i in train_idx]
    val_studies = [studies[i] for i in val_idx]
    slice_mode = all(s.slice_labels is not None for s in studies)
    log(
        f"{len(train_studies)} training and {len(val_studies)} validation studies "
        f"({sum(s.label for s in train_studies)} and {sum(s.label for s in val_studies)} positive); "
        f"{'slice-level labels from nodule positions' if slice_mode else 'multiple-instance learning'}; device {device}"
    )

    # channels_last: twice the speed on CPU (oneDNN) and the layout tensor cores want.
    network = build_network(config.arch, config.input.channels, 2, config.arch_params).to(device)
    network = network.to(memory_format=torch.channels_last)
    optimizer, scheduler = make_optimizer(config, network)
    checkpoint_path = config.out.with_suffix(".ckpt")
    log_path = config.out.with_suffix(".log.jsonl")
    config.out.parent.mkdir(parents=True, exist_ok=True)
    state = {"epoch": 0, "best_auc": -1.0, "best_epoch": 0, "stale": 0, "best_weights": None}
    if config.resume:
        state = load_checkpoint(config.resume, network, optimizer, scheduler, generator)
        log(f"resumed from {config.resume} after epoch {state['epoch']}")

    if slice_mode:
        pool_inputs = torch.cat([s.inputs for s in train_studies])
        pool_labels = torch.from_numpy(np.concatenate([s.slice_labels for s in train_studies]))  # type: ignore[misc]
        positive_share = float(pool_labels.float().mean())
        # Draw positive slices about a third of the time: nodules are a few slices in a study.
        weights = torch.where(pool_labels == 1, (1 / 3) / max(positive_share, 1e-6), (2 / 3) / (1 - positive_share))
    use_amp = device.type == "cuda"
    log_handle = open(log_path, "a")
    try:
        for epoch in range(state["epoch"] + 1, config.epochs + 1):
            network.train()
            started = time.perf_counter()
            losses = []
            if slice_mode:
                count = config.slices_per_epoch or len(pool_labels)
                order = torch.multinomial(weights, count, replacement=True, generator=generator)
                batches = [order[i : i + config.batch_size] for i in range(0, count, config.batch_size)]
            else:
                order = torch.randperm(len(train_studies), generator=generator)
                batches = [order[i : i + 2] for i in range(0, len(order), 2)]
            for step, picked in enumerate(batches, start=1):
                if slice_mode:
                    x, y = pool_inputs[picked].float(), pool_labels[picked]
                else:
                    x = torch.cat([train_studies[int(i)].inputs for i in picked]).float()
                    y = torch.tensor([train_studies[int(i)].label for i in picked])
                    sizes = [len(train_studies[int(i)].inputs) for i in picked]
                if device.type == "cuda":
                    x = x.pin_memory().to(device, non_blocking=True)
                y = y.to(device)
                x = augment(x.to(device), generator).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = network(x).float()
                if slice_mode:
                    loss = F.cross_entropy(logits, y)
                else:
                    margins = torch.split(logits[:, 1] - logits[:, 0], sizes)
                    study_logit = torch.stack([m.max() for m in margins])
                    loss = F.binary_cross_entropy_with_logits(study_logit, y.float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                if sys.stderr.isatty():
                    print(
                        f"\repoch {epoch}/{config.epochs} [{step}/{len(batches)}] loss {np.mean(losses):.4f}",
                        end="",
                        file=sys.stderr,
                    )
            scheduler.step()
            auc, _ = _evaluate(network, val_studies, device)
            elapsed = time.perf_counter() - started
            improved = keep_if_best(state, "best_auc", auc, epoch, network)
            record = {
                "epoch": epoch,
                "train_loss": round(float(np.mean(losses)), 5),
                "val_auc": None if auc is None else round(auc, 5),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(elapsed, 2),
                "samples_per_s": round(sum(len(b) for b in batches) / elapsed, 1),
                "best_epoch": state["best_epoch"],
            }
            write_epoch_line(log_handle, record)
            log(
                f"epoch {epoch}/{config.epochs}: loss {record['train_loss']:.4f}, validation AUC "
                f"{'-' if auc is None else f'{auc:.4f}'}{' (best)' if improved else ''}, {elapsed:.1f} s"
            )
            save_checkpoint(checkpoint_path, network, optimizer, scheduler, generator, state)
            if state["stale"] >= config.patience:
                log(f"early stop: no better validation AUC for {config.patience} epochs")
                break
    finally:
        log_handle.close()

    if state["best_weights"] is not None:
        network.load_state_dict(state["best_weights"])
    network = network.to("cpu").to(memory_format=torch.contiguous_format)
    val_auc, val_scores = _evaluate(network, val_studies, torch.device("cpu"))
    val_labels = np.array([s.label for s in val_studies])
    threshold = threshold_for_sensitivity(val_labels, val_scores, config.target_sensitivity) or 0.5
    manifest = Manifest(
        name=config.name,
        version=config.version,
        architecture=config.arch,
        architecture_params=config.arch_params,
        input=config.input,
        threshold=round(threshold, 6),
        training={
            "data": config.data_dir.name,
            "studies": len(studies),
            "positives": sum(s.label for s in studies),
            "training_studies": len(train_studies),
            "validation_studies": len(val_studies),
            "validation_auc": None if val_auc is None else round(val_auc, 4),
            "labels": "slice-level from nodule positions" if slice_mode else "study-level (multiple-instance)",
            "epochs_run": state["epoch"],
            "best_epoch": state["best_epoch"],
            "optimizer": config.optimizer,
            "learning_rate": config.lr,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "threshold_rule": f"highest threshold with validation sensitivity >= {config.target_sensitivity}",
        },
        intended_use=config.intended_use,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    save_package(config.out, manifest, network)
    log(f"wrote {config.out} (best epoch {state['best_epoch']}, validation AUC {manifest.training['validation_auc']})")
    return manifest
