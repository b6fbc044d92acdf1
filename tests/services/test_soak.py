"""The soak, bounded to a minute (tests/services/soak.py): concurrent clients, real images and junk, a
worker killed and restarted and both Redis servers restarted while it runs; no request and no training job
lost, memory flat."""

from __future__ import annotations

import os

import pytest

from tests.services.soak import run

pytestmark = pytest.mark.slow
SECONDS = float(os.environ.get("XRAYFM_SOAK_SECONDS", "60"))


def test_soak_loses_no_request_and_no_training_job(tmp_path):
    figures = run(SECONDS, clients=4, home=tmp_path, say=lambda *_: None)
    print(figures)
    assert figures["lost"] == 0, figures["lost_examples"]
    assert set(figures["by_code"]) <= {"200", "400", "413", "415", "422", "503", "504"}, figures["by_code"]
    assert figures["by_code"].get("200", 0) > 0, figures["by_code"]
    assert all(seconds <= 30 for seconds in figures["recovered_s"].values()), figures["recovered_s"]
    assert all(state == "done" for state in figures["training_jobs"].values()), figures["training_jobs"]
    assert figures["published_once"]
    warm, end, _ = figures["gateway_rss_mb"]
    assert end < warm + 200, figures  # bounded: the 10-minute soak by hand shows whether it stays flat
