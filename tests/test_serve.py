"""The web app through FastAPI's TestClient: every endpoint, every refusal, awkward image modes."""

from __future__ import annotations

import base64
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from skinlesion import fileio
from skinlesion.classes import CLASSES, FULL_NAMES
from skinlesion.cli import build_parser
from skinlesion.commands import serve as serve_command
from skinlesion.data.images import open_rgb
from skinlesion.inference.classifier import Classifier
from skinlesion.model import checkpoint
from skinlesion.serve import app as serve_app


@pytest.fixture(scope="module")
def run(onnx_run, tmp_path_factory) -> Path:
    """onnx_run plus a metrics.json as evaluation writes it."""
    out = tmp_path_factory.mktemp("serve") / "tiny"
    shutil.copytree(onnx_run, out)
    metrics = {
        "n_images": 42,
        "accuracy": {"value": 0.8, "ci95": [0.7, 0.9]},
        "balanced_accuracy": {"value": 0.75, "ci95": [0.6, 0.85]},
        "macro_f1": {"value": 0.7, "ci95": [0, 1]},
    }
    fileio.write_json(out / "metrics.json", metrics)
    return out


@pytest.fixture(scope="module")
def client(run) -> TestClient:
    return TestClient(serve_app.create_app(run))


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def lesion(size=(96, 72)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def post(client: TestClient, data: bytes, name: str = "x.png", query: str = "", mime: str = "image/png"):
    return client.post(f"/api/predict{query}", files={"file": (name, data, mime)})


def test_health_and_model_info(client, run):
    health = client.get("/api/health").json()
    assert health["status"] == "ok"
    assert health["model_id"] == f"tiny@{fileio.sha256_file(run / 'best.pt')[:12]}"
    info = client.get("/api/model").json()
    assert info["classes"] == list(CLASSES)
    assert info["full_names"]["mel"] == FULL_NAMES["mel"]
    assert info["img_size"] == 64 and info["backbone"] == "efficientnet_b0"
    assert info["backend"] == "onnx"  # auto: model.onnx is current
    assert info["temperature"] == pytest.approx(1.5)
    assert info["metrics"]["balanced_accuracy"] == pytest.approx(0.75) and info["metrics"]["n_images"] == 42


def test_predict_matches_the_predictor(client, run):
    data = encode(lesion(), "JPEG")
    body = post(client, data, "a.jpg", mime="image/jpeg").json()
    probs = body["probabilities"]
    assert list(probs) == list(CLASSES)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert body["prediction"] == max(probs, key=probs.get)
    assert body["prediction_name"] == FULL_NAMES[body["prediction"]]
    assert body["temperature"] == pytest.approx(1.5)
    assert "overlay" not in body
    expected = Classifier.load(run, "onnx").predict([open_rgb(data)]).probabilities[0]
    assert np.allclose([probs[c] for c in CLASSES], expected, atol=1e-6)


def test_overlay_is_a_png_data_url(client):
    body = post(client, encode(lesion()), query="?cam=true").json()
    prefix = "data:image/png;base64,"
    assert body["overlay"].startswith(prefix)
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay"][len(prefix) :])))
    assert overlay.format == "PNG" and overlay.size == (64, 64)
    assert np.asarray(overlay).std() > 0  # a real heat map, not a blank image
    # The model's view, the same field of view as the overlay (the upload is 96x72: resized, centre-cropped).
    view = Image.open(io.BytesIO(base64.b64decode(body["model_view"][len(prefix) :])))
    assert view.size == overlay.size == (64, 64)
    assert body["overlay_resolution"]["grid"][0] >= 1 and "feature grid" in body["overlay_resolution"]["text"]


def test_the_answer_carries_the_safeguards_even_without_any(client):
    body = post(client, encode(lesion())).json()
    assert body["refer"] is False and body["refer_reason"] is None and body["out_of_distribution"] is False
    assert body["prediction_set"] is None and body["prediction"] in body["probabilities"]


def test_not_an_image_is_415(client):
    for data, name in (
        (b"hello, not an image", "notes.txt"),
        (b"", "empty.png"),
        (b"\x89PNG\r\n\x1a\nbroken", "t.png"),
    ):
        r = post(client, data, name)
        assert r.status_code == 415, name
        assert "JPEG or PNG" in r.json()["detail"]


def test_oversized_upload_is_413_before_reading(client):
    r = post(client, b"\0" * (21 * 1024 * 1024))  # Content-Length says too much: refused up front
    assert r.status_code == 413
    assert "Too Large" in r.text


def test_oversized_streamed_body_is_413_while_reading(run):
    small = TestClient(serve_app.create_app(run, max_upload_mb=1))

    def chunks():  # no Content-Length: the limit has to be enforced while the body streams in
        for _ in range(4):
            yield b"\0" * (512 * 1024)

    r = small.post("/api/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413
    assert "1 MB" in r.json()["detail"]
    assert post(small, encode(lesion())).status_code == 200


def test_decompression_bomb_is_refused(client):
    bomb = encode(Image.new("1", (8000, 7000)))  # 56 MP of zeros: a few kB on the wire
    assert len(bomb) < 100_000
    r = post(client, bomb, "bomb.png")
    assert r.status_code == 413
    assert "8000x7000" in r.json()["detail"]


def test_a_thin_strip_is_refused_from_its_header_before_any_resize(client, monkeypatch):
    """1x100000 px is 375 bytes of PNG, but resizing its short side to the model's would make it 14.7 G pixels: 413
    from the header alone, and nothing is decoded."""
    strip = encode(Image.new("L", (100_000, 1)))
    assert len(strip) < 2_000
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size))
    r = post(client, strip, "strip.png")
    assert r.status_code == 413 and "100000x1" in r.json()["detail"] and "crop" in r.json()["detail"]
    assert decoded == []


