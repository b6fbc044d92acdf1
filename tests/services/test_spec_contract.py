"""The job spec's contract: every kind has its config class, by name, and every setting with choices takes
only those, in a job spec as in the library and the CLI."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import Field

from xrayfm.errors import XrayfmError
from xrayfm.train.config import JsonConfig, choices_text, config_class, field_type, settings_of
from xrayfm_stack.protocol import JOB_KINDS
from xrayfm_stack.spec import CONFIGS, KINDS, job_kind, register_job_kind, validate_spec

# Each kind's config with the fewest settings that make it valid.
MINIMAL: dict[str, dict[str, Any]] = {
    "pretrain": {"cache": "/c", "root": "/r"},
    "adapt": {"cache": "/c", "root": "/r", "foundation": "/f"},
    "tune": {"cache": "/c", "root": "/r", "foundation": "/f"},
    "evaluate": {"model": "/m", "cache": "/c", "root": "/r"},
    "calibrate": {"model": "/m", "data": ["folder:/x"]},
}
# Every (kind, setting) whose field has choices, found from the config classes.
CHOICE_FIELDS = [
    (kind, f.name)
    for kind, cls in CONFIGS.items()
    for f in settings_of(cls).values()
    if f.choices is not None
]


def test_every_job_kind_has_its_own_config_and_nothing_else() -> None:
    assert set(CONFIGS) == set(JOB_KINDS)
    for kind, cls in CONFIGS.items():  # by name: pretrain -> PretrainConfig, ...
        assert issubclass(cls, JsonConfig) and cls.__name__ == f"{kind.capitalize()}Config", (kind, cls)


def test_the_choice_fields_are_found() -> None:
    """The introspection below sees the settings the issue names (a guard against an empty parametrize)."""
    assert {("pretrain", "resize_mode"), ("pretrain", "verify"), ("pretrain", "kind")} <= set(CHOICE_FIELDS)
    assert {("evaluate", "kind"), ("calibrate", "method"), ("adapt", "method")} <= set(CHOICE_FIELDS)


@pytest.mark.parametrize("kind, name", CHOICE_FIELDS, ids=[f"{k}.{n}" for k, n in CHOICE_FIELDS])
def test_a_setting_with_choices_refuses_any_other_value(kind: str, name: str) -> None:
    cls = CONFIGS[kind]
    f = settings_of(cls)[name]
    is_list = typing.get_origin(field_type(cls, name)) is list
    for choice in f.choices:  # every allowed value passes
        value = [choice] if is_list else choice
        checked = validate_spec({"kind": kind, "config": {**MINIMAL[kind], name: value}})
        assert checked["config"][name] == value
    bad = [f.choices[0], "zigzag"] if is_list else "zigzag"
    with pytest.raises(XrayfmError) as info:
        validate_spec({"kind": kind, "config": {**MINIMAL[kind], name: bad}})
    message = str(info.value)
    assert f"{name} 'zigzag' (choose one of {choices_text(f)})" in message, message


@pytest.mark.parametrize(
    "config",
    [{"resize_mode": "zigzag"}, {"verify": "nope"}, {"kind": "bogus"}],
    ids=["resize_mode", "verify", "kind"],
)
def test_the_reported_specs_are_refused(config: dict[str, Any]) -> None:
    ((name, value),) = config.items()
    with pytest.raises(XrayfmError, match=f"{name} '{value}' \\(choose one of "):
        validate_spec({"kind": "pretrain", "config": {"root": "/r", "cache": "/c", **config}})


def test_a_search_space_offers_only_a_settings_choices() -> None:
    base = {**MINIMAL["tune"], "space": {"loss": ["bce", "focal"]}}
    validate_spec({"kind": "tune", "config": base})
    with pytest.raises(XrayfmError, match="space: loss choices must be among bce, focal"):
        validate_spec({"kind": "tune", "config": {**base, "space": {"loss": ["bce", "hinge"]}}})


def test_a_list_setting_with_choices_checks_each_item() -> None:
    """No list setting has choices today; the rule is the config's, so a list-valued one is covered."""

    @config_class
    class Listed(JsonConfig):
        parts: list[Literal["HAND", "WRIST"]] | None = Field(None, description="parts")

    Listed.from_dict({"parts": ["HAND", "WRIST"]})
    Listed.from_dict({})
    with pytest.raises(XrayfmError, match=r"parts 'ELBOW' \(choose one of HAND, WRIST\)"):
        Listed.from_dict({"parts": ["HAND", "ELBOW"]})


