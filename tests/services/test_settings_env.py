"""The services' settings (xrayfm_stack.settings, pydantic-settings): where each value comes from, how a
variable's text is read, what a bad value says, and that the documented variables and defaults are the
ones the code reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from xrayfm.errors import XrayfmError
from xrayfm_stack.settings import (
    FrontendSettings,
    GatewaySettings,
    InferenceSettings,
    QueueSettings,
    RouterSettings,
    TrainingSettings,
)

REPO = Path(__file__).resolve().parents[2]
ALL = (QueueSettings, InferenceSettings, TrainingSettings, GatewaySettings, RouterSettings, FrontendSettings)


def test_a_mapping_is_read_alone_and_the_environment_through_pydantic_settings(monkeypatch):
    monkeypatch.setenv("XRAYFM_QUEUE", "from-environ")
    monkeypatch.setenv("XRAYFM_MAX_UPLOAD_MB", "3")
    monkeypatch.setenv("XRAYFM_DATA_DIRS", "/a:/b")
    assert GatewaySettings.from_env({}).queue.queue == "xrayfm-inference"  # tests pass a mapping: no leak
    assert GatewaySettings.from_env({}).max_upload_bytes == 64 * 2**20
    read = GatewaySettings.from_env()
    assert (read.queue.queue, read.max_upload_bytes, read.data_dirs) == (
        "from-environ",
        3 * 2**20,
        (Path("/a"), Path("/b")),
    )
    assert GatewaySettings() == read  # a bare BaseSettings reads the environment too
    assert GatewaySettings.from_env({"XRAYFM_QUEUE": "from-environ", "XRAYFM_MAX_UPLOAD_MB": "3",
                                     "XRAYFM_DATA_DIRS": "/a:/b"}) == read  # fmt: skip


def test_each_kind_of_variable_is_read_as_before():
    gateway = GatewaySettings.from_env({
        "XRAYFM_API_KEYS": " a , b,,", "XRAYFM_ADMIN_KEYS": "boss", "XRAYFM_MAX_UPLOAD_MB": "0.5",
        "XRAYFM_MAX_STUDY_MB": "2", "XRAYFM_UPLOAD_BUFFER_MB": "8", "XRAYFM_MAX_JSON_KB": "64",
        "XRAYFM_DATA_DIRS": "/d1, /d2:/d3", "XRAYFM_INSECURE_NO_AUTH": "Yes",
        "XRAYFM_FEEDBACK_KEEP_IMAGES": "no",
        "XRAYFM_DOMAIN_POLICY": " Flag ", "XRAYFM_PREDICT_TIMEOUT": "  ", "XRAYFM_GATEWAY_WORKERS": "3",
    })  # fmt: skip
    assert gateway.api_keys == {"a", "b"} and gateway.admin_keys == {"boss"} and gateway.auth_enabled
    assert (gateway.max_upload_bytes, gateway.max_study_bytes) == (2**19, 2 * 2**20)
    assert (gateway.upload_buffer_bytes, gateway.max_json_bytes, gateway.workers) == (8 * 2**20, 64 * 1024, 3)
    assert gateway.data_dirs == (Path("/d1"), Path("/d2"), Path("/d3"))
    assert gateway.insecure_no_auth and not gateway.feedback_keep_images and gateway.domain_policy == "flag"
    assert gateway.predict_timeout_s == 60.0  # blank is unset
    assert GatewaySettings.from_env({"XRAYFM_DATA_DIRS": " : , "}).data_dirs == (Path("/data"),)
    worker = InferenceSettings.from_env({
        "XRAYFM_BATCH_MAX": "auto", "XRAYFM_RUNTIME": "ONNXRuntime", "XRAYFM_QUANTIZE": "int8",
        "XRAYFM_RUNTIME_CACHE": "/cache",
    })  # fmt: skip
    assert (worker.batch_max, worker.runtime, worker.quantize) == (None, "onnxruntime", "int8")
    assert worker.runtime_cache == Path("/cache") and worker.model_path is None
    router = RouterSettings.from_env(
        {"XRAYFM_ORTHANC_URL": "http://pacs:8042/", "XRAYFM_ROUTER_BACKFILL": "1"}
    )
    assert router.orthanc_url == "http://pacs:8042" and router.backfill and router.orthanc_password is None
    frontend = FrontendSettings.from_env({"XRAYFM_FRONTEND_REFRESH_S": "-1", "XRAYFM_PACS_VIEWER_URL": "/"})
    assert frontend.refresh_s == 0.0 and frontend.pacs_viewer_url is None


def test_redis_urls_fall_back_in_order_and_a_blank_one_is_unset():
    assert TrainingSettings.from_env({"XRAYFM_REDIS_URL": "redis://r/1"}).redis_url == "redis://r/1"
    both = {"XRAYFM_REDIS_URL": "redis://r/1", "XRAYFM_TRAINING_REDIS_URL": "redis://t/2"}
    assert TrainingSettings.from_env(both).redis_url == "redis://t/2"
    blank = {"XRAYFM_REDIS_URL": "redis://r/1", "XRAYFM_TRAINING_REDIS_URL": ""}  # compose's ${X:-}
    assert TrainingSettings.from_env(blank).redis_url == "redis://r/1"
    assert RouterSettings.from_env(both).redis_url == "redis://t/2"
    assert (
        RouterSettings.from_env({**both, "XRAYFM_ROUTER_REDIS_URL": "redis://o/3"}).redis_url == "redis://o/3"
    )
    gateway = GatewaySettings.from_env(both)
    assert (gateway.queue.redis_url, gateway.training.redis_url) == ("redis://r/1", "redis://t/2")


def test_the_environment_falls_back_the_same_way(monkeypatch):
    monkeypatch.setenv("XRAYFM_REDIS_URL", "redis://r/1")
    monkeypatch.setenv("XRAYFM_TRAINING_REDIS_URL", "")
    monkeypatch.delenv("XRAYFM_ROUTER_REDIS_URL", raising=False)
    assert TrainingSettings.from_env().redis_url == "redis://r/1"
    assert RouterSettings.from_env().redis_url == "redis://r/1"


@pytest.mark.parametrize(
    ("cls", "variable", "value", "says"),
    [
        (QueueSettings, "XRAYFM_RESULT_EXPIRES", "0", "XRAYFM_RESULT_EXPIRES must be >= 1, got '0'"),
        (QueueSettings, "XRAYFM_HEARTBEAT_S", "often", "XRAYFM_HEARTBEAT_S must be a float, got 'often'"),
        (QueueSettings, "XRAYFM_TASK_TIME_LIMIT", "nan", "XRAYFM_TASK_TIME_LIMIT must be a finite number"),
        (GatewaySettings, "XRAYFM_MAX_PIXELS", "1e6", "XRAYFM_MAX_PIXELS must be a whole number"),
        (GatewaySettings, "XRAYFM_TRANSPORT_SIDE", "8192", "XRAYFM_TRANSPORT_SIDE must be <= 4096"),
        (GatewaySettings, "XRAYFM_MAX_UPLOAD_MB", "lots", "XRAYFM_MAX_UPLOAD_MB must be a number"),
        (GatewaySettings, "XRAYFM_MAX_UPLOAD_MB", "inf", "XRAYFM_MAX_UPLOAD_MB must be >= 0.001"),
        (GatewaySettings, "XRAYFM_UPLOAD_BUFFER_MB", "0.5", "XRAYFM_UPLOAD_BUFFER_MB must be >= 1"),
        (GatewaySettings, "XRAYFM_MAX_JSON_KB", "1.5", "XRAYFM_MAX_JSON_KB must be a whole number"),
        (GatewaySettings, "XRAYFM_REDIS_URL", "redis://r", None),  # fine: no error
        (GatewaySettings, "XRAYFM_QUEUE", "q", None),
        (GatewaySettings, "XRAYFM_VISIBILITY_TIMEOUT", "5", "must exceed XRAYFM_TASK_TIME_LIMIT"),
        (GatewaySettings, "XRAYFM_EXPLAIN_METHOD", "lime", "'rollout', 'grad_rollout' or 'gradcam'"),
        (
            InferenceSettings,
            "XRAYFM_RUNTIME",
            "tensorrt",
            "XRAYFM_RUNTIME must be one of 'torch' or 'onnxruntime'",
        ),
        (InferenceSettings, "XRAYFM_WORKER_METRICS_PORT", "-1", "XRAYFM_WORKER_METRICS_PORT must be >= 0"),
        (TrainingSettings, "XRAYFM_TRAINING_LOCK_TTL", "0.5", "XRAYFM_TRAINING_LOCK_TTL must be >= 1.0"),
        (TrainingSettings, "XRAYFM_BOOTSTRAP", "train-it", "choose one of"),
        (RouterSettings, "XRAYFM_ROUTER_POLL_S", "0", "XRAYFM_ROUTER_POLL_S must be >= 0.05"),
        (FrontendSettings, "XRAYFM_FRONTEND_TIMEOUT", "soon", "XRAYFM_FRONTEND_TIMEOUT must be a float"),
    ],
)
def test_a_bad_value_names_its_variable_and_what_it_allows(cls, variable, value, says):
    if says is None:
        cls.from_env({variable: value})
        return
    with pytest.raises(XrayfmError, match=re.escape(says)):
        cls.from_env({variable: value})


def test_every_bad_value_is_reported_at_once(monkeypatch):
    monkeypatch.setenv("XRAYFM_MAX_PIXELS", "many")
    monkeypatch.setenv("XRAYFM_DRIFT_WINDOW", "1")
    with pytest.raises(XrayfmError) as caught:
        GatewaySettings.from_env()  # the environment's errors are converted too
    assert "XRAYFM_MAX_PIXELS must be a whole number" in str(caught.value)
    assert "XRAYFM_DRIFT_WINDOW must be >= 10" in str(caught.value)


def test_passwords_come_from_a_file_and_keys_are_never_shown(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("s3cret-from-file\n")
    from_file = RouterSettings.from_env({"XRAYFM_ORTHANC_PASSWORD_FILE": str(secret)})
    assert from_file.orthanc_password == "s3cret-from-file"
    given = {"XRAYFM_ORTHANC_PASSWORD": "given", "XRAYFM_ORTHANC_PASSWORD_FILE": str(secret)}
    assert RouterSettings.from_env(given).orthanc_password == "given"  # the variable wins over the file
    with pytest.raises(XrayfmError, match="XRAYFM_ORTHANC_PASSWORD_FILE=.*cannot be read"):
        RouterSettings.from_env({"XRAYFM_ORTHANC_PASSWORD_FILE": str(tmp_path / "missing")})
    shown = repr(from_file) + repr(
        GatewaySettings.from_env({"XRAYFM_API_KEYS": "k-123", "XRAYFM_ADMIN_KEYS": "a-456"})
    )
    shown += repr(
        FrontendSettings.from_env({"XRAYFM_FRONTEND_API_KEY": "f-789", "XRAYFM_FRONTEND_ADMIN_KEY": "f-000"})
    )
    assert not any(s in shown for s in ("s3cret", "k-123", "a-456", "f-789", "f-000")), shown


def test_keyword_arguments_are_in_the_fields_units_and_the_settings_are_frozen():
    settings = GatewaySettings(max_upload_bytes=1000, api_keys=frozenset({"k"}), data_dirs=(Path("/x"),))
    assert (
        settings.max_upload_bytes == 1000
        and settings.api_keys == {"k"}
        and settings.data_dirs == (Path("/x"),)
    )
    with pytest.raises(ValidationError):
        settings.max_upload_bytes = 5
    assert hash(settings) == hash(GatewaySettings(max_upload_bytes=1000, api_keys=frozenset({"k"}),
                                                  data_dirs=(Path("/x"),)))  # fmt: skip


def _documented_defaults() -> list[tuple[str, str]]:
    """(variable, default) of each row of the docs' variable tables: ``| `A` / `B` | 1 / 2 | ... |``."""
    pairs = []
    for doc in [REPO / "README.md", REPO / "services/README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            cells = [c.strip() for c in line.split("|")[1:-1]]
            if len(cells) < 3 or not cells[0].startswith("`XRAYFM_"):
                continue
            names = re.findall(r"`(XRAYFM_[A-Z0-9_]+)`", cells[0])
            defaults = [re.sub(r"\(.*?\)", "", d).strip().strip("`") for d in cells[1].split(" / ")]
            if len(names) == len(defaults):
                pairs += zip(names, defaults, strict=True)
    return pairs


def test_the_documented_variables_and_defaults_are_the_ones_read():
    read = {name: cls for cls in ALL for name in cls.variables()}
    docs = "\n".join(p.read_text() for p in [REPO / "README.md", REPO / "services/README.md",
                                             *(REPO / "docs").glob("*.md")])  # fmt: skip
    # a variable is documented by its full name, or as `XRAYFM_X_PORT` / `_ADDR`, `XRAYFM_X` (or `_FILE`)
    lines = docs.splitlines()
    undocumented = [
        name for name in read
        if name not in docs
        and not any(f"`_{name.rsplit('_', 1)[1]}`" in ln and name.rsplit("_", 1)[0] in ln for ln in lines)
    ]  # fmt: skip
    assert not undocumented, f"variables read but not documented: {undocumented}"
    checked = 0
    for name, default in _documented_defaults():
        if name not in read or not default or default in ("unset", "empty") or "XRAYFM_" in default:
            continue  # set elsewhere (make up, compose), or documented as "no value"
        if default.startswith("~"):
            continue  # a home folder the code leaves to its runtime
        for cls in (c for c in ALL if name in c.variables()):
            assert cls.from_env({name: default}) == cls.from_env({}), (
                f"docs say {name}={default}, the code differs"
            )
            checked += 1
    assert checked >= 30, checked  # the tables were found and read
