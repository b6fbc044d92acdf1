"""The UI's "Studies" page against a real gateway (API keys on) and a real Redis holding the PACS router's
list of studies (written here as the router writes it): with Streamlit's AppTest, and in headless Chromium
(Selenium + chromium-driver; skipped with a reason without a browser)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import redis
from streamlit.testing.v1 import AppTest

from tests.helpers import starts_processes
from tests.services.svc_helpers import require_redis_server
from tests.services.test_frontend import _browser
from xrayfm_local import launcher as stack_lib
from xrayfm_stack import studies
from xrayfm_stack.protocol import SeriesOutcome, StudyRecord

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parents[2] / "services/frontend/xrayfm_frontend/app.py"
API_KEY = "staff-key-for-the-ui"
VIEWER = "http://pacs.example:8042"
ANSWERED = "0d5b8c44-8cbf9d24-5f2bd8a9-6a0c7e3d-01a2b3c4"
SKIPPED = "77e1f0aa-12345678-9abcdef0-0fedcba9-87654321"


@pytest.fixture(scope="module")
@starts_processes
def studies_stack(tmp_path_factory: pytest.TempPathFactory):
    """Redis + the gateway (API key on) and two studies in the router's list; yields the gateway's URL."""
    require_redis_server()
    home = tmp_path_factory.mktemp("ui-studies")
    redis_port, gateway_port = stack_lib.free_port(), stack_lib.free_port()
    prefix = f"xrayfm-test-{uuid.uuid4().hex[:8]}:router"
    env = {
        "XRAYFM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "XRAYFM_QUEUE": f"xrayfm-test-{uuid.uuid4().hex[:8]}",
        "XRAYFM_TRAINING_QUEUE": f"xrayfm-training-test-{uuid.uuid4().hex[:8]}",
        "XRAYFM_API_KEYS": API_KEY,
        "XRAYFM_ROUTER_PREFIX": prefix,
        "XRAYFM_MODEL_STORE": str(home / "store"),
    }
    launcher = stack_lib.Stack(home, env=env)
    try:
        launcher.start_redis(redis_port)
        db = redis.Redis.from_url(env["XRAYFM_REDIS_URL"])
        tibia = SeriesOutcome(series="ab" * 8, instances=1, answered=False, reason="out_of_domain",
                              gate=["body_part", "features"])  # fmt: skip
        chest = SeriesOutcome(series="cd" * 8, instances=3, answered=True)
        studies.push(
            db, prefix, StudyRecord(time=1_800_000_000.0, study=SKIPPED, outcome="skipped", series=[tibia])
        )
        studies.push(db, prefix, StudyRecord(
            time=1_800_000_060.0, study=ANSWERED, outcome="answered", job_id=str(uuid.uuid4()),
            prediction="Abnormal", probability=0.8772, model="pneumonia/2", series=[chest, tibia],
            sr_written=True, captures=3,
        ))  # fmt: skip
        launcher.start_gateway(gateway_port)
        yield launcher, f"http://127.0.0.1:{gateway_port}"
    finally:
        launcher.stop_all()


def studies_page(monkeypatch, url: str, key: str | None = API_KEY, viewer: str | None = VIEWER) -> AppTest:
    monkeypatch.setenv("XRAYFM_GATEWAY_URL", url)
    for name, value in (("XRAYFM_FRONTEND_API_KEY", key), ("XRAYFM_PACS_VIEWER_URL", viewer)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])  # see test_frontend.py
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    at.sidebar.radio[0].set_value("Studies").run()
    return at


def _table(at: AppTest) -> list[list[str]]:
    """The rows of the page's Markdown table, as cells."""
    [table] = [m.value for m in at.markdown if m.value.startswith("| time")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines()[2:]]


def test_rows_show_answer_gate_and_sr_with_viewer_links(monkeypatch, studies_stack):
    at = studies_page(monkeypatch, studies_stack[1])
    assert not at.error, [e.value for e in at.error]
    assert any("Research use only" in w.value for w in at.warning)
    newest, oldest = _table(at)
    link = f"[{ANSWERED[:17]}]({VIEWER}/app/explorer.html#study?uuid={ANSWERED})"
    assert newest == ["2027-01-15 08:01:00", link, "answered", "Abnormal (0.877)",
                      "answered 1 series (3 images); skipped 1 image(s): out_of_domain (body_part, features)",
                      "yes, 3 heatmap(s)", "pneumonia/2"]  # fmt: skip
    assert oldest[2:6] == ["skipped", "none", "skipped 1 image(s): out_of_domain (body_part, features)", "no"]  # fmt: skip
    assert f"uuid={SKIPPED})" in oldest[1]


def test_refresh_shows_a_new_study(monkeypatch, studies_stack):
    at = studies_page(monkeypatch, studies_stack[1])
    env = studies_stack[0].env
    db = redis.Redis.from_url(env["XRAYFM_REDIS_URL"])
    failed = StudyRecord(time=1_800_000_120.0, study=SKIPPED, outcome="failed", error="HTTP 400 bad_dicom")
    studies.push(db, env["XRAYFM_ROUTER_PREFIX"], failed)
    try:
        assert len(_table(at)) == 2
        [b for b in at.button if b.label == "Refresh"][0].click().run()
        rows = _table(at)
        assert len(rows) == 3 and rows[0][2:6] == ["failed: HTTP 400 bad_dicom", "none", "none", "no"]
    finally:
        db.lpop(studies.studies_key(env["XRAYFM_ROUTER_PREFIX"]))


def test_no_link_without_a_viewer(monkeypatch, studies_stack):
    at = studies_page(monkeypatch, studies_stack[1], viewer=None)
    rows = _table(at)
    assert [r[1] for r in rows] == [ANSWERED[:17], SKIPPED[:17]]
    assert "XRAYFM_PACS_VIEWER_URL" in " ".join(c.value for c in at.caption)


def test_without_the_api_key_the_refusal_is_shown(monkeypatch, studies_stack):
    at = studies_page(monkeypatch, studies_stack[1], key=None)
    assert any("Cannot list the studies" in e.value and "HTTP 401" in e.value for e in at.error)


def test_browser_shows_the_studies_and_the_viewer_link(studies_stack, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    launcher, url = studies_stack
    port = stack_lib.free_port()
    saved = dict(launcher.env)
    launcher.env |= {"XRAYFM_FRONTEND_API_KEY": API_KEY, "XRAYFM_PACS_VIEWER_URL": VIEWER}
    try:
        frontend = launcher.start_frontend(port, url)
    finally:
        launcher.env = saved
    browser = _browser()
    try:
        browser.get(f"http://127.0.0.1:{port}")
        wait = WebDriverWait(browser, 90)
        label = "//label[.//p[normalize-space()='Studies']]"
        wait.until(ec.element_to_be_clickable((By.XPATH, label))).click()
        link = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table a[href*='explorer.html']")))
        assert link.get_attribute("href") == f"{VIEWER}/app/explorer.html#study?uuid={ANSWERED}"
        rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "table tbody tr")]
        assert len(rows) == 2 and "Abnormal (0.877)" in rows[0] and "yes, 3 heatmap(s)" in rows[0]
        assert "out_of_domain (body_part, features)" in rows[1] and "skipped" in rows[1]
        browser.save_screenshot(str(tmp_path / "studies.png"))
        print(f"screenshot: {tmp_path / 'studies.png'}")
    finally:
        browser.quit()
        launcher.stop(frontend)
