"""How well a run's out-of-distribution detectors tell its own kind of image from others, through the product's code
(Classifier, decision/ood.py's scores and thresholds):

    python benchmarks/ood_check.py outputs/run [--other ../shared/data/isic2020_subset] [--json out.json]

In-distribution: the run's val images, split by lesion into two halves: the threshold of each detector (energy,
max-logit, max-softmax of the raw logits; Mahalanobis of the pooled features, fitted on the train images) is set
on one half to refuse 5 %, and its refusals are counted on the other. Out of distribution: every non-dermoscopy
picture available offline (data/ood_images.py: scikit-learn's photos, pictures bundled with installed packages,
blank / noise / gradient / checkerboard images, screenshots of text). ``--other``: a labelled dermoscopy folder of
another source (e.g. ISIC 2020): how many of its images would be refused. Prints, per detector, AUROC (val vs
non-dermoscopy) and the refusal rates.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from skinlesion.data.datasets import DataSpec, load_dataset
from skinlesion.data.ood_images import offline_ood_images
from skinlesion.data.run_folder import labels_of, lesion_ids, split_part
from skinlesion.data.split import lesion_folds
from skinlesion.decision import ood
from skinlesion.inference.classifier import Classifier
from skinlesion.inference.options import ScoringOptions

KINDS = ("energy", "max_logit", "max_softmax", "mahalanobis")


def scores_of(classifier: Classifier, table=None, images=None) -> tuple[np.ndarray, np.ndarray]:
    """Raw single-view logits and pooled features of a table's images or of PIL images."""
    if table is not None:
        options = ScoringOptions()
        return (classifier.view_logits_of_table(table, 1, options, "logits")[0],
                classifier.features_of_table(table, options, "features"))  # fmt: skip
    batch = classifier.preprocessing.batch(images)
    return classifier.backend.view_logits(batch, 1)[0], classifier.backend.features(batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--other", type=Path, help="a dermoscopy folder of another source (refusal rate only)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    classifier = Classifier.load(args.run_dir)
    val, train = split_part(args.run_dir, "val"), split_part(args.run_dir, "train")
    half = lesion_folds(val["dx"].astype(str).to_numpy(), lesion_ids(val), 2, 0) == 0
    v_logits, v_feats = scores_of(classifier, val)
    t_logits, t_feats = scores_of(classifier, train)
    named = offline_ood_images()
    o_logits, o_feats = scores_of(classifier, images=[im for _, im in named])
    other = None
    if args.other:
        table = load_dataset(DataSpec((str(args.other),), classes="melanoma-binary"))
        other = scores_of(classifier, table)
    rows = []
    for kind in KINDS:
        if kind == "mahalanobis":
            det = ood.fit_mahalanobis(t_feats, labels_of(train, classifier.classes), classifier.classes,
                                      v_feats[half])  # fmt: skip
        else:
            det = ood.fit_logits(v_logits[half], kind)
        s_in = ood.score(det, v_logits[~half], v_feats[~half])
        s_out = ood.score(det, o_logits, o_feats)
        row = {"detector": kind, "auroc": float(roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))],
                                                              np.r_[s_in, s_out])),
               "val_refused": float((s_in > det["threshold"]).mean()),
               "non_dermoscopy_refused": float((s_out > det["threshold"]).mean())}  # fmt: skip
        if other is not None:
            row["other_source_refused"] = float((ood.score(det, *other) > det["threshold"]).mean())
        rows.append(row)
    print(f"host {platform.processor() or platform.machine()}; {args.run_dir}: {int((~half).sum())} held-out val "
          f"images vs {len(named)} non-dermoscopy pictures" + (f" (+ {args.other})" if other else ""))
    for r in rows:
        print("  " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run_dir), "rows": rows, "ood_images": [n for n, _ in named]},
                                        indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
