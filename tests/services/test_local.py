"""The local launcher (xrayfm_local, `make up`): what it reads goes through settings objects, and what it
sets for the processes it starts only fills what the environment leaves unset."""

from __future__ import annotations

from pathlib import Path

import pytest

from xrayfm.errors import XrayfmError
from xrayfm_local import launcher
from xrayfm_stack.settings import GatewaySettings


def test_launch_env_fills_only_what_is_unset():
    env = launcher.launch_env({})
    assert env == {
        "XRAYFM_TRAINING_REDIS_URL": "redis://127.0.0.1:6380/0",
        "XRAYFM_MODEL_STORE": str(launcher.REPO / "runs" / "model-store"),
        "XRAYFM_DATA_DIRS": str(launcher.REPO / "data"),
        "XRAYFM_RUNTIME": "onnxruntime",
        "XRAYFM_INSECURE_NO_AUTH": "1",
    }
    given = {"XRAYFM_MODEL_STORE": "/srv/store", "XRAYFM_DATA_DIRS": " ", "XRAYFM_ADMIN_KEYS": "k1"}
    env = launcher.launch_env(given)
    assert "XRAYFM_MODEL_STORE" not in env and env["XRAYFM_DATA_DIRS"] == str(launcher.REPO / "data")
    assert "XRAYFM_INSECURE_NO_AUTH" not in env  # an admin key: the endpoints stay keyed
    settings = GatewaySettings.from_env({**given, **env})  # what the gateway `make up` starts reads
    assert settings.model_store == Path("/srv/store") and settings.training.redis_url.endswith(":6380/0")
    assert settings.data_dirs == (launcher.REPO / "data",) and not settings.insecure_no_auth


def test_launch_settings_read_ports_and_refuse_bad_ones():
    launch = launcher.LaunchSettings.from_env({"XRAYFM_GATEWAY_PORT": " 8100 ", "XRAYFM_FRONTEND_PORT": ""})
    assert (launch.gateway_port, launch.frontend_port, launch.gateway_host) == (8100, 8501, "127.0.0.1")
    assert (launch.orthanc_port, launch.orthanc_dicom_port) == (8042, 4242)
    with pytest.raises(XrayfmError, match="XRAYFM_ORTHANC_PORT must be <= 65535"):
        launcher.LaunchSettings.from_env({"XRAYFM_ORTHANC_PORT": "70000"})


def test_a_model_is_configured_by_the_workers_setting_or_the_store(tmp_path):
    assert not launcher.model_configured(tmp_path, {})
    assert launcher.model_configured(tmp_path, {"XRAYFM_MODEL_PATH": "/models/chest"})
    (tmp_path / "serving.json").write_text("{}")
    assert launcher.model_configured(tmp_path, {})


def test_a_wrong_variable_is_said_not_raised(monkeypatch, capsys):
    monkeypatch.setenv("XRAYFM_GATEWAY_PORT", "eighty")
    assert launcher.main(["status"]) == 2
    assert "XRAYFM_GATEWAY_PORT must be a whole number, got 'eighty'" in capsys.readouterr().out


def test_no_image_installs_the_launcher():
    """The launcher is a development tool: every image installs the contracts, none the launcher."""
    dockerfiles = sorted(launcher.REPO.glob("services/*/Dockerfile*"))
    built = [p for p in dockerfiles if "services/common" in p.read_text()]
    assert len(built) >= 5, dockerfiles  # the services' images (the check looks at real files)
    assert not [
        p.name for p in dockerfiles if "services/local" in p.read_text() or "xrayfm_local" in p.read_text()
    ]
