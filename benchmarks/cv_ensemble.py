"""A `train --folds K` run on its held-out test part: the fold ensemble against the mean single fold, with paired
lesion-bootstrap differences.

    .venv/bin/python benchmarks/cv_ensemble.py outputs/cv5 [--tta] [--bootstrap 1000] [--json out.json]

Everything is scored through the product: the ensemble is `Classifier.load(<run>)` (the model `evaluate`
loads), each fold is its own network behind the same decision chain (the temperature, metadata prior and
operating point fitted out of fold and stored in the ensemble's best.pt), and the test images' logits come
from `Classifier.view_logits_of_table` on the image cache training used. The ensemble's logits are checked
against the mean of the folds' logits (they are the same numbers by construction).

Paired differences: every bootstrap resample draws the test lesions once, and the ensemble and every fold are
scored on that same draw; the difference is ensemble minus the mean of the folds. Prints one table and the
issue's targets (balanced accuracy +0.02, macro AUC +0.005, ECE <= 0.03).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from skinlesion.data.run_folder import labels_of, read_config, split_part
from skinlesion.inference.classifier import Classifier, load_backend
from skinlesion.inference.options import ScoringOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_scoring import compare, host, print_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the parent folder of `skinlesion train --folds K`")
    parser.add_argument("--tta", action="store_true", help="score with the run's TTA views (the headline)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    run = args.run_dir
    config = read_config(run)
    folds = [run / m["run"] for m in config["members"]]
    ensemble = Classifier.load(run)
    chain = ensemble.chain
    table = split_part(run, "test")
    y, lesions = labels_of(table), table["lesion_id"].astype(str).to_numpy()
    n_views = ensemble.n_views(args.tta)
    options = ScoringOptions(args.batch_size, cache=config.get("cache", True), cache_dir=config.get("cache_dir"))
    offsets = chain.offsets(table)
    pool = lesions if chain.pool_lesions else None

    def decide(views: np.ndarray):
        d = chain(views, offsets, pool)
        return d.probabilities, d.labels

    ens_views = ensemble.view_logits_of_table(table, n_views, options, desc="ensemble")
    fold_views = [Classifier(load_backend(f), chain).view_logits_of_table(table, n_views, options, desc=f.name)
                  for f in folds]  # fmt: skip
    gap = float(np.abs(ens_views - np.mean(fold_views, axis=0)).max())
    print(f"host {host()}")
    print(f"{run}: {len(folds)} folds, test part {len(y)} images / {len(set(lesions))} lesions, "
          f"{'TTA ' + str(n_views) + ' views' if args.tta else 'single view'}; chain: {chain.summary()}")
    print(f"ensemble logits vs mean of fold logits: max |diff| {gap:.2e}")

    rows = compare(y, lesions, decide(ens_views), [decide(v) for v in fold_views], args.bootstrap)
    print_rows(rows, "ensemble", "mean fold")
    result: dict = {"run": str(run), "host": host(), "n_test": int(len(y)), "tta": bool(args.tta),
                    "n_views": n_views, "logit_gap": gap, "candidate": "ensemble", "reference": "mean of the folds",
                    "rows": rows}  # fmt: skip
    r = result["rows"]
    targets = {
        "balanced accuracy >= mean fold + 0.02": r["balanced_accuracy"]["diff"] >= 0.02,
        "macro AUC >= mean fold + 0.005": r["macro_auc"]["diff"] >= 0.005,
        "ECE (out-of-fold calibration) <= 0.03": r["ece"]["candidate"] <= 0.03,
    }
    result["targets"] = targets
    for name, ok in targets.items():
        print(f"target {name}: {'MET' if ok else 'not met'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
