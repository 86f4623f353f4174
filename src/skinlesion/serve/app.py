"""The web app: ``GET /`` page, ``POST /api/predict``, ``GET /api/health``, ``GET /api/model``, ``/docs``.

Hardening: the Host header must be one the server answers to (``allowed_hosts``); request bodies are capped
(Content-Length checked up front, and counted while streaming: FastAPI's ``max_body_size``); images are
decoded by content, not by the declared type (415 otherwise); pixel counts and aspect ratio are checked from
the header before decoding (413), as is the minimum size (422): data/images.py's rules, the same as every
command's; the model is loaded once when the app is created. Inference runs in FastAPI's threadpool (sync
endpoints) behind a lock, decoding included, so the event loop stays free and concurrent requests neither
oversubscribe the CPU nor hold several decoded images at once.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.middleware.trustedhost import TrustedHostMiddleware
from swagger_ui_bundle import swagger_ui_path

from skinlesion import __version__, fileio
from skinlesion.data.clinical import clinical_values
from skinlesion.data.images import MAX_ASPECT, MAX_IMAGE_PIXELS, ImageTooLargeError, ImageTooSmallError
from skinlesion.decision import operating_point
from skinlesion.decision.safeguards import Guarded
from skinlesion.device import return_freed_memory
from skinlesion.errors import SkinLesionError
from skinlesion.inference import selection
from skinlesion.inference.classifier import Classifier
from skinlesion.reporting import model_card
from skinlesion.reporting.explain import explain

STATIC = Path(__file__).with_name("static")
MULTIPART_OVERHEAD = 64 * 1024  # boundary + part headers on top of the file itself
HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece")
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def gradcam_views(explainer: Classifier, image: Image.Image, target_class: str) -> dict[str, Any]:
    """The model's view of ``image`` (resized, centre-cropped: what the network sees) and the Grad-CAM of
    ``target_class`` blended over that same view, as PNG data URLs, with the map's real resolution.

    The one seam to reporting.explain: its ``explain()`` picks the layer and computes the map.
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    exp = explain(explainer, image, target_class)
    return {
        "overlay": png_data_url(Image.fromarray(show_cam_on_image(exp.rgb, exp.cam, use_rgb=True))),
        "model_view": png_data_url(Image.fromarray((exp.rgb * 255).round().astype("uint8"))),
        "overlay_resolution": {"grid": list(exp.grid), "coarse": exp.coarse, "text": exp.resolution()},
    }


