"""The model package: one file (``*.tnm``, a zip) that says exactly what a model is.

It holds ``manifest.json`` and ``weights.pt`` (a PyTorch state dict). The
manifest names the architecture and its parameters, the input spec, the
output labels and the finding's code, the operating threshold, a summary of
the training data, the evaluation it passed, the intended use, the creation
time and the SHA-256 of the weights. Loading checks the checksum and the
architecture, and refuses a bad file with one line that says what is wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from triagenode.inference.input_spec import ContrastRule, InputSpec

if TYPE_CHECKING:
    from torch import nn


FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"
DEMO_MODEL = Path(__file__).parent / "demo" / "demo.tnm"
"""The built-in demo model (``model = "demo"``): lung-nodule triage on chest CT."""
MAMMO_DEMO_MODEL = Path(__file__).parent / "demo" / "mammo-demo.tnm"
"""The built-in demo detector (``model = "mammo-demo"``): masses and calcification clusters on mammograms."""
BRAIN_DEMO_MODEL = Path(__file__).parent / "demo" / "brain-demo.tnm"
"""The built-in demo segmenter (``model = "brain-demo"``): brain lesions on T1, T2 and FLAIR."""
BUILTIN_MODELS: dict[str, Path] = {"demo": DEMO_MODEL, "mammo-demo": MAMMO_DEMO_MODEL, "brain-demo": BRAIN_DEMO_MODEL}
"""Names that work wherever a package path does (``--model``, ``package =``, ``[inference] model``)."""


def package_file(package: str | Path) -> Path:
    """The file a package name or path means: a built-in model's name (:data:`BUILTIN_MODELS`), else the path
    (``~`` expanded)."""
    return BUILTIN_MODELS.get(str(package)) or Path(package).expanduser()


class ModelPackageError(ValueError):
    """A model file the node refuses; ``str()`` is one line for the administrator."""


@dataclass(frozen=True)
class CodedConcept:
    """A coded concept as DICOM SR uses it (code value, coding scheme, meaning)."""

    value: str
    scheme: str
    meaning: str


NODULE = CodedConcept("27925004", "SCT", "Nodule")
LUNG = CodedConcept("39607008", "SCT", "Lung")
LESION = CodedConcept("52988006", "SCT", "Lesion")
BREAST = CodedConcept("76752008", "SCT", "Breast")
LEFT_BREAST = CodedConcept("80248007", "SCT", "Left breast")
RIGHT_BREAST = CodedConcept("73056007", "SCT", "Right breast")
MASS = CodedConcept("129788004", "SCT", "Mammographic breast mass")
CALCIFICATION_CLUSTER = CodedConcept("129769006", "SCT", "Calcification Cluster")
"""The breast findings as DICOM's Breast Imaging Finding (CID 6054) codes them in SNOMED CT; the Mammography CAD SR
maps them to its own single-image findings (CID 6014, :mod:`inference.mammo_cad_sr`)."""

Task = Literal["classification", "detection", "segmentation"]
TASKS: tuple[str, ...] = get_args(Task)


@dataclass(frozen=True)
class LesionClass:
    """One kind of lesion a detection model marks: its name in results and its code in reports."""

    name: str
    """As results and labels name it ("mass", "calcification"); the network's output channel i + 1 is class i."""
    code: CodedConcept


