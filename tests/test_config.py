"""Configuration: the file, the environment, and a start refused with one line that names the key."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from triagenode.config import ConfigError, load_settings, settings_as_dict

from nodes import TRIAGENODE


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TRIAGENODE, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "triagenode.toml"
    path.write_text(text)
    return path


def test_example_config_is_valid_and_matches_the_embedded_defaults() -> None:
    example = Path(__file__).parent.parent / "deploy" / "triagenode.example.toml"
    settings = load_settings(example, environ={})
    assert settings.node.ae_title == "TRIAGENODE" and settings.node.port == 11112
    assert str(settings.node.data_dir) == "/var/lib/triagenode"
    assert settings.study.stable_seconds == 30
    assert settings.destinations == (), "left unedited, the example sends reports nowhere (no retry storm)"
    text = example.read_text()
    assert "#[[destinations]]" in text, "the destination stays there as an example to uncomment"


def test_unknown_key_stops_serve_with_one_line_naming_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nae_title = "NODE"\nprot = 104\n')
    result = run("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"config error in {path}: node.prot: unknown key" in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node]\nport = 70000\n", "node.port: port 70000 is out of range"),
        ('[node]\nport = "11112"\n', "node.port: expected an integer"),
        (
            '[node]\nae_title = "A_VERY_LONG_AE_TITLE"\n',
            "node.ae_title: AE title 'A_VERY_LONG_AE_TITLE' is 20 characters",
        ),
        ("[study]\nstable_seconds = 0\n", "study.stable_seconds: 0 must be above 0"),
        ('[node]\nallowed_calling_aets = "PACS"\n', "node.allowed_calling_aets: expected a list of strings"),
        ("[nodes]\n", "nodes: unknown section [nodes]"),
        ('[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "x"\n', "destinations[0].port: is required"),
        ("[node\n", "is not valid TOML"),
    ],
)
def test_impossible_values_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, text), environ={})
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_environment_overrides_every_section(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[node]\nport = 104\n[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\nport = 4242\n'
    )
    env = {
        "TRIAGENODE_NODE__PORT": "11113",
        "TRIAGENODE_NODE__ALLOWED_CALLING_AETS": "PACS, CT1",
        "TRIAGENODE_STUDY__STABLE_SECONDS": "7.5",
        "TRIAGENODE_DESTINATIONS__0__PORT": "4343",
    }
    result = run("config", "show", "--json", "--config", str(path), env=env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["node"]["port"] == 11113
    assert shown["node"]["allowed_calling_aets"] == ["PACS", "CT1"]
    assert shown["study"]["stable_seconds"] == 7.5
    assert shown["destinations"][0]["port"] == 4343
    assert shown["source"] == str(path)


def test_the_environment_can_add_a_destination_after_the_files(tmp_path: Path) -> None:
    path = write(tmp_path, '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\nport = 4242\n')
    added = {"NAME": "archive", "AE_TITLE": "ARCHIVE", "HOST": "10.0.0.9", "PORT": "104"}
    env = {f"TRIAGENODE_DESTINATIONS__1__{key}": value for key, value in added.items()}
    result = run("config", "show", "--json", "--config", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["destinations"][1] == {"name": "archive", "ae_title": "ARCHIVE",
                                                            "host": "10.0.0.9", "port": 104, "tls": False,
                                                            "ca_certificates": None, "certificate": None,
                                                            "private_key": None}
    env.pop("TRIAGENODE_DESTINATIONS__1__HOST")
    result = run("config", "show", "--config", str(path), env=env)
    assert result.returncode == 2 and "also needs TRIAGENODE_DESTINATIONS__1__HOST" in result.stderr
    gap = {k.replace("__1__", "__2__"): v for k, v in env.items()}
    result = run("config", "show", "--config", str(path), env=gap)
    assert result.returncode == 2 and "destination 2 would leave a gap; the next destination is 1" in result.stderr


def test_a_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    result = run("config", "show", "--config", str(path), env={"TRIAGENODE_NODE__PORT": "70000"})
    assert result.returncode == 2
    assert "environment variable TRIAGENODE_NODE__PORT: node.port: port 70000 is out of range" in result.stderr
    result = run("config", "show", "--config", str(path), env={"TRIAGENODE_NODE__PORT": "0"})
    assert result.returncode == 2
    assert "TRIAGENODE_NODE__PORT: node.port: 0 (TLS only) needs [tls] port" in result.stderr
    result = run("config", "show", "--config", str(path), env={"TRIAGENODE_NODE__PROT": "1"})
    assert result.returncode == 2 and "TRIAGENODE_NODE__PROT: unknown key node.prot" in result.stderr


def test_without_a_config_file_data_goes_under_the_users_home(tmp_path: Path) -> None:
    if Path("/etc/triagenode/triagenode.toml").exists():
        pytest.skip("this machine has an installed node's config")
    result = run("config", "show", "--json", env={"XDG_DATA_HOME": str(tmp_path / "share")})
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["source"] == "embedded defaults"
    assert shown["node"]["data_dir"] == str(tmp_path / "share" / "triagenode")


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    result = run("serve", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "nope.toml does not exist" in result.stderr


def test_serve_refuses_a_missing_model_with_one_line(tmp_path: Path) -> None:
    path = write(
        tmp_path, f'[node]\ndata_dir = "{tmp_path / "data"}"\nport = 11999\n[inference]\nmodel = "/nowhere/lung.tnm"\n'
    )
    result = run("serve", "--config", str(path))
    assert result.returncode == 2, "a configuration error"
    assert result.stderr.strip() == (
        f"triagenode: config error in {path}: inference.model: model package /nowhere/lung.tnm does not exist; "
        "check the path (or use a built-in model: demo, mammo-demo, brain-demo)"
    )


ONE_DESTINATION = '[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 1\n'
ONE_MODEL = '[[models]]\nname = "m"\npackage = "demo"\n'
ANOTHER_MODEL = '[[models]]\nname = "n"\npackage = "demo"\n'


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ('[inference]\nsr_sop_class = "basic"\n', {}, "sr_sop_class: 'basic': use comprehensive3d or comprehensive"),
        ('[inference]\ncontent_qualification = "x"\n', {}, "content_qualification: 'x': use RESEARCH or PRODUCT"),
        ('[inference]\ndevice = "gpu"\n', {}, "inference.device: 'gpu': use auto, cpu, cuda or cuda:N"),
        ("[delivery]\nmax_backoff_s = 5\n", {}, "delivery.max_backoff_s: 5 is below initial_backoff_s (10)"),
        ('[node]\nallowed_calling_aets = ["PACS", "A\\\\B"]\n', {}, "allowed_calling_aets[1]: AE title 'A\\\\B' holds"),
        ("", {"TRIAGENODE_NODE__PORT": "x"}, "variable TRIAGENODE_NODE__PORT: node.port: expected an integer"),
        ("", {"TRIAGENODE_INFERENCE__REPORT_NOT_APPLICABLE": "maybe"}, "applicable: expected true or false"),
        (
            "",
            {"TRIAGENODE_NODE__ALLOWED_CALLING_AETS": "PACS,A_VERY_LONG_AE_TITLE"},
            "variable TRIAGENODE_NODE__ALLOWED_CALLING_AETS: node.allowed_calling_aets[1]: AE title",
        ),
        ("", {"TRIAGENODE_FOO__BAR": "1"}, "TRIAGENODE_FOO__BAR: not a setting; use TRIAGENODE_<SECTION>__<KEY>"),
        (
            ONE_DESTINATION,
            {"TRIAGENODE_DESTINATIONS__0__PORT": "0"},
            "variable TRIAGENODE_DESTINATIONS__0__PORT: destinations[0].port: port 0 is out of range",
        ),
        (ONE_DESTINATION * 2, {}, "destinations[1].name: name 'a' is used twice"),
        ('source = "x"\n', {}, "source: unknown section [source]"),
        (ONE_MODEL * 2, {}, "models[1].name: name 'm' is used twice"),
        ('[[models]]\nname = "a b"\npackage = "demo"\n', {}, "models[0].name: 'a b': use 1-64 letters, digits"),
        (ONE_MODEL + 'series_description = "(?i)chest("\n', {}, "models[0].series_description: '(?i)chest(' is not a"),
        (ONE_MODEL, {"TRIAGENODE_MODELS__0__STUDY_DESCRIPTION": "["}, "MODELS__0__STUDY_DESCRIPTION: models[0].study_"),
        (
            ONE_DESTINATION + ONE_MODEL + 'destinations = ["a", "pacs"]\n',
            {},
            "models[0].destinations: no [[destinations]] is named 'pacs'; configured: a",
        ),
        (
            "[inference]\nworkers = 2\n" + ONE_MODEL + "workers = 2\n" + ANOTHER_MODEL + "workers = 1\n",
            {},
            "models[1].workers: 3 worker processes reserved up to this entry, more than [inference] workers (2)",
        ),
        (
            "[inference]\nworkers = 2\n" + ONE_MODEL + "workers = 2\n" + ANOTHER_MODEL,
            {},
            "models[1].workers: every one of the 2 worker processes is reserved, so model 'n' would never run",
        ),
        (ONE_MODEL + "colour = 1\n", {}, "models[0].colour: unknown key; known keys: name, package, priority"),
        ('[[models]]\nname = "m"\n', {}, "models[0].package: is required"),
        ('[models]\nname = "m"\n', {}, "models: use [[models]] tables, one per model"),
        (ONE_MODEL, {"TRIAGENODE_MODELS__0__WORKERS": "-1"}, "MODELS__0__WORKERS: models[0].workers: -1 is below"),
        (ONE_MODEL, {"TRIAGENODE_MODELS__1__NAME": "x"}, "model defined in the environment also needs "
                                                         "TRIAGENODE_MODELS__1__PACKAGE"),
    ],
)
def test_every_refusal_is_one_line_naming_key_and_origin(
    tmp_path: Path, text: str, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, text), environ=environ)
    assert message in str(raised.value)
    assert str(raised.value).startswith("config error in ") and "\n" not in str(raised.value)


def test_the_environment_overrides_before_anything_is_checked(tmp_path: Path) -> None:
    """A bad value in the file that a variable replaces does not stop the start (a container's override)."""
    path = write(tmp_path, "[node]\nport = 70000\n")
    env = {"TRIAGENODE_NODE__PORT": "104", "TRIAGENODE_INFERENCE__REPORT_NOT_APPLICABLE": "yes", "TRIAGENODE_X": "1"}
    settings = load_settings(path, environ=env)
    assert settings.node.port == 104 and settings.inference.report_not_applicable is True


def test_settings_are_frozen_and_travel_to_worker_processes(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[node]\ndata_dir = "~/tn"\n' + ONE_DESTINATION), environ={})
    assert settings.node.data_dir == Path.home() / "tn" and settings.node.database_path.name == "triagenode.db"
    assert pickle.loads(pickle.dumps(settings)) == settings, "spawned workers get them pickled"
    with pytest.raises(ValueError):
        settings.node.port = 1  # type: ignore[misc]
    shown = settings_as_dict(settings)["destinations"]
    assert [{key: entry[key] for key in ("name", "ae_title", "host", "port", "tls")} for entry in shown] == [
        {"name": "a", "ae_title": "A", "host": "h", "port": 1, "tls": False}
    ]


def test_importing_the_package_does_not_import_pydantic() -> None:
    """--help and echo never load settings; they must not pay for pydantic's import (the start-up target)."""
    code = "import sys\nfrom triagenode.config import ConfigError, load_settings\nassert 'pydantic' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_large_initial_backoff_alone_is_refused_against_the_default_maximum(tmp_path: Path) -> None:
    path = write(tmp_path, "[delivery]\ninitial_backoff_s = 3000\n")
    with pytest.raises(ConfigError, match=r"delivery\.max_backoff_s: 1800 is below initial_backoff_s \(3000\)"):
        load_settings(path, environ={})


def test_config_show_prints_whole_seconds_as_written() -> None:
    shown = settings_as_dict(load_settings(None, environ={}))
    assert shown["study"]["stable_seconds"] == 30 and isinstance(shown["study"]["stable_seconds"], int)
    assert (shown["delivery"]["initial_backoff_s"], shown["delivery"]["max_backoff_s"]) == (10, 1800)


TWO_MODELS = """
[inference]
workers = 2
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "h"
port = 104
[[models]]
name = "lung-nodule"
package = "demo"
priority = 0
modalities = ["CT"]
body_parts = ["CHEST", "LUNG", "THORAX"]
series_description = "(?i)thorax|chest|lung"
destinations = ["pacs"]
workers = 1
[[models]]
name = "mammo-lesion"
package = "/var/lib/triagenode/models/mammo.tnm"
modalities = ["MG"]
calling_aets = ["MG1"]
"""


def test_a_file_with_two_models_loads_and_shows(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, TWO_MODELS), environ={})
    assert settings.routes() == settings.models and [m.name for m in settings.models] == ["lung-nodule", "mammo-lesion"]
    lung, mammo = settings.models
    assert lung.body_parts == ("CHEST", "LUNG", "THORAX") and lung.destinations == ("pacs",) and lung.workers == 1
    assert mammo.priority == 0 and mammo.series_description == "" and mammo.calling_aets == ("MG1",)
    shown = settings_as_dict(settings)["models"]
    assert [model["name"] for model in shown] == ["lung-nodule", "mammo-lesion"]
    assert shown[1] == {"name": "mammo-lesion", "package": "/var/lib/triagenode/models/mammo.tnm", "priority": 0,
                        "modalities": ["MG"], "body_parts": [], "series_description": "", "study_description": "",
                        "calling_aets": ["MG1"], "destinations": [], "workers": 0, "mammo_sr": None}
    assert pickle.loads(pickle.dumps(settings)) == settings
    receive_only = load_settings(write(tmp_path, TWO_MODELS), environ={"TRIAGENODE_INFERENCE__WORKERS": "0"})
    assert receive_only.models[0].workers == 1, "a node that runs no model leaves its reservations unchecked"


def test_without_models_the_inference_model_is_the_one_implicit_route(tmp_path: Path) -> None:
    from triagenode.config import IMPLICIT_MODEL, ModelRoute

    settings = load_settings(write(tmp_path, '[inference]\nmodel = "/srv/lung.tnm"\n'), environ={})
    assert settings.models == () and IMPLICIT_MODEL == "default"
    assert settings.routes() == (ModelRoute(name="default", package="/srv/lung.tnm"),)
    assert settings_as_dict(settings)["models"] == [], "config show prints the file's models, not the implicit one"
    with_models = load_settings(write(tmp_path, '[inference]\nmodel = "/srv/lung.tnm"\n' + ONE_MODEL), environ={})
    assert [route.package for route in with_models.routes()] == ["demo"], "[[models]] replaces [inference] model"


def test_the_environment_overrides_and_adds_models_by_index(tmp_path: Path) -> None:
    path = write(tmp_path, TWO_MODELS)
    env = {
        "TRIAGENODE_INFERENCE__WORKERS": "3",
        "TRIAGENODE_MODELS__0__PRIORITY": "5",
        "TRIAGENODE_MODELS__0__BODY_PARTS": "CHEST, LUNG",
        "TRIAGENODE_MODELS__1__PACKAGE": "demo",
        "TRIAGENODE_MODELS__2__NAME": "brain",
        "TRIAGENODE_MODELS__2__PACKAGE": "/srv/brain.tnm",
        "TRIAGENODE_MODELS__2__WORKERS": "1",
        "TRIAGENODE_MODELS__2__SERIES_DESCRIPTION": "(?i)t1,axial",
    }
    lung, mammo, brain = load_settings(path, environ=env).models
    assert (lung.priority, lung.body_parts, lung.series_description) == (5, ("CHEST", "LUNG"), "(?i)thorax|chest|lung")
    assert mammo.package == "demo" and mammo.modalities == ("MG",)
    assert (brain.name, brain.package, brain.workers) == ("brain", "/srv/brain.tnm", 1)
    assert brain.series_description == "(?i)t1,axial", "a regex is one value, never split at its commas"
    gap = {"TRIAGENODE_MODELS__3__NAME": "x", "TRIAGENODE_MODELS__3__PACKAGE": "demo"}
    with pytest.raises(ConfigError, match=r"MODELS__3__NAME: model 3 would leave a gap; the next model is 2$"):
        load_settings(path, environ=gap)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("10.1.2.0/24", "10.1.2.0/24"),
        ("ct1.example.org", "ct1.example.org"),
        ("::ffff:10.1.2.3", "10.1.2.3/32"),  # written as the node sees a dual-stack peer
        ("ct1..example.org", None),  # the resolver raises on it: it must stop the start, not open the door
        ("10.1.2", None),  # the resolver reads it as 10.1.0.2
        ("010.1.2.3", None),  # and this as octal
        ("a" * 64 + ".example.org", None),
        ("10.1.2.0/33", None),
    ],
)
def test_peer_hosts_are_addresses_networks_or_host_names(tmp_path: Path, host: str, expected: str | None) -> None:
    path = write(tmp_path, f'[[peers]]\nae_title = "CT1"\nhosts = ["{host}"]\n')
    if expected is None:
        with pytest.raises(ConfigError, match=r"peers\[0\]\.hosts\[0\]: .* is neither an address"):
            load_settings(path, environ={})
    else:
        assert load_settings(path, environ={}).peers[0].hosts == (expected,)


def test_tls_settings_name_what_is_missing(tmp_path: Path) -> None:
    cases = {
        "[tls]\nport = 2762\n": "tls.certificate: is required when [tls] port is set",
        '[tls]\nport = 2762\ncertificate = "c"\nprivate_key = "k"\n': "tls.ca_certificates: is required with "
        "require_client_certificate",
        '[node]\nport = 0\n': "node.port: 0 (TLS only) needs [tls] port",
        '[tls]\nport = 11112\ncertificate = "c"\nprivate_key = "k"\nrequire_client_certificate = false\n':
            "tls.port: 11112 is also [node] port",
        '[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 1\ntls = true\nprivate_key = "k"\n':
            "destinations[0].certificate: is required with private_key",
        "[storage]\nkeep_days = inf\n": "storage.keep_days",
        '[[peers]]\nae_title = "CT1"\nhosts = ["h"]\nrequire_tls = true\n': "peers[0].require_tls: needs [tls] port",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_settings(write(tmp_path, text), environ={})