def test_decoding_happens_inside_the_one_request_at_a_time_lock(client, monkeypatch):
    from skinlesion.data import preprocessing as module  # uploads are decoded by the run's Preprocessing

    service = client.app.state.service
    held = []
    real = module.open_rgb

    def watched(*args, **kwargs):
        held.append(service.lock.locked())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "open_rgb", watched)
    assert post(client, encode(lesion())).status_code == 200
    assert held == [True]


@pytest.mark.parametrize(
    "mode_image",
    [
        pytest.param(lambda: lesion().convert("L"), id="grayscale"),
        pytest.param(lambda: lesion().convert("RGBA"), id="rgba"),
        pytest.param(lambda: lesion().convert("P"), id="palette"),
        pytest.param(lambda: Image.fromarray((np.arange(72 * 96).reshape(72, 96) * 9).astype(np.uint16)), id="png16"),
    ],
)
def test_awkward_png_modes_are_handled(client, mode_image):
    r = post(client, encode(mode_image()))
    assert r.status_code == 200, r.text
    assert r.json()["image"] == {"width": 96, "height": 72}


def test_cmyk_jpeg_is_handled(client):
    r = post(client, encode(lesion().convert("CMYK"), "JPEG"), "cmyk.jpg", mime="image/jpeg")
    assert r.status_code == 200, r.text


def test_sixteen_bit_png_keeps_its_contrast():
    ramp = (np.linspace(0, 65535, 256).reshape(1, 256).repeat(32, 0)).astype(np.uint16)  # within the 10:1 aspect rule
    rgb = np.asarray(open_rgb(encode(Image.fromarray(ramp))))
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and 100 < rgb[0, 128, 0] < 156  # not clipped to white


def test_exif_rotation_is_applied(client):
    # Left half red, right half blue, tagged "rotate 90 degrees clockwise" (orientation 6).
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20, 0] = 255
    arr[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)
    decoded = np.asarray(open_rgb(data)).astype(int)
    assert decoded.shape == (40, 20, 3)  # portrait now
    assert decoded[5, 10, 0] > 200 and decoded[5, 10, 2] < 60  # what was the left side is on top
    assert decoded[35, 10, 2] > 200 and decoded[35, 10, 0] < 60
    r = post(client, data, "rotated.jpg", mime="image/jpeg")
    assert r.status_code == 200
    assert r.json()["image"] == {"width": 20, "height": 40}


def test_model_loads_once(run, monkeypatch):
    calls = []
    real_load = checkpoint.load

    def counting_load(*args, **kwargs):
        calls.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "load", counting_load)
    client = TestClient(serve_app.create_app(run, backend="torch"))
    assert len(calls) == 1
    for query in ("", "?cam=true", ""):
        assert post(client, encode(lesion()), query=query).status_code == 200
    assert len(calls) == 1
    assert client.get("/api/model").json()["backend"] == "torch"


def test_page_docs_and_headers(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "not a diagnosis" in page.text and 'type="file"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.split("<body>")[0]  # no external (CDN) assets
    assert "/api/predict?cam=true" in client.get("/static/app.js").text
    # /docs: Swagger UI from local files (works offline), started by a file, so the strict CSP holds there too.
    # That it draws the schema is checked in a real browser (test_browser.py).
    docs = client.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-security-policy"] == serve_app.PAGE_CSP
    assert "http" not in docs.text and not re.search(r"<script(?![^>]*\bsrc=)", docs.text)  # no CDN, no inline code
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert {"/swagger/swagger-ui-bundle.js", "/swagger/swagger-ui.css", "/static/docs.js"} <= set(assets)
    for asset in assets:
        served = client.get(asset)
        assert served.status_code == 200 and served.headers["content-security-policy"] == serve_app.PAGE_CSP
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.1.") and "/api/predict" in schema["paths"]
    assert client.get("/redoc").status_code == 404  # FastAPI's ReDoc page would load its script from a CDN


def test_serve_binds_loopback_by_default(run, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    args = build_parser().parse_args(["serve", "--run-dir", str(run)])
    serve_command.main(args)
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000
    assert seen["app"].state.service.model_id.startswith("tiny@")