@dataclass(frozen=True)
class DetectionSpec:
    """How a detection model's output map becomes marked lesions (see :mod:`inference.detection`)."""

    classes: tuple[LesionClass, ...] = (
        LesionClass("mass", MASS),
        LesionClass("calcification", CALCIFICATION_CLUSTER),
    )
    output_stride: int = 4
    """Input pixels per output cell along each axis."""
    candidate_threshold: float = 0.05
    """Lowest certainty a candidate is kept at (FROC needs the low ones; reports show those at ``threshold``)."""
    max_per_image: int = 10
    """At most this many candidates per image, the most certain."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": [{"name": c.name, "code": asdict(c.code)} for c in self.classes],
            "output_stride": self.output_stride,
            "candidate_threshold": self.candidate_threshold,
            "max_per_image": self.max_per_image,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectionSpec:
        values = dict(data)
        if "classes" in values:
            values["classes"] = tuple(LesionClass(c["name"], CodedConcept(**c["code"])) for c in values["classes"])
        return cls(**values)

    def code_of(self, name: str) -> CodedConcept:
        for lesion_class in self.classes:
            if lesion_class.name == name:
                return lesion_class.code
        raise KeyError(name)


BRAIN_CONTRASTS: tuple[ContrastRule, ...] = (
    ContrastRule("FLAIR", series_description=r"flair", inversion_time_ms=(1200.0, None)),
    ContrastRule("T2", series_description=r"t2(?!.*flair)", echo_time_ms=(60.0, None)),
    ContrastRule("T1", series_description=r"t1", echo_time_ms=(None, 30.0)),
)
"""How a brain segmenter finds its contrasts (the first, FLAIR, is the grid it outlines on): FLAIR by its long
inversion time, T2 by its long echo time, T1 by its short one, each with a description that names it."""


@dataclass(frozen=True)
class SegmentationSpec:
    """What a segmentation model reads and outlines (see :mod:`inference.segmentation`)."""

    contrasts: tuple[ContrastRule, ...] = BRAIN_CONTRASTS
    """The series it needs, as channels in this order; the first is the reference grid (and the SEG's)."""
    classes: tuple[LesionClass, ...] = (LesionClass("lesion", LESION),)
    """One segment per class: output channel i + 1 is class i."""
    volume_threshold_ml: float = 1.0
    """The triage result: a lesion present when its volume reaches this."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "contrasts": [rule.to_dict() for rule in self.contrasts],
            "classes": [{"name": c.name, "code": asdict(c.code)} for c in self.classes],
            "volume_threshold_ml": self.volume_threshold_ml,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmentationSpec:
        values = dict(data)
        if "contrasts" in values:
            values["contrasts"] = tuple(ContrastRule.from_dict(rule) for rule in values["contrasts"])
        if "classes" in values:
            values["classes"] = tuple(LesionClass(c["name"], CodedConcept(**c["code"])) for c in values["classes"])
        return cls(**values)


@dataclass
class Manifest:
    """What a model package declares about itself."""

    name: str
    version: str
    architecture: str
    task: Task = "classification"
    """'classification' (one probability per study, from per-slice scores) or 'detection' (lesions marked
    per image, :attr:`detection`); packages written before the field existed are classifiers."""
    architecture_params: dict[str, Any] = field(default_factory=dict)
    input: InputSpec = field(default_factory=InputSpec)
    labels: list[str] = field(default_factory=lambda: ["absent", "present"])
    finding: CodedConcept = NODULE
    finding_site: CodedConcept | None = LUNG
    threshold: float = 0.5
    aggregation: str = "max"
    """How slice probabilities become the study's: 'max' (one positive slice is enough) or 'mean'."""
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    intended_use: str = ""
    created_at: str = ""
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION
    detection: DetectionSpec | None = None
    """For a detection model: its lesion classes and how its output map is read (None for a classifier)."""
    segmentation: SegmentationSpec | None = None
    """For a segmentation model: its contrasts, its classes, its volume threshold."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; this node runs {', '.join(TASKS)}")
        if self.task == "detection" and self.detection is None:
            raise ValueError("a detection model's manifest needs its 'detection' section (lesion classes)")
        if self.task == "segmentation" and self.segmentation is None:
            raise ValueError("a segmentation model's manifest needs its 'segmentation' section (contrasts, classes)")

    @property
    def in_channels(self) -> int:
        """The network's input channels: a segmenter's contrasts, else the input spec's (2.5D) channels."""
        return len(self.segmentation.contrasts) if self.segmentation is not None else self.input.channels

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input"] = self.input.to_dict()
        data["detection"] = self.detection.to_dict() if self.detection is not None else None
        data["segmentation"] = self.segmentation.to_dict() if self.segmentation is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        values = dict(data)
        values["input"] = InputSpec.from_dict(values.get("input", {}))
        values["finding"] = CodedConcept(**values["finding"])
        if values.get("finding_site"):
            values["finding_site"] = CodedConcept(**values["finding_site"])
        if values.get("detection"):
            values["detection"] = DetectionSpec.from_dict(values["detection"])
        if values.get("segmentation"):
            values["segmentation"] = SegmentationSpec.from_dict(values["segmentation"])
        return cls(**values)


@dataclass
class ModelPackage:
    """A loaded package: its manifest and its network with the weights in place (eval mode, CPU)."""

    manifest: Manifest
    network: nn.Module
    path: Path | None = None


def save_package(path: Path, manifest: Manifest, network: nn.Module) -> Manifest:
    """Write the package; the manifest's checksum is filled from the weights written."""
    import torch

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, buffer)
    weights = buffer.getvalue()
    manifest.weights_sha256 = hashlib.sha256(weights).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
        archive.writestr(WEIGHTS, weights)
    return manifest


