"""The alert rules the compose monitoring profile loads: valid for Prometheus (promtool), wired into its
configuration, and about series the stack really exports."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.helpers import REPO

RULES = REPO / "deploy" / "alerts.yml"


def test_promtool_accepts_the_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run installs it)")
    done = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout


def test_prometheus_loads_the_rules_file_the_compose_profile_mounts():
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = dict(v.rsplit(":", 1)[0].split(":") for v in compose["services"]["prometheus"]["volumes"])
    assert mounts["./deploy/alerts.yml"] in config["rule_files"]


def test_every_alert_names_series_the_stack_exports():
    exported = set()
    for path in [*(REPO / "services").rglob("metrics.py")]:
        exported |= set(re.findall(r'"(xrayfm_[a-z_]+)"', path.read_text()))
    exported |= {f"{name}_total" for name in exported}  # prometheus_client adds _total to counters
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            named = set(re.findall(r"\b(xrayfm_[a-z_]+)", rule["expr"]))
            assert named and named <= exported, f"{rule['alert']} names {sorted(named - exported)}"
            assert "docs/ops.md" in rule["annotations"]["description"]
