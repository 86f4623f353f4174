"""Which backend scores a run: the one asked for, or (``auto``) the fastest up-to-date one.

``auto`` on the CPU: ONNX Runtime INT8 (model.int8.onnx) when it was made from the current best.pt and its drift
measured at export lost at most ``drift.MAX_BALANCED_ACCURACY_DROP`` balanced accuracy and it ran faster than
model.onnx when export timed both on the CPU; else ONNX Runtime fp32
(model.onnx) when made from the current best.pt; else PyTorch. On a GPU (or MPS) ``auto`` is PyTorch. Every backend
feeds the same ``DecisionChain``. A stale file asked for by name is used, with a warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from skinlesion import fileio
from skinlesion.errors import SkinLesionError
from skinlesion.inference import drift
from skinlesion.inference.classifier import Classifier

AUTO = "auto"
BACKENDS = ("torch", "onnx", "onnx-int8")
CHOICES = (AUTO, *BACKENDS)
FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}


@dataclass(frozen=True)
class Choice:
    backend: str  # one of BACKENDS
    notes: tuple[str, ...] = ()  # why auto passed a file over, or that a file asked for is stale (stderr lines)


def onnx_props(path: Path) -> dict[str, str]:
    import onnx

    try:
        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as e:  # noqa: BLE001 - a corrupt file is the user's to fix
        raise SkinLesionError(f"could not read {path} ({fileio.first_line(e)}); re-run `skinlesion export`") from e


def stale_note(run_dir: Path, path: Path, source_sha256: str, sha_of_best: str | None) -> str | None:
    if not source_sha256 or sha_of_best is None or sha_of_best == source_sha256:
        return None
    flag = " --int8" if path.name == FILES["onnx-int8"] else ""
    return (f"{path} was exported from an older best.pt (retrained or recalibrated since); re-run `skinlesion "
            f"export{flag} --run-dir {run_dir}`")  # fmt: skip


def int8_note(file: Path, props: dict[str, str]) -> tuple[str, ...]:
    """What scoring with an INT8 file means, from the drift measured at export (nothing for an fp32 file)."""
    if props.get("precision") != "int8":
        return ()
    measured = json.loads(props.get("int8_drift", "null"))
    if not measured:
        return (f"note: scoring with {file} (INT8, its drift from fp32 was not measured); --backend onnx keeps fp32",)
    delta = measured["metrics"]["balanced_accuracy"]["delta"]
    change = f", balanced accuracy {delta:+.4f}" if delta is not None else ""
    return (f"note: scoring with {file} (INT8; at export its decisions agreed with fp32 on "
            f"{measured['agreement']:.1%} of {measured['split']}{change}); --backend onnx keeps fp32",)  # fmt: skip


def choose(run_dir: str | Path, backend: str = AUTO, device: str = "cpu") -> Choice:
    """The backend to load for ``run_dir`` (a run folder, a best.pt or a .onnx file) and the notes to print."""
    if backend not in CHOICES:
        raise SkinLesionError(f"unknown backend {backend!r}; choose {', '.join(CHOICES)}")
    path = Path(run_dir)
    if not path.is_dir():  # a file: its own kind
        if backend != AUTO:
            return Choice(backend)
        if path.suffix != ".onnx":
            return Choice("torch")
        return Choice("onnx-int8" if onnx_props(path).get("precision") == "int8" else "onnx")
    best = path / "best.pt"

    @cache
    def sha_of_best() -> str | None:
        return fileio.sha256_file(best) if best.is_file() else None

    if backend != AUTO:
        file = path / FILES.get(backend, "")
        if backend == "torch" or not file.is_file():
            return Choice(backend)  # a missing file is reported by the backend that needs it
        props = onnx_props(file)
        note = stale_note(path, file, props.get("source_sha256", ""), sha_of_best())
        return Choice(backend, ((f"warning: {note}",) if note else ()) + int8_note(file, props))
    if str(device) not in ("cpu", "auto"):
        return Choice("torch")
    return auto(path, sha_of_best)


def auto(run_dir: Path, sha_of_best) -> Choice:
    notes: list[str] = []
    for name in ("onnx-int8", "onnx"):
        file = run_dir / FILES[name]
        if not file.is_file():
            continue
        props = onnx_props(file)
        note = stale_note(run_dir, file, props.get("source_sha256", ""), sha_of_best())
        if note is None and (json.loads(props.get("ood", "null")) or {}).get("kind") == "mahalanobis":
            note = f"{file}: the run's out-of-distribution check reads pooled features, which only torch gives"
        if note is None and name == "onnx-int8":
            measured = json.loads(props.get("int8_drift", "null"))
            if not drift.acceptable(measured):
                drop = drift.balanced_accuracy_drop(measured)
                why = ("was not checked on labelled images at export" if drop is None else
                       f"lost {drop:.3f} balanced accuracy at export (over {drift.MAX_BALANCED_ACCURACY_DROP})")
                note = f"{file} {why}; pass --backend onnx-int8 to use it anyway"
        speed = measured_json(file, props, "int8_speed") if note is None and name == "onnx-int8" else None
        if not faster(speed):
            ratio = speed_ratio(speed)
            what = f"ran at {ratio:.2f}x model.onnx's speed" if ratio is not None else "has no valid speed"
            note = (f"{file}: at export it {what} on this CPU ({speed.get('cpu', '?')}); pass --backend onnx-int8 "
                    "to use it anyway")  # fmt: skip
        if note is None:
            return Choice(name, (*notes, *int8_note(file, props)))
        notes.append(f"note: not using {note}")
    return Choice("torch", tuple(notes))


def measured_json(file: Path, props: dict[str, str], key: str) -> dict[str, Any] | None:
    """A measurement export stored in ``file``'s metadata (None when absent); one line naming the fix when it is
    not a JSON object (a damaged or hand-edited file)."""
    text = props.get(key)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise SkinLesionError(f"{file}: its {key} metadata is unreadable; export it again with `skinlesion export "
                              "--run-dir RUN --int8`")  # fmt: skip
    return value


def speed_ratio(speed: dict[str, Any]) -> float | None:
    """INT8's images/s over fp32's as export timed them; None when they are not two positive numbers."""
    int8, fp32 = speed.get("int8_img_s"), speed.get("fp32_img_s")
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in (int8, fp32))
    return int8 / fp32 if numbers else None


def faster(speed: dict[str, Any] | None) -> bool:
    """Whether INT8 ran faster than fp32 when export timed both (True when it was not timed: older files)."""
    if speed is None:
        return True
    ratio = speed_ratio(speed)
    return ratio is not None and ratio > 1


def load(run_dir: str | Path, backend: str = AUTO, device: str = "cpu") -> tuple[Classifier, Choice]:
    """The run's classifier on the chosen backend, and the choice (with its notes)."""
    choice = choose(run_dir, backend, device)
    return Classifier.load(run_dir, choice.backend, device), choice