def read_manifest(path: Path) -> Manifest:
    """The manifest alone (``model info``); no weights are loaded."""
    with _open(path) as archive:
        return _manifest(path, archive)


def load_package(path: Path | str) -> ModelPackage:
    """Load and check a package; a built-in model's name (``"demo"``, ``"mammo-demo"``) loads that model."""
    import torch

    from triagenode.inference.architectures import UnknownArchitectureError, build_network

    path = package_file(path)
    with _open(path) as archive:
        manifest = _manifest(path, archive)
        try:
            weights = archive.read(WEIGHTS)
        except KeyError:
            raise ModelPackageError(f"model {path} has no {WEIGHTS}; it is not a Triage Node model package") from None
    digest = hashlib.sha256(weights).hexdigest()
    if digest != manifest.weights_sha256:
        raise ModelPackageError(
            f"model {path}: the weights' SHA-256 is {digest[:12]}..., the manifest says "
            f"{manifest.weights_sha256[:12]}...; the file is damaged or was altered, get it again"
        )
    try:
        network = build_network(
            manifest.architecture, manifest.in_channels, len(manifest.labels), manifest.architecture_params
        )
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        network.load_state_dict(state)
    except UnknownArchitectureError as exc:
        raise ModelPackageError(f"model {path}: {exc}") from None
    except (RuntimeError, TypeError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelPackageError(
            f"model {path}: the weights do not fit architecture {manifest.architecture!r} ({first_line})"
        ) from None
    network.eval()
    return ModelPackage(manifest, network, path)


def _open(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ModelPackageError(
            f"model package {path} does not exist; check the path (or use a built-in model: "
            f"{', '.join(BUILTIN_MODELS)})"
        ) from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelPackageError(f"model {path} is not a model package (a .tnm zip): {exc}") from None


def _manifest(path: Path, archive: zipfile.ZipFile) -> Manifest:
    try:
        data = json.loads(archive.read(MANIFEST))
    except KeyError:
        raise ModelPackageError(f"model {path} has no {MANIFEST}; it is not a Triage Node model package") from None
    except json.JSONDecodeError as exc:
        raise ModelPackageError(f"model {path}: {MANIFEST} is not valid JSON ({exc})") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise ModelPackageError(
            f"model {path} has package format {data.get('format_version')!r}; this node reads format {FORMAT_VERSION}"
        )
    try:
        return Manifest.from_dict(data)
    except (TypeError, KeyError, ValueError) as exc:
        raise ModelPackageError(f"model {path}: the manifest is incomplete or has unknown fields ({exc})") from None
