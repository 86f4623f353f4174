"""``skinlesion evaluate``: predict one part of splits.csv (or an external labelled folder) with best.pt through
the run's decision chain, then write predictions.csv, metrics.json (lesion-bootstrap intervals) and
classification_report.txt."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from sklearn.metrics import classification_report

from skinlesion import fileio
from skinlesion.data.ham10000 import load_table
from skinlesion.data.run_folder import (
    default_split,
    labels_of,
    open_cache,
    overlap_with_training,
    read_config,
    split_part,
)
from skinlesion.decision import lesion_pooling, operating_point
from skinlesion.decision.chain import Decisions
from skinlesion.device import resolve_device
from skinlesion.errors import SkinLesionError
from skinlesion.evaluation import isic
from skinlesion.evaluation.scoring import lesion_level, predictions_frame, score, summary_table
from skinlesion.inference.classifier import Classifier
from skinlesion.inference.views import describe as describe_views


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "external"


def main(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    external = any(getattr(args, k, None) for k in ("data_dir", "metadata", "images"))
    classifier = Classifier.load(run_dir, "torch", str(resolve_device(args.device)))
    if external:
        table = load_table(
            data_dir=args.data_dir, metadata=args.metadata, images=args.images, allow_missing=args.allow_missing
        )
        if "lesion_id" not in table or table["lesion_id"].isna().any():
            # No lesion ids (e.g. ISIC 2018 test): each image is its own lesion for the bootstrap.
            table = table.assign(lesion_id=table.get("lesion_id", table["image_id"]).fillna(table["image_id"]))
        overlap, by_image, by_lesion = overlap_with_training(run_dir, table)
        leak = {"images": int(overlap.sum()), "by_image_id": by_image, "by_lesion_id": by_lesion,
                "kept": bool(args.keep_overlap)}  # fmt: skip
        if overlap.any():
            what = (f"{leak['images']} of {len(table)} images were trained on by this run ({by_image} by image id, "
                    f"{by_lesion} more by lesion id)")  # fmt: skip
            if args.keep_overlap:
                leak["warning"] = f"{what}; kept (--keep-overlap): these metrics are optimistic"
                print(f"warning: {leak['warning']}", file=sys.stderr)
            elif overlap.all():
                raise SkinLesionError(f"all {len(table)} images were trained on by this run ({by_image} by image id, "
                                      f"{by_lesion} by lesion id); nothing unseen is left to score (--keep-overlap "
                                      "scores them anyway, optimistically)")  # fmt: skip
            else:
                table = table[~overlap].reset_index(drop=True)
                print(f"{what}; scored without them ({len(table)} left; --keep-overlap keeps them)", file=sys.stderr)
        name = _safe_name(args.name or Path(args.data_dir or args.images or args.metadata).name)
        out_dir = run_dir / f"eval_{name}"
        source = {"external": name, "data_dir": args.data_dir, "metadata": args.metadata, "images": args.images,
                  "overlap_with_training": leak}  # fmt: skip
    else:
        split = args.split or default_split(run_dir)
        table = split_part(run_dir, split)
        out_dir = run_dir
        source = {"split": split}
    y = labels_of(table)

    # The run's chain, with what the flags switch off.
    switches = (getattr(args, "tta_views", None), getattr(args, "metadata_prior", True),
                getattr(args, "operating_point", True), getattr(args, "pool_lesions", None))  # fmt: skip
    classifier = classifier.switched(*switches)
    chain = classifier.chain

    # The run's own images live in the cache training used, unless told otherwise.
    cache_dir = args.cache_dir or (None if external else read_config(run_dir).get("cache_dir"))
    cache = open_cache(table, classifier.backend.resize_size, getattr(args, "cache", True), cache_dir)
    views = classifier.view_logits_of_table(table, classifier.n_views(args.tta), args.batch_size, cache,
                                            args.workers, desc=f"evaluate {len(y)}")  # fmt: skip
    offsets = chain.offsets(table)
    with_metadata = chain.images_with_metadata(table)
    lesions = table["lesion_id"].astype(str).to_numpy()
    pooled = lesion_pooling.shared(lesions) if chain.pool_lesions else 0
    pool_ids = lesions if pooled else None
    decisions = chain(views[:1], offsets, pool_ids)
    point = chain.operating_point

    result: dict[str, Any] = {
        **source,
        "temperature": chain.temperature,
        "metadata_prior": {"applied": with_metadata > 0, "images_with_metadata": with_metadata},
        # Each image scored with its lesion's pooled probabilities.
        "lesion_pooling": {"applied": pooled > 0, "images_pooled": pooled},
        # In-sample when scored on the split it was fitted on.
        "operating_point": chain.summary()["operating_point"],
        "tta": False,
        **score(y, decisions, lesions, args.bootstrap, args.seed),
    }
    columns = {"images": result}
    labels = list(range(len(chain.classes)))
    report = classification_report(y, decisions.labels, labels=labels, target_names=list(chain.classes), digits=3,
                                   zero_division=0)  # fmt: skip
    frame = predictions_frame(table, decisions)
    fileio.write_csv(out_dir / "predictions.csv", frame)
    if args.tta:
        with_tta = chain(views, offsets, pool_ids)
        fileio.write_csv(out_dir / "predictions_tta.csv", predictions_frame(table, with_tta))
        result["with_tta"] = columns["images+TTA"] = score(y, with_tta, lesions, args.bootstrap, args.seed)
        result["tta_views"] = chain.tta_views
        report += f"\nWith TTA ({chain.tta_views} views: {describe_views(chain.tta_views)}):\n" + classification_report(
            y, with_tta.labels, labels=labels, target_names=list(chain.classes), digits=3, zero_division=0
        )
    if args.lesion_level:
        ly, lp, lid = lesion_level(frame, list(chain.classes))
        per_lesion = Decisions(lp, chain.decide(lp), chain.classes)
        result["lesion_level"] = columns["lesions"] = score(ly, per_lesion, lid, args.bootstrap, args.seed)
    if args.isic_csv:  # the TTA decisions with --tta, as the headline
        final, tta = (with_tta, True) if args.tta else (decisions, False)
        path = isic.write_submission(args.isic_csv, table["image_id"].astype(str).tolist(),
                                     chain.decision_probabilities(final.probabilities, tta), chain.classes)  # fmt: skip
        print(f"wrote {path} (ISIC 2018 Task 3 submission, {len(table)} images)")
    fileio.write_json(out_dir / "metrics.json", result)
    fileio.write_text(out_dir / "classification_report.txt", report)

    where = source.get("split") or source.get("external")
    print(f"{where}: {result['n_images']} images, {result['n_lesions']} lesions, temperature {chain.temperature:.3f}")
    if chain.metadata_prior is not None:
        print(f"metadata prior added for {with_metadata} of {len(y)} images (age / sex / site known)")
    if chain.pool_lesions:
        print(lesion_pooling.describe(lesions) if pooled else "lesion pooling: no two images share a lesion id")
    if point is not None:
        fitted_here = point["fitted_on"] == source.get("split")
        print(f"operating point {operating_point.describe(point)}" + (f" (set on these {point['fitted_on']} images: "
              "its sensitivity here is in-sample)" if fitted_here else ""))  # fmt: skip
        if pooled:
            print("note: the operating point was set on single images; pooled, its sensitivity is close to the target "
                  "rather than exactly on it")  # fmt: skip
        if point.get("metadata_prior") and chain.metadata_prior is None:
            print("note: the operating point was set with the metadata prior; without it its sensitivity is not kept")
        if args.tta and point.get("tta_views") not in (None, chain.tta_views):
            print(f"note: the operating point's TTA bias was set on {point['tta_views']} views, not "
                  f"{chain.tta_views}; its sensitivity with these is not kept")  # fmt: skip
    print(summary_table(columns))
    print(f"wrote {out_dir / 'predictions.csv'}, metrics.json, classification_report.txt")