def safeguard_fields(guarded: Guarded, classes: Sequence[str]) -> dict[str, Any]:
    """The answer's safeguards for one image: refer (and why), the conformal label set, out of distribution."""
    return {
        "refer": bool(guarded.refer[0]),
        "refer_reason": guarded.reasons[0],
        "prediction_set": guarded.set_of(0, tuple(classes)),
        "out_of_distribution": bool(guarded.out_of_distribution[0]),
        "ood_score": None if guarded.ood_scores is None else float(guarded.ood_scores[0]),
    }


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def headline_metrics(run_dir: Path) -> dict[str, float] | None:
    """Point estimates from metrics.json (evaluation's file), or None before evaluation ran."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    out = {}
    for key in HEADLINE_METRICS:
        value = data.get(key)
        value = value.get("value") if isinstance(value, dict) else value
        if isinstance(value, int | float):
            out[key] = float(value)
    if "n_images" in data:
        out["n_images"] = data["n_images"]
    return out


def load_classifier(run_dir: Path, backend: str) -> tuple[selection.Choice, Classifier]:
    """The backend chosen (its name and notes) and the classifier; ``auto``: ONNX Runtime INT8, then fp32, when
    model.int8.onnx / model.onnx was exported from the current best.pt (inference/selection.py), else torch."""
    classifier, choice = selection.load(run_dir, backend)
    return choice, classifier


class ModelService:
    """Everything loaded once: the classifier (torch or ONNX backend) and the torch one for Grad-CAM."""

    def __init__(self, run_dir: str | Path, backend: str = "auto"):
        self.run_dir = Path(run_dir)
        ckpt = self.run_dir / "best.pt"
        if not ckpt.is_file():
            raise SkinLesionError(f"no best.pt in {self.run_dir}; pass the --run-dir of a trained run")
        choice, self.classifier = load_classifier(self.run_dir, backend)
        self.backend, self.notes = choice.backend, choice.notes  # notes: what `skinlesion serve` prints at start
        # Grad-CAM needs gradients, so the torch model is kept even when ONNX Runtime scores.
        self.explainer = self.classifier if self.backend == "torch" else Classifier.load(self.run_dir, "torch")
        self.model_id = f"{self.run_dir.name}@{fileio.sha256_file(ckpt)[:12]}"
        self.lock = threading.Lock()
        meta = self.explainer.backend.meta
        chain = self.classifier.chain
        prior = chain.metadata_prior
        point = chain.operating_point
        self.info = {
            "model_id": self.model_id,
            "run": self.run_dir.name,
            "backbone": meta["backbone"],
            "backend": self.backend,
            "img_size": self.classifier.preprocessing.img_size,
            "resize_size": self.classifier.preprocessing.resize_size,
            "preprocessing": self.classifier.preprocessing.to_dict(),
            "classes": list(chain.classes),
            "full_names": self.classifier.class_names,
            "temperature": float(chain.temperature),
            "epoch": meta.get("epoch"),
            # An ensemble's members (backbone, image size, epoch, source run, model id); None for one network.
            "members": (meta.get("config") or {}).get("members"),
            "metrics": headline_metrics(self.run_dir),
            # What the page may ask for: the metadata prior's body sites (None: the image model alone).
            "metadata_prior": None if prior is None else {"sites": list(prior["categories"]["localization"])},
            # Minimum sensitivities the decision honours (operating_point.py); None: the plain argmax.
            "operating_point": None
            if point is None
            else {"min_sensitivity": point["min_sensitivity"], "text": operating_point.describe(point)},
            # What the answer carries beside the decision (decision.safeguards); None where the run has none.
            "safeguards": self.classifier.safeguards.summary(),
            "version": __version__,
        }

    def predict(
        self,
        upload: bytes | Image.Image,
        cam: bool,
        clinical: dict[str, Any] | None = None,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> dict[str, Any]:
        """``upload``: the image's bytes (decoded here, inside the lock, with the ``max_pixels`` and MAX_ASPECT checks
        made from the header first) or a decoded image; ``clinical``: checked age / sex / localization
        (data.clinical.clinical_values), for the metadata prior."""
        chain = self.classifier.chain
        classes = chain.classes
        table = pd.DataFrame([clinical]) if chain.metadata_prior is not None and clinical else None
        # One request at a time, decoding included: inference already uses every core, and concurrent uploads
        # must not hold several decoded images at once.
        with self.lock:
            image = upload if isinstance(upload, Image.Image) else self.classifier.decode(
                upload, max_pixels=max_pixels, max_aspect=MAX_ASPECT
            )
            decisions, guarded = self.classifier.assess([image], clinical=table)
            probs, best = decisions.probabilities[0], int(decisions.labels[0])
            views = gradcam_views(self.explainer, image, classes[best]) if cam else {}
        out: dict[str, Any] = {
            "prediction": classes[best],
            "prediction_name": self.classifier.class_names[classes[best]],
            "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)},
            "model_id": self.model_id,
            "temperature": float(chain.temperature),
            "backend": self.backend,
            "image": {"width": image.width, "height": image.height},
            "metadata": clinical if table is not None else None,
        }
        out.update(safeguard_fields(guarded, classes))
        if guarded.out_of_distribution[0]:  # no diagnosis for an image unlike the training images
            out["prediction"], out["prediction_name"] = None, "no diagnosis: out of distribution"
        out.update(views)
        return out


@dataclass(frozen=True)
class Limits:
    """What an upload may be: its bytes (the body) and its decoded pixels (the project's one limit or lower)."""

    max_upload_mb: float
    max_pixels: int

    @property
    def max_upload(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def too_large(self) -> str:
        return f"upload is over the {self.max_upload_mb:g} MB limit; send a smaller image"


def create_app(
    run_dir: str | Path,
    max_upload_mb: float = 20.0,
    backend: str = "auto",
    max_megapixels: float = MAX_IMAGE_PIXELS / 1e6,
    allowed_hosts: Sequence[str] = ("*",),
) -> FastAPI:
    """Build the app; the model is loaded here, once, not per request. ``max_megapixels`` may only lower the
    project's one decompression limit (data.images.MAX_IMAGE_PIXELS); ``allowed_hosts``: accepted Host headers
    (Starlette's TrustedHostMiddleware; "*" = any)."""
    return_freed_memory()
    service = ModelService(run_dir, backend)
    limits = Limits(max_upload_mb, min(int(max_megapixels * 1_000_000), MAX_IMAGE_PIXELS))
    app = FastAPI(
        title="skinlesion",
        version=__version__,
        description="Dermatoscopic skin-lesion classifier (HAM10000 classes). A research tool, not a diagnosis.",
        max_body_size=limits.max_upload + MULTIPART_OVERHEAD,
        docs_url=None,  # served below from local Swagger UI files: /docs works offline
        redoc_url=None,  # FastAPI's ReDoc page loads its script from a CDN
    )
    app.state.service = service
    harden(app, limits, allowed_hosts)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "model_id": service.model_id, "backend": service.backend}

    @app.get("/api/model")
    def model_info() -> dict[str, Any]:
        return {**service.info, "max_upload_mb": limits.max_upload_mb, "max_megapixels": limits.max_pixels / 1e6}

    add_predict(app, service, limits)

    @app.get("/api/model-card")
    def model_card_json() -> dict[str, Any]:
        """What the model is for and not for, its training data, metrics with intervals, limitations, licences."""
        return model_card.build(service.run_dir)

    @app.get("/docs", include_in_schema=False)
    def docs() -> FileResponse:
        # Swagger UI 5 (swagger-ui-bundle-v2): it reads the OpenAPI 3.1 schema FastAPI writes; 4.x cannot.
        return FileResponse(STATIC / "docs.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/swagger", StaticFiles(directory=swagger_ui_path), name="swagger")
    return app


def harden(app: FastAPI, limits: Limits, allowed_hosts: Sequence[str]) -> None:
    """413 answers that say what to do, security headers on every response, and the Host check."""

    @app.exception_handler(413)
    async def explain_413(request: Request, exc: HTTPException) -> JSONResponse:
        # Say what the user can do. (A too-large Content-Length is answered by Starlette itself, as plain text.)
        if exc.detail == "Content Too Large":
            exc = HTTPException(413, limits.too_large)
        return await http_exception_handler(request, exc)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        # Every page, /docs too (its Swagger UI starts from a file, not an inline script), and every asset.
        response.headers["Content-Security-Policy"] = PAGE_CSP
        return response

    # A Host header we do not answer to is refused (400) before any route: a page on another site that
    # re-points its own name at this address (DNS rebinding) cannot read the API through the browser.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))


def add_predict(app: FastAPI, service: ModelService, limits: Limits) -> None:
    """``POST /api/predict``: one image (and optional age / sex / site) -> the decision chain's answer."""

    @app.post(
        "/api/predict",
        responses={413: {"description": "upload or pixel count too large"}, 415: {"description": "not an image"},
                   422: {"description": "image too small, or age / sex / site not valid"}},
    )
    def predict(
        file: Annotated[UploadFile, File(description="a JPEG or PNG image")],
        cam: Annotated[bool, Query(description="also return the Grad-CAM overlay as a PNG data URL")] = False,
        age: Annotated[float | None, Form(description="patient age in years (metadata prior; optional)")] = None,
        sex: Annotated[str | None, Form(description="male | female (metadata prior; optional)")] = None,
        site: Annotated[str | None, Form(description="body site, see /api/model (metadata prior; optional)")] = None,
    ) -> dict[str, Any]:
        prior = service.classifier.chain.metadata_prior
        try:
            clinical = clinical_values(age, sex, site, prior["categories"]["localization"] if prior else ())
        except SkinLesionError as e:
            raise HTTPException(422, str(e)) from e
        if clinical and prior is None:
            raise HTTPException(422, "this model has no metadata prior; leave age, sex and site out")
        # A sync endpoint: FastAPI runs it in its threadpool, so decoding and inference never block the loop.
        data = file.file.read(limits.max_upload + 1)
        if len(data) > limits.max_upload:
            raise HTTPException(413, limits.too_large)
        if not data:
            raise HTTPException(415, "empty upload; send a JPEG or PNG image")
        try:
            return service.predict(data, cam, clinical or None, limits.max_pixels)
        except ImageTooLargeError as e:
            raise HTTPException(413, str(e).replace("uploaded bytes: ", "")) from e
        except ImageTooSmallError as e:  # an image, but too small to hold a lesion: the same rule as every command
            raise HTTPException(422, str(e).replace("uploaded bytes: ", "")) from e
        except SkinLesionError as e:
            raise HTTPException(415, "the upload is not a readable image; send a JPEG or PNG file") from e
