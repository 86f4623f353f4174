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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, CSP refusals among them
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


def open_docs(browser, server_url: str) -> None:
    """/docs loaded and drawn: its operation blocks, or Swagger UI's error (a bad schema, or "Unable to render
    this definition" for a schema version it cannot read, as Swagger UI 4 did with FastAPI's OpenAPI 3.1)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get_log("browser")  # drop what earlier pages logged
    browser.get(server_url + "/docs")
    failed = ".errors-wrapper, .version-pragma"
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, f".opblock, {failed}"))
    assert not browser.find_elements(By.CSS_SELECTOR, failed), browser.find_element(By.TAG_NAME, "body").text[:300]


def browser_problems(browser, server_url: str) -> list[str]:
    """Console errors (CSP refusals among them) and anything fetched from another origin than the server."""
    origins = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    logged = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE" or "Policy" in e["message"]]
    return logged + [f"fetched {url}" for url in origins if not url.startswith(server_url + "/")]


def test_docs_renders_every_operation_offline(browser, server_url):
    """/docs is Swagger UI from local files under the page's strict CSP: every operation of the OpenAPI 3.1 schema
    is drawn, the upload's form opens, nothing comes from another origin and nothing is refused."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_docs(browser, server_url)
    drawn = {
        (block.get_attribute("class").split("opblock-")[1].split()[0],
         block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"))
        for block in browser.find_elements(By.CSS_SELECTOR, ".opblock")
    }  # fmt: skip
    assert drawn == {("post", "/api/predict"), ("get", "/api/health"), ("get", "/api/model"),
                     ("get", "/api/model-card")}  # fmt: skip
    assert browser.find_element(By.CSS_SELECTOR, ".info .title").text.startswith("skinlesion")

    browser.find_element(By.CSS_SELECTOR, ".opblock-post .opblock-summary").click()
    body = WebDriverWait(browser, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, ".opblock-post .opblock-body"))
    WebDriverWait(browser, 30).until(lambda d: "multipart/form-data" in body.text)
    for text in ("cam", "file", "a JPEG or PNG image", "Responses", "413", "415"):
        assert text in body.text, text
    assert not browser_problems(browser, server_url)


def test_docs_try_it_out_uploads_an_image(browser, server_url, synth_dir):
    """Swagger UI's "Try it out" sends a real upload under the CSP (connect-src 'self') and shows the answer."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    open_docs(browser, server_url)
    browser.find_element(By.CSS_SELECTOR, ".opblock-post .opblock-summary").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-post .try-out__btn"))
    browser.find_element(By.CSS_SELECTOR, ".opblock-post .try-out__btn").click()
    upload = WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, ".opblock-post input[type=file]")
    )
    upload.send_keys(str(sorted((synth_dir / "images").glob("*.jpg"))[0]))
    # Swagger UI fills optional form fields with placeholders ("string", 0); this model has no metadata prior.
    for field in browser.find_elements(By.CSS_SELECTOR, ".opblock-post .parameters input[type=text]"):
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.BACKSPACE)
    browser.find_element(By.CSS_SELECTOR, ".opblock-post .execute").click()
    live = ".opblock-post .live-responses-table"
    answer = WebDriverWait(browser, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, live))
    WebDriverWait(browser, 60).until(lambda d: '"prediction"' in answer.text)
    assert answer.find_element(By.CSS_SELECTOR, "tbody .response-col_status").text.strip() == "200"
    assert '"model_id": "tiny@' in answer.text
    assert not browser_problems(browser, server_url)
