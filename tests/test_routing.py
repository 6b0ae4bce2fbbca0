"""Routing: which configured models take a complete study, and the reason for each (no node, no torch)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from triagenode.config import IMPLICIT_MODEL, ConfigError, ModelRoute, Settings, load_settings
from triagenode.inference.model_package import Manifest
from triagenode.inference.routing import ModelRouter, package_manifest
from triagenode.storage.routes import SeriesSummary, StudySummary

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
DEMO = package_manifest("demo")
"""The demo model's manifest: CT, any SOP class, at least 16 slices."""
MR_MODEL = replace(DEMO, name="mr-model", input=replace(DEMO.input, modality="MR", sop_classes=(MR_IMAGE,)))


def ct(uid: str = "1.2.3", count: int = 64, *, body_part: str | None = "CHEST", description: str | None = "Thorax 1mm",
       sop_class: str = CT_IMAGE, modality: str | None = "CT") -> SeriesSummary:
    return SeriesSummary(uid, modality, description, body_part, (sop_class,), count)


def mr(uid: str = "1.2.4", count: int = 40) -> SeriesSummary:
    return SeriesSummary(uid, "MR", "T1 axial", "HEAD", (MR_IMAGE,), count)


def study(
    *series: SeriesSummary, description: str | None = "CT CHEST", sent_by: tuple[str, ...] = ("CT1",)
) -> StudySummary:
    return StudySummary("9.8.7", description, sent_by, series)


MATCHED = "matched: series 1.2.3 (CT, 64 instances)"


def route(name: str = "lung", **keys: object) -> ModelRoute:
    return ModelRoute.model_validate({"name": name, "package": "demo", **keys})


def decide(study: StudySummary, **keys: object) -> tuple[bool, str]:
    """The one decision of one route on the demo model."""
    (decision,) = ModelRouter([route(**keys)], {"lung": DEMO})(study)
    assert decision.model == "lung" and "\n" not in decision.reason
    return decision.matched, decision.reason


def test_the_implicit_route_takes_what_the_manifest_reads() -> None:
    router = ModelRouter(Settings().routes(), {IMPLICIT_MODEL: DEMO})
    (decision,) = router(study(ct("1.2.3", 64)))
    assert decision.as_dict() == {"model": "default", "matched": True, "reason": MATCHED}
    assert router(study(ct("1.2.3", 64), ct("1.2.5", 20)))[0].reason == f"{MATCHED} and 1 more"


@pytest.mark.parametrize(
    ("series", "reason"),
    [
        (mr(), "no series fits: modality MR is not CT"),
        (ct(modality=None), "no series fits: modality unknown is not CT"),
        (ct(count=3), "no series fits: 3 instances, the model needs 16"),
    ],
)
def test_the_manifests_own_rules_refuse_with_the_reason(series: SeriesSummary, reason: str) -> None:
    assert decide(study(series)) == (False, reason)


def test_the_manifests_sop_classes_refuse_a_series_of_another_class() -> None:
    strict = replace(DEMO, input=replace(DEMO.input, sop_classes=(CT_IMAGE,)))
    router = ModelRouter([route()], {"lung": strict})
    assert router(study(ct(sop_class=CT_IMAGE)))[0].matched
    (decision,) = router(study(ct(sop_class=ENHANCED_CT)))
    assert not decision.matched
    assert decision.reason == f"no series fits: SOP class {ENHANCED_CT} is not one the model reads"


@pytest.mark.parametrize(
    ("keys", "matched", "reason"),
    [
        ({"modalities": ["ct"]}, True, MATCHED),
        ({"body_parts": ["chest", "LUNG"]}, True, MATCHED),
        ({"body_parts": ["HEAD"]}, False, "no series fits: body part CHEST is not one of HEAD"),
        ({"series_description": "(?i)thorax|chest"}, True, MATCHED),
        ({"series_description": "^Lung"}, False, "no series fits: series description 'Thorax 1mm' does not match "
                                                  "'^Lung'"),
        ({"study_description": "(?i)chest"}, True, MATCHED),
        ({"study_description": "HEAD"}, False, "study description 'CT CHEST' does not match 'HEAD'"),
        ({"calling_aets": ["CT1", "CT2"]}, True, MATCHED),
        ({"calling_aets": ["CT9"]}, False, "sent by CT1, not one of CT9"),
    ],
)
def test_each_route_key_narrows_with_a_reason(keys: dict[str, object], matched: bool, reason: str) -> None:
    assert decide(study(ct()), **keys) == (matched, reason)


def test_a_series_must_pass_every_key_itself() -> None:
    """The body part of one series and the description of another do not make a match together."""
    chest = ct("1.2.3", body_part="CHEST", description="Abdomen")
    thorax = ct("1.2.5", body_part="ABDOMEN", description="Thorax")
    matched, reason = decide(study(chest, thorax), body_parts=["CHEST"], series_description="Thorax")
    assert not matched
    assert reason == ("no series fits: series description 'Abdomen' does not match 'Thorax'; "
                      "body part ABDOMEN is not one of CHEST")
    matched, reason = decide(study(chest, thorax, mr()), series_description="Thorax")
    assert (matched, reason) == (True, "matched: series 1.2.5 (CT, 64 instances)")


