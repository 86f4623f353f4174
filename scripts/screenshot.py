"""docs/screenshot_serve.png from the current page: start `skinlesion serve` on a run folder (127.0.0.1, a free
port), upload a real image in headless Chromium (Selenium), wait for the prediction and the Grad-CAM overlay,
and save the whole page.

    .venv/bin/python scripts/screenshot.py --run-dir outputs/demo
    .venv/bin/python scripts/screenshot.py --run-dir outputs/demo --images ../shared/data/ham10000_originals/images

The image is a melanoma the run never trained on, from --images (default: the bundled sample): the first of the
run's val split there, else one that the HAM10000_metadata.csv beside --images lists and the run's split does not;
--image FILE picks another. Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian chromium,
chromium-driver), as tests/test_browser.py does.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = REPO / "src" / "skinlesion" / "data" / "sample" / "images"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(run_dir: Path, timeout: float = 120) -> Iterator[str]:
    """`skinlesion serve` in a child process until the block ends."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "skinlesion",
        "serve",
        "--run-dir",
        str(run_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url + "/api/model", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"error: skinlesion serve did not start on {url}") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def unseen_melanoma(run_dir: Path, images: Path) -> Path:
    """A melanoma image in ``images`` that the run never trained on: its val melanomas first, then (from the
    HAM10000_metadata.csv beside ``images``) melanomas outside its split altogether."""
    splits = pd.read_csv(run_dir / "splits.csv")
    candidates = list(splits.loc[(splits["split"] == "val") & (splits["dx"] == "mel"), "image_id"])
    metadata = images.parent / "HAM10000_metadata.csv"
    if metadata.is_file():
        table = pd.read_csv(metadata)
        candidates += sorted(set(table.loc[table["dx"] == "mel", "image_id"]) - set(splits["image_id"]))
    for image_id in candidates:
        for ext in (".jpg", ".jpeg", ".png"):
            if (images / f"{image_id}{ext}").is_file():
                return images / f"{image_id}{ext}"
    raise SystemExit(f"error: no melanoma that {run_dir} never trained on in {images}; pass --image FILE")


def shoot(url: str, image: Path, out: Path, width: int) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},1200")
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        try:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: d.find_element(By.ID, "model-info").text.strip())
            driver.find_element(By.ID, "file").send_keys(str(image.resolve()))
            wait.until(ec.visibility_of_element_located((By.ID, "prediction-name")))
            overlay = wait.until(ec.visibility_of_element_located((By.ID, "overlay")))
            wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay))
            # The whole page in one picture: the window is the page's height plus the browser's own frame.
            height, frame = driver.execute_script(
                "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]"
            )
            driver.set_window_size(width, height + frame + 16)
            time.sleep(0.5)
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.get_screenshot_as_file(str(out))
            print(f"wrote {out}: {driver.find_element(By.ID, 'prediction-name').text} for {image.name}")
        finally:
            driver.quit()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--image", type=Path, help="the image to upload (default: a melanoma the run never trained on)")
    p.add_argument("--images", type=Path, default=SAMPLE_IMAGES, help="folder to find that melanoma in")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot_serve.png")
    p.add_argument("--width", type=int, default=1000, help="browser window width in CSS pixels")
    args = p.parse_args(argv)
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        raise SystemExit(f"error: needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium, chromium-driver)")
    image = args.image or unseen_melanoma(args.run_dir, args.images)
    with serving(args.run_dir) as url:
        shoot(url, image, args.out, args.width)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
