"""Freeze what every consumer of the decision chain outputs on one fixed tiny run, to prove a refactor changed
no prediction.

    python scripts/golden_decisions.py --make-run /tmp/golden/run0 --out /tmp/golden/before   # old code
    python scripts/golden_decisions.py --run /tmp/golden/run0 --out /tmp/golden/after          # new code
    python scripts/golden_decisions.py --compare /tmp/golden/before /tmp/golden/after

``--make-run`` trains a tiny run on synthetic data with every post-hoc step on (logit adjustment, 8 TTA views,
metadata prior, lesion pooling, operating point); every later call copies that snapshot and, through the CLI
only, calibrates it (T != 1, the operating point set again), evaluates with TTA, exports ONNX, predicts with
both backends, draws one Grad-CAM and asks the web app once. ``--compare`` checks the two output folders agree:
numbers to 1e-6, everything else exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

SYNTH = Path("/tmp/golden/synth")  # a fixed path: config.json records the data folder


def cli(*argv: str, out: Path | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "skinlesion", *argv], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"skinlesion {' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
    if out is not None:
        out.write_text(done.stdout)
    return done.stdout


def make_run(snapshot: Path) -> None:
    if not (SYNTH / "HAM10000_metadata.csv").is_file():
        cli("synth", "--out", str(SYNTH), "--n-per-class", "30", "--seed", "0")
    cli("train", "--data-dir", str(SYNTH), "--out", str(snapshot.parent), "--run-name", snapshot.name,
        "--recipe", "improved", "--backbone", "efficientnet_b0", "--no-pretrained", "--img-size", "64",
        "--epochs", "6", "--batch-size", "16", "--lr", "3e-3", "--seed", "0", "--workers", "0",
        "--min-sensitivity", "mel=0.9")  # fmt: skip


def outputs(snapshot: Path, out: Path) -> None:
    run = out / "run"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(snapshot, run)
    for stale in ("model.onnx", "predictions.csv", "metrics.json"):
        (run / stale).unlink(missing_ok=True)
    cli("calibrate", "--run-dir", str(run), out=out / "calibrate.txt")
    cli("evaluate", "--run-dir", str(run), "--tta", "--lesion-level", "--bootstrap", "50", "--seed", "0",
        out=out / "evaluate.txt")  # fmt: skip
    cli("export", "--run-dir", str(run))
    splits = pd.read_csv(run / "splits.csv")
    val = splits[splits["split"] == "val"].head(12)
    images = [str(SYNTH / "images" / f"{i}.jpg") for i in val["image_id"]]
    meta = str(SYNTH / "HAM10000_metadata.csv")
    for backend in ("torch", "onnx"):
        cli("predict", "--run-dir", str(run), "--backend", backend, "--format", "json", "--tta", "--metadata", meta,
            *images, out=out / f"predict_{backend}.json")  # fmt: skip
    cli("gradcam", "--run-dir", str(run), "--image", images[0], "--out", str(out / "cam.png"), out=out / "gradcam.txt")
    from fastapi.testclient import TestClient

    from skinlesion.serve.app import create_app

    client = TestClient(create_app(run, backend="torch"))
    with open(images[1], "rb") as f:
        answer = client.post("/api/predict", files={"file": ("x.jpg", f, "image/jpeg")},
                             data={"age": "55", "sex": "female", "site": "back"}).json()  # fmt: skip
    (out / "serve.json").write_text(json.dumps(answer, indent=1))
    import onnx

    props = {p.key: p.value for p in onnx.load(str(run / "model.onnx")).metadata_props}
    props.pop("source_sha256")
    (out / "onnx_metadata.json").write_text(json.dumps(props, indent=1, sort_keys=True))
    for name in ("predictions.csv", "predictions_tta.csv", "metrics.json", "calibration.json"):
        shutil.copy(run / name, out / name)


def same(a, b, where: str, problems: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            problems.append(f"{where}: keys {sorted(set(a) ^ set(b))}")
        for k in set(a) & set(b):
            same(a[k], b[k], f"{where}.{k}", problems)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]", problems)
    elif isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        if not (a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6):
            problems.append(f"{where}: {a} != {b}")
    elif a != b:
        problems.append(f"{where}: {a!r} != {b!r}")


def compare(before: Path, after: Path) -> int:
    problems: list[str] = []
    for name in ("metrics.json", "calibration.json", "predict_torch.json", "predict_onnx.json", "serve.json",
                 "onnx_metadata.json"):  # fmt: skip
        a, b = (json.loads((d / name).read_text()) for d in (before, after))
        if name == "serve.json":
            a.pop("model_id"), b.pop("model_id")  # the checkpoint's hash: the run folder is a fresh copy
        if name.startswith("predict_"):
            a.pop("run_dir"), b.pop("run_dir")
        if name == "onnx_metadata.json":
            a, b = ({k: json.loads(v) if v[:1] in "[{" else v for k, v in d.items()} for d in (a, b))
        same(a, b, name, problems)
    for name in ("predictions.csv", "predictions_tta.csv"):
        a, b = (pd.read_csv(d / name) for d in (before, after))
        same(a.to_dict("list"), b.to_dict("list"), name, problems)
    for name in ("gradcam.txt",):
        if (before / name).read_text().splitlines()[0] != (after / name).read_text().splitlines()[0]:
            problems.append(f"{name}: the decisions differ")
    print("\n".join(problems[:40]) or "golden outputs match")
    return 1 if problems else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-run", type=Path, help="train the fixed tiny run into this folder first")
    p.add_argument("--run", type=Path, help="the snapshot run folder (made by --make-run)")
    p.add_argument("--out", type=Path, help="where the outputs go")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = p.parse_args()
    if args.compare:
        raise SystemExit(compare(*args.compare))
    if args.make_run:
        make_run(args.make_run)
    outputs(args.make_run or args.run, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
