"""The Streamlit UI: with Streamlit's AppTest against the real gateway, and end to end in headless
Chromium (Selenium + chromium-driver) with a real radiograph; skipped with a reason without a browser."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.services.svc_helpers import free_port, phantom, png_bytes

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parents[2] / "services/frontend/xrayfm_frontend/app.py"


def run_app(monkeypatch, gateway_url: str) -> AppTest:
    monkeypatch.setenv("XRAYFM_GATEWAY_URL", gateway_url)
    # AppTest installs the script as sys.modules["__main__"] and never puts the real one back; spawned
    # worker processes (the preprocessing cache's pool) would then re-run the app: restore it after the test.
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    at = AppTest.from_file(str(APP), default_timeout=60)
    return at.run()


def test_not_ready_message_when_no_gateway(monkeypatch):
    at = run_app(monkeypatch, f"http://127.0.0.1:{free_port()}")
    assert any("not ready" in w.value for w in at.sidebar.warning)
    at.file_uploader[0].upload("x.png", png_bytes(phantom()), "image/png")
    at.run()
    assert any("not ready" in e.value for e in at.error)


def test_upload_shows_prediction_heatmap_and_slider(monkeypatch, live_stack):
    at = run_app(monkeypatch, live_stack.gateway_url)
    assert any("ready" in s.value for s in at.sidebar.success)
    at.file_uploader[0].upload("chest.png", png_bytes(phantom(200, 160)), "image/png")
    at.run()
    assert not at.error, [e.value for e in at.error]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Prediction"] in ("Abnormal", "Normal")
    assert 0.0 <= float(metrics["Probability"]) <= 1.0
    captions = [c for img in at.image for c in img.captions]
    assert len(captions) == 2 and captions[0] == "Original"  # the original and the heatmap over it
    assert "opacity 0.45" in captions[1]
    job = at.session_state["answer"].job_id
    at.sidebar.slider[0].set_value(0.9).run()  # moving the opacity does not predict again
    assert at.session_state["answer"].job_id == job
    assert "opacity 0.90" in [c for img in at.image for c in img.captions][1]


def test_an_image_outside_the_models_domain_gets_no_prediction_and_says_why(monkeypatch, live_stack):
    import numpy as np

    at = run_app(monkeypatch, live_stack.gateway_url)
    noise = np.random.default_rng(0).integers(0, 256, (120, 100), dtype=np.uint8)
    at.file_uploader[0].upload("scan.png", png_bytes(noise), "image/png")
    at.run()
    assert [h.value for h in at.header] == ["Outside this model's domain"]
    assert any("noise" in e.value and "No prediction" in e.value for e in at.error)
    assert not at.metric and not at.image  # no prediction, no probability, no heatmap


def test_a_study_of_several_images_shows_the_study_answer_and_each_image(monkeypatch, live_stack):
    at = run_app(monkeypatch, live_stack.gateway_url)
    at.radio(key="upload_mode").set_value("A study (several images)").run()
    for k, size in enumerate(((200, 160), (120, 150), (90, 90))):
        at.file_uploader[0].upload(f"view{k}.png", png_bytes(phantom(*size, seed=k)), "image/png")
    at.run()
    assert not at.error, [e.value for e in at.error]
    answer = at.session_state["answer"]
    assert len(answer.images) == 3
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["Study probability"]) == pytest.approx(answer.probability, abs=1e-3)
    assert [h.value for h in at.subheader][:3] == [
        f"view{k}.png: {a.prediction} ({a.probability:.3f})" for k, a in enumerate(answer.images)
    ]
    captions = [c for img in at.image for c in img.captions]
    assert captions[0::2] == ["view0.png", "view1.png", "view2.png"]  # each original beside its heatmap
    assert any("mean of the image probabilities" in c.value for c in at.caption)


def test_feedback_on_an_answer_is_recorded(monkeypatch, live_stack):
    import json

    at = run_app(monkeypatch, live_stack.gateway_url)
    at.file_uploader[0].upload("chest.png", png_bytes(phantom(120, 100, seed=5)), "image/png")
    at.run()
    answer = at.session_state["answer"]
    at.radio(key="fb_verdict").set_value("disagree").run()
    expected = at.selectbox(key="fb_label").value
    assert expected != answer.prediction
    at.text_input(key="fb_comment").set_value("film rotated").run()
    next(b for b in at.button if b.label == "Send feedback").click().run()
    assert any("recorded (disagree" in s.value for s in at.success), [e.value for e in at.error]
    folder = Path(live_stack.env["XRAYFM_FEEDBACK_DIR"]) / "records"
    records = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    mine = [r for r in records if r["job_id"] == answer.job_id]
    assert len(mine) == 1 and mine[0]["label"] == expected and mine[0]["image"] is None  # not opted in


def test_gateway_errors_are_shown(monkeypatch, live_stack):
    at = run_app(monkeypatch, live_stack.gateway_url)
    data = png_bytes(phantom(200, 160))
    at.file_uploader[0].upload("cut.png", data[: len(data) // 2], "image/png")
    at.run()
    assert any("HTTP 400" in e.value for e in at.error), [e.value for e in at.error]


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no headless browser: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.real_data
def test_browser_end_to_end_with_a_real_xray(live_stack, shared_data, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    xray = sorted(
        shared_data.glob("chexpert-small-valid/CheXpert-v1.0-small/valid/*/study1/view1_frontal.jpg")
    )[0]
    port = free_port()
    frontend = live_stack.stack.start_frontend(port, live_stack.gateway_url)
    browser = _browser()
    try:
        browser.get(f"http://127.0.0.1:{port}")
        wait = WebDriverWait(browser, 90)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
        upload.send_keys(str(xray))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "[data-testid=stMetricValue]")))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "[data-testid=stImage] img")) >= 2)
        time.sleep(1.0)  # let the images paint before the screenshot
        values = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "[data-testid=stMetricValue]")]
        assert values[0] in ("Abnormal", "Normal") and 0.0 <= float(values[1]) <= 1.0
        images = browser.find_elements(By.CSS_SELECTOR, "[data-testid=stImage] img")
        assert all(img.get_attribute("naturalWidth") not in (None, "0") for img in images)
        shot = tmp_path / "frontend.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
    finally:
        browser.quit()
        live_stack.stack.stop(frontend)