def test_missing_values_are_said_and_match_no_list() -> None:
    assert decide(study(ct(body_part=None)), body_parts=["CHEST"]) == (
        False, "no series fits: body part unknown is not one of CHEST")
    assert decide(study(ct(description=None)), series_description="x") == (
        False, "no series fits: series description '' does not match 'x'")
    assert decide(study(ct(), sent_by=()), calling_aets=["CT1"]) == (False, "sent by an unknown AE, not one of CT1")
    assert decide(study(), modalities=["CT"]) == (False, "no series fits: the study has no series")


def test_two_routes_on_one_package_are_two_models() -> None:
    routes = [route("lung-site-a", calling_aets=["CTA"]), route("lung-site-b", calling_aets=["CTB"])]
    router = ModelRouter(routes, {"lung-site-a": DEMO, "lung-site-b": DEMO})
    decisions = router(study(ct(), sent_by=("CTB",)))
    assert [(d.model, d.matched) for d in decisions] == [("lung-site-a", False), ("lung-site-b", True)]
    assert decisions[0].reason == "sent by CTB, not one of CTA"


def test_a_study_can_match_several_models_or_none() -> None:
    routes = [route("lung"), ModelRoute(name="brain", package="mr.tnm")]
    router = ModelRouter(routes, {"lung": DEMO, "brain": MR_MODEL})
    assert [d.matched for d in router(study(ct(), mr()))] == [True, True]
    assert [d.matched for d in router(study(mr()))] == [False, True]
    nothing = router(study(ct(count=2), SeriesSummary("1.2.6", "US", None, None, ("1.2.840.10008.5.1.4.1.1.6.1",), 1)))
    assert [d.as_dict() for d in nothing] == [
        {"model": "lung", "matched": False,
         "reason": "no series fits: 2 instances, the model needs 16; modality US is not CT"},
        {"model": "brain", "matched": False, "reason": "no series fits: modality CT is not MR; modality US is not MR"},
    ]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "triagenode.toml"
    path.write_text(text)
    return path


def test_from_settings_reads_each_package_once(tmp_path: Path) -> None:
    text = '[[models]]\nname = "a"\npackage = "demo"\n[[models]]\nname = "b"\npackage = "demo"\n' \
           '[[models]]\nname = "c"\npackage = "mr.tnm"\npriority = 3\n'
    settings = load_settings(write(tmp_path, text), environ={})
    read: list[str] = []

    def reader(package: str) -> Manifest:
        read.append(package)
        return MR_MODEL if package == "mr.tnm" else DEMO

    router = ModelRouter.from_settings(settings, read_manifest=reader, environ={})
    assert read == ["demo", "mr.tnm"]
    assert [r.name for r in router.routes] == ["a", "b", "c"] and router.manifest("c") is MR_MODEL
    assert [d.matched for d in router(study(mr()))] == [False, False, True]


def test_from_settings_refuses_an_unreadable_package_with_one_line(tmp_path: Path) -> None:
    models = '[[models]]\nname = "a"\npackage = "demo"\n[[models]]\nname = "b"\npackage = "/nowhere/x.tnm"\n'
    path = write(tmp_path, models)
    with pytest.raises(ConfigError) as raised:
        ModelRouter.from_settings(load_settings(path, environ={}), environ={})
    assert str(raised.value) == (
        f"config error in {path}: models[1].package: model package /nowhere/x.tnm does not exist; "
        "check the path (or use a built-in model: demo, mammo-demo, brain-demo)"
    )
    environ = {"TRIAGENODE_INFERENCE__MODEL": str(tmp_path / "gone.tnm")}
    with pytest.raises(ConfigError, match=r"^config error in environment variable TRIAGENODE_INFERENCE__MODEL: "
                                          r"inference\.model: model .*gone\.tnm does not exist"):
        ModelRouter.from_settings(load_settings(None, environ=environ), environ=environ)


def test_from_settings_refuses_a_route_whose_modalities_exclude_its_model(tmp_path: Path) -> None:
    path = write(tmp_path, '[[models]]\nname = "a"\npackage = "demo"\nmodalities = ["MR"]\n')
    with pytest.raises(ConfigError) as raised:
        ModelRouter.from_settings(load_settings(path, environ={}), environ={})
    assert str(raised.value) == (
        f"config error in {path}: models[0].modalities: model 'triagenode-demo-lung-nodule' reads CT only, "
        "so this route never matches; add CT or leave modalities out"
    )


def test_routing_imports_no_torch() -> None:
    """The router runs in the receiver's process, which must not load libtorch."""
    code = "import sys, triagenode.inference.routing\nassert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
