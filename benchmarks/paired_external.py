"""Two runs scored by `skinlesion evaluate` on the same external set, melanoma vs the rest: each run's AUC and
partial AUC (above 80 % sensitivity) of p(melanoma), and the candidate minus the reference with paired bootstrap
intervals (every resample draws the groups -- patients where the set has them, else lesions -- once for both).

    skinlesion evaluate --run-dir REF --data-dir ../shared/data/isic2020_subset --tta
    skinlesion evaluate --run-dir CAND --data-dir ../shared/data/isic2020_subset --tta
    python benchmarks/paired_external.py REF/eval_isic2020_subset CAND/eval_isic2020_subset [--json out.json]

The probabilities are the ones `evaluate` wrote (predictions_tta.csv when it exists, else predictions.csv): this
script only compares them, it scores nothing itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from skinlesion import metrics
from skinlesion.evaluation.clinical_metrics import ISIC_MIN_SENSITIVITY, _rows_partial_auc, weighted_roc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_scoring import host  # noqa: E402


def predictions(eval_dir: Path) -> tuple[pd.DataFrame, str]:
    for name in ("predictions_tta.csv", "predictions.csv"):
        if (eval_dir / name).is_file():
            return pd.read_csv(eval_dir / name, dtype={"image_id": str}), name
    raise SystemExit(f"error: no predictions.csv in {eval_dir}; run `skinlesion evaluate --data-dir ...` first")


def groups_of(frame: pd.DataFrame) -> tuple[np.ndarray, str]:
    for column in ("group_id", "patient_id", "lesion_id"):
        if column in frame and frame[column].notna().all():
            return frame[column].astype(str).to_numpy(), column
    return frame["image_id"].to_numpy(), "image_id"


def curves(positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    fpr, tpr, *_ = weighted_roc(positive, score, weights)
    return {"auc": metrics._weighted_auc(positive, score, weights),
            "auc_80": _rows_partial_auc(fpr, tpr, ISIC_MIN_SENSITIVITY)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference", type=Path, help="the reference run's eval_<name> folder")
    p.add_argument("candidate", type=Path, help="the candidate run's eval_<name> folder")
    p.add_argument("--positive", default="mel", help="the positive class code (default mel)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    (ref, ref_file), (cand, cand_file) = predictions(args.reference), predictions(args.candidate)
    if set(ref["image_id"]) != set(cand["image_id"]):
        raise SystemExit("error: the two folders scored different images; evaluate both runs on the same set")
    cand = cand.set_index("image_id").loc[ref["image_id"]].reset_index()
    positive = (ref["y_true"] == args.positive).to_numpy()
    score_ref, score_cand = ref[f"p_{args.positive}"].to_numpy(float), cand[f"p_{args.positive}"].to_numpy(float)
    groups, grouped_by = groups_of(ref)
    full = np.ones((1, len(ref)))
    weights = metrics.lesion_weights(groups, args.bootstrap, 0)
    rows = {}
    for name in ("auc", "auc_80"):
        point_ref, point_cand = curves(positive, score_ref, full)[name][0], curves(positive, score_cand, full)[name][0]
        diff = curves(positive, score_cand, weights)[name] - curves(positive, score_ref, weights)[name]
        lo, hi = np.nanpercentile(diff, [2.5, 97.5])
        rows[name] = {"reference": float(point_ref), "candidate": float(point_cand),
                      "diff": float(point_cand - point_ref), "diff_ci95": [float(lo), float(hi)]}  # fmt: skip
    print(f"host {host()}")
    print(f"{len(ref)} images, {int(positive.sum())} {args.positive}, {len(set(groups))} groups ({grouped_by}); "
          f"{ref_file} / {cand_file}")  # fmt: skip
    for name, r in rows.items():
        lo, hi = r["diff_ci95"]
        print(f"{name:8} reference {r['reference']:.3f}  candidate {r['candidate']:.3f}  diff {r['diff']:+.3f} "
              f"[{lo:+.3f}, {hi:+.3f}]")  # fmt: skip
    if args.json:
        result = {"reference": str(args.reference), "candidate": str(args.candidate), "host": host(),
                  "n_images": len(ref), "n_positive": int(positive.sum()), "grouped_by": grouped_by,
                  "predictions": cand_file, "bootstrap": args.bootstrap, "rows": rows}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