def test_the_cli_refuses_the_same_values(capsys: pytest.CaptureFixture[str]) -> None:
    from xrayfm.cli import main

    for argv in (
        ["pretrain", "--cache", "c", "--resize-mode", "zigzag"],
        ["evaluate", "m", "--kind", "bogus"],
    ):
        with pytest.raises(SystemExit):
            main([*argv, "--print-config"] if argv[0] == "pretrain" else argv)
        assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config",
    [{"resize_mode": "zigzag"}, {"verify": "nope"}, {"kind": "bogus", "root": "/x"}],
    ids=["resize_mode", "verify", "kind"],
)
def test_the_gateway_answers_422_naming_the_setting(config: dict[str, Any], tmp_path: Path) -> None:
    from tests.services.gateway_fakes import FakeQueue, FakeTraining, gateway_client

    training = FakeTraining()
    settings = {"insecure_no_auth": True, "data_dirs": (Path("/x"),), "model_store": tmp_path / "store"}
    spec = {"kind": "pretrain", "config": {"kind": "chexpert", "root": "/x", **config}}
    with gateway_client(FakeQueue(), training, **settings) as http:
        resp = http.post("/training/jobs", json=spec)
    assert resp.status_code == 422, resp.text
    body = resp.json()
    name = next(iter(config))
    assert body["error"] == "invalid_spec" and f"{name} '{config[name]}' (choose one of" in body["detail"]
    assert not training.jobs


def test_the_openapi_document_shows_each_kinds_config(tmp_path: Path) -> None:
    """POST /training/jobs documents one object per kind, with its config's choices, ranges and help."""
    from tests.services.gateway_fakes import FakeQueue, FakeTraining, gateway_client

    with gateway_client(FakeQueue(), FakeTraining(), insecure_no_auth=True, model_store=tmp_path) as http:
        schema = http.get("/openapi.json").json()
    body = schema["paths"]["/training/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["discriminator"]["propertyName"] == "kind"
    by_kind = {member["properties"]["kind"]["const"]: member for member in body["oneOf"]}
    assert set(by_kind) == set(CONFIGS)
    adapt = by_kind["adapt"]["properties"]["config"]["properties"]
    assert adapt["method"]["enum"] == ["lora", "full", "linear", "scratch", "auto"]
    assert adapt["lora_rank"]["minimum"] == 1 and adapt["lora_rank"]["maximum"] == 1024
    lr = next(s for s in adapt["lr"].get("anyOf", [adapt["lr"]]) if s.get("type") == "number")  # or null
    assert lr["exclusiveMinimum"] == 0 and "peak learning rate" in adapt["lr"]["description"]
    assert by_kind["calibrate"]["properties"]["config"]["additionalProperties"] is False
    assert "$ref" not in json.dumps(body)  # the body's schema stands alone in the document


def test_every_kind_is_registered_with_fields_of_its_config() -> None:
    """The registry names, per kind, fields its config has; evaluate alone publishes no version."""
    for kind, spec in KINDS.items():
        names = set(settings_of(spec.config))
        assert {*spec.path_fields, *spec.store_fields, *spec.source_fields} <= names, kind
    assert [k for k, spec in KINDS.items() if not spec.publishes] == ["evaluate"]
    with pytest.raises(ValueError, match="already registered"):
        register_job_kind("adapt", KINDS["adapt"].config, path_fields=(), publishes=True)
    with pytest.raises(XrayfmError, match="choose one of"):
        job_kind("bogus")
