"""Two run folders on the same labelled images, each through its own stored decision chain: the candidate minus
the reference, with paired lesion-bootstrap differences (e.g. a bigger backbone trained on the same split).

    .venv/bin/python benchmarks/paired_runs.py REFERENCE_RUN CANDIDATE_RUN [--split test] [--tta] [--json out.json]

Each model is what `skinlesion evaluate --run-dir RUN --split SPLIT [--tta]` loads (`Classifier.load`), scored
on its own image cache; the two runs' splits.csv must hold the same images in SPLIT. Every bootstrap resample
draws the lesions once and both models are scored on that same draw.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from skinlesion.data.run_folder import labels_of, split_part
from skinlesion.evaluation.fitting import table_logits
from skinlesion.inference.classifier import Classifier
from skinlesion.inference.options import ScoringOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_scoring import Outputs, compare, host, print_rows  # noqa: E402


def outputs_of(run: Path, split: str, tta: bool, batch_size: int, image_ids: list[str]) -> Outputs:
    """The run's probabilities and decisions on ``split``, in the order of ``image_ids``."""
    clf = Classifier.load(run)
    table = split_part(run, split).set_index("image_id").loc[image_ids].reset_index()
    views = table_logits(clf, run, table, clf.n_views(tta), ScoringOptions(batch_size), desc=run.name)  # its cache
    pool = table["lesion_id"].astype(str).to_numpy() if clf.chain.pool_lesions else None
    decided = clf.chain(views, clf.chain.offsets(table), pool)
    print(f"{run}: {'TTA ' + str(clf.n_views(tta)) + ' views' if tta else 'single view'}; {clf.chain.summary()}")
    return decided.probabilities, decided.labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path, help="run folder the differences are taken against")
    parser.add_argument("candidate", type=Path, help="run folder scored minus the reference")
    parser.add_argument("--split", default="test", help="part of the runs' splits.csv to score (default test)")
    parser.add_argument("--tta", action="store_true", help="score with each run's TTA views")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    table = split_part(args.reference, args.split)
    other = set(split_part(args.candidate, args.split)["image_id"])
    if other != set(table["image_id"]):
        raise SystemExit(f"error: the '{args.split}' parts of {args.reference} and {args.candidate} hold different "
                         "images; train the candidate with --splits <reference>/splits.csv")
    ids = table["image_id"].tolist()
    y, lesions = labels_of(table), table["lesion_id"].astype(str).to_numpy()
    print(f"host {host()}")
    print(f"'{args.split}' part: {len(y)} images / {len(set(lesions))} lesions")
    ref = outputs_of(args.reference, args.split, args.tta, args.batch_size, ids)
    cand = outputs_of(args.candidate, args.split, args.tta, args.batch_size, ids)
    rows = compare(y, lesions, cand, [ref], args.bootstrap)
    print_rows(rows, args.candidate.name[:10], args.reference.name[:10])
    if args.json:
        result = {"reference": str(args.reference), "candidate": str(args.candidate), "split": args.split,
                  "tta": bool(args.tta), "host": host(), "n_images": len(y), "rows": rows}  # fmt: skip
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
