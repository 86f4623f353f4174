"""One real browser round trip: headless Chromium uploads an image and sees the prediction and the overlay."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from skinlesion.classes import FULL_NAMES

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(run: Path) -> Iterator[str]:
    """uvicorn on a free loopback port, in a background thread of this process."""
    import uvicorn

    from skinlesion.serve.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(run), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server_url(onnx_run) -> Iterator[str]:
    with serving(onnx_run) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium, chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1000,1250",
    ):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def test_upload_shows_prediction_bars_and_overlay(browser, server_url, synth_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "lesion.jpg"
    shutil.copy(sorted((synth_dir / "images").glob("*.jpg"))[0], image)
    browser.get(server_url + "/")
    wait = WebDriverWait(browser, 60)
    assert "not a diagnosis" in browser.find_element(By.ID, "disclaimer").text
    wait.until(lambda d: "model tiny@" in d.find_element(By.ID, "model-info").text)
    assert not browser.find_element(By.ID, "clinical").is_displayed()  # no metadata prior in this run: no fields

    browser.find_element(By.ID, "file").send_keys(str(image))
    wait.until(ec.visibility_of_element_located((By.ID, "prediction-name")))
    name = browser.find_element(By.ID, "prediction-name").text
    code = browser.find_element(By.ID, "prediction").text
    assert code in FULL_NAMES and name == FULL_NAMES[code]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar-fill")) == 7
    overlay = wait.until(ec.visibility_of_element_located((By.ID, "overlay")))
    assert overlay.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) == 64
    # The image beside the overlay is the model's view of the upload: the same 64x64 field of view.
    preview = browser.find_element(By.ID, "preview")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", preview) == 64
    assert "What the model sees" in browser.find_element(By.ID, "preview-caption").text
    assert "feature grid" in browser.find_element(By.ID, "overlay-caption").text
    if shot := os.environ.get("SKINLESION_SCREENSHOT"):  # how docs/screenshot_serve.png is made
        browser.get_screenshot_as_file(shot)


def test_page_says_when_the_operating_point_overrules_the_most_probable_class(browser, onnx_run, synth_dir, tmp_path):
    """A run whose operating point pushes one class hard: the page names it and explains the decision."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from skinlesion.classes import CLASSES
    from skinlesion.data.images import open_rgb
    from skinlesion.inference.classifier import Classifier
    from skinlesion.model import checkpoint

    run = tmp_path / "tiny"
    shutil.copytree(onnx_run, run)
    (run / "model.onnx").unlink()  # the torch backend reads the operating point straight from best.pt
    image = tmp_path / "lesion.jpg"
    shutil.copy(sorted((synth_dir / "images").glob("*.jpg"))[0], image)
    top = CLASSES[int(Classifier.load(run).predict([open_rgb(image)]).probabilities[0].argmax())]
    pushed = next(c for c in CLASSES if c != top)
    bias = [30.0 if c == pushed else 0.0 for c in CLASSES]
    point = {"classes": list(CLASSES), "min_sensitivity": {pushed: 0.9}, "bias": bias, "fitted_on": "val",
             "bias_tta": None, "temperature": 1.5}  # fmt: skip
    checkpoint.set_entry(run, "operating_point", point)
    with serving(run) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: f"operating point {pushed} >= 0.9" in d.find_element(By.ID, "model-info").text)
        browser.find_element(By.ID, "file").send_keys(str(image))
        wait.until(ec.visibility_of_element_located((By.ID, "prediction-name")))
        assert browser.find_element(By.ID, "prediction").text == pushed
        note = browser.find_element(By.ID, "meta").text
    assert f"called {pushed} by the operating point" in note and f"although {top} is more probable" in note
