"""The demo's published numbers, written by the demo itself: `make demo` ends with this script, which reads the run's
metrics.json and config.json, names the host, and writes docs/demo_numbers.json and the README's
`<!-- demo-numbers -->` block (rendered from that JSON only, so a test can check the README against it).

    python scripts/demo_numbers.py outputs/demo --started 1733370000   # what `make demo` runs last
    python scripts/demo_numbers.py --check                              # README block == docs/demo_numbers.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_blocks  # noqa: E402

JSON = doc_blocks.REPO / "docs" / "demo_numbers.json"
README = doc_blocks.REPO / "README.md"
BLOCK = "demo-numbers"
METRICS = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("macro_f1", "macro F1"),
    ("macro_auc", "macro AUC"),
)


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    text = info.read_text(encoding="utf-8", errors="replace") if info.exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    return model or platform.processor() or platform.machine()


def host(config: dict[str, Any]) -> str:
    """The machine and the precision the run trained in, e.g. "a 2-core AMD EPYC CPU, fp32 (no bf16)"."""
    device = str(config.get("device_used", "cpu"))
    amp = str(config.get("amp_dtype") or "")
    precision = "bf16 autocast" if "bfloat16" in amp else "fp16 autocast" if "float16" in amp else "fp32 (no bf16)"
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "a CUDA GPU"
        return f"{name}, {precision}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"a {cores}-core {cpu_model()} CPU, {precision}"


def interval(entry: dict[str, Any]) -> list[float]:
    return [entry["value"], *entry.get("ci95", [None, None])]


def collect(run_dir: Path, host_text: str, seconds: float | None, note: str | None = None) -> dict[str, Any]:
    """What the README quotes, from the run's own files."""
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    tta = metrics.get("with_tta") or {}
    return {
        "host": host_text,
        "note": note,
        "minutes": None if seconds is None else round(seconds / 60, 1),
        "versions": {k: config.get("versions", {}).get(k) for k in ("torch", "timm")},
        "run": {k: config.get(k) for k in ("backbone", "img_size", "epochs", "lr", "n_train", "n_val")},
        "split": metrics.get("split", "val"),
        "n_images": metrics["n_images"],
        "n_lesions": metrics["n_lesions"],
        "temperature": metrics.get("temperature"),
        "metrics": {name: interval(metrics[name]) for name, _ in METRICS},
        "tta_views": metrics.get("tta_views"),
        "tta": {name: interval(tta[name]) for name, _ in METRICS if name in tta},
    }


def fmt(values: list[float | None]) -> str:
    value, lo, hi = values
    return f"{value:.3f}" if lo is None else f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def render(numbers: dict[str, Any]) -> str:
    """The README's demo paragraph (Markdown), from docs/demo_numbers.json's content only."""
    run, took = numbers["run"], numbers["minutes"]
    scores = ", ".join(f"{label} {fmt(numbers['metrics'][name])}" for name, label in METRICS)
    tta = numbers["tta"]
    tta_text = ""
    if tta:
        tta_text = (
            f"; with {numbers['tta_views']}-view TTA balanced accuracy {tta['balanced_accuracy'][0]:.3f} and "
            f"macro AUC {tta['macro_auc'][0]:.3f}"
        )
    machine = "; ".join(
        part
        for part in (
            numbers["host"],
            f"{took:g} min in all" if took is not None else None,
            numbers.get("note"),
            ", ".join(f"{k} {v}" for k, v in numbers["versions"].items() if v),
        )
        if part
    )
    text = (
        "*Written by `make demo` itself ([scripts/demo_numbers.py](scripts/demo_numbers.py), from the run's "
        f"`metrics.json`; [docs/demo_numbers.json](docs/demo_numbers.json)).* Last run: {machine}. On the sample's "
        f"{numbers['split']} split ({numbers['n_images']} images, {numbers['n_lesions']} lesions; 95 % "
        f"lesion-bootstrap intervals): {scores}{tta_text}. Runs repeat exactly on one machine; another CPU (bf16 or "
        f"not) or library build gives somewhat different numbers. Those are {run['n_train']} training images and "
        f"{run['epochs']} epochs at {run['img_size']} px, so they say the pipeline works, not how good a full run is "
        "— see [Results](#results-on-real-data)."
    )
    return doc_blocks.wrap(text) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, nargs="?", help="the demo's run folder (outputs/demo)")
    p.add_argument("--started", type=float, help="Unix time the demo started (for its duration)")
    p.add_argument("--note", help="said after the host and duration, e.g. that other jobs shared the machine")
    p.add_argument("--json", type=Path, default=JSON)
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--check", action="store_true", help="exit 1 when the README block differs from the JSON's")
    args = p.parse_args(argv)
    if args.check:
        numbers = json.loads(args.json.read_text(encoding="utf-8"))
        if doc_blocks.stale(args.readme, {BLOCK: render(numbers)}):
            print(f"{args.readme}: the {BLOCK} block differs from {args.json}; run scripts/demo_numbers.py")
            return 1
        return 0
    if args.run_dir is None:
        p.error("give the demo's run folder, or --check")
    config = json.loads((args.run_dir / "config.json").read_text(encoding="utf-8"))
    seconds = time.time() - args.started if args.started else None
    numbers = collect(args.run_dir, host(config), seconds, args.note)
    args.json.write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    doc_blocks.fill_file(args.readme, {BLOCK: render(numbers)})
    print(f"wrote {args.json} and the demo numbers in {args.readme}:\n{render(numbers)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
