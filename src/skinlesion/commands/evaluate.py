"""``skinlesion evaluate``: score one part of splits.csv, a --folds run's out-of-fold predictions or an external
labelled folder through the run's decision chain (evaluation/evaluate.py); print the summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from skinlesion.data.datasets import DataSpec
from skinlesion.decision import lesion_pooling, operating_point
from skinlesion.evaluation.evaluate import EvalResult, ExternalSet, evaluate
from skinlesion.evaluation.evidence import per_class_lines
from skinlesion.evaluation.scoring import summary_table
from skinlesion.inference.options import ScoringOptions


def main(args: argparse.Namespace) -> None:
    external = None
    if any(getattr(args, k, None) for k in ("data_dir", "metadata", "images")):
        external = ExternalSet(DataSpec.of(args), args.name, args.keep_overlap, args.task)
    switches = (args.tta_views, args.metadata_prior, args.operating_point, args.pool_lesions)
    result = evaluate(args.run_dir, split=args.split, tta=args.tta, external=external,
                      lesion_level_scores=args.lesion_level, bootstrap=args.bootstrap, seed=args.seed,
                      switches=switches, options=ScoringOptions.from_args(args), isic_csv=args.isic_csv)  # fmt: skip
    for note in result.notes:
        print(note, file=sys.stderr)
    print_summary(result, args.tta)


def print_melanoma(result: EvalResult) -> None:
    """The melanoma-vs-rest scores of an external set that knows only that (evaluation/evaluate.score_melanoma)."""
    m = result.metrics
    print(f"{m['external']}: {m['n_images']} images ({m['n_melanomas']} melanomas, {m['n_groups']} patients / lesions)"
          f", melanoma = {m['positive_class']} vs the rest of this run's classes")  # fmt: skip
    for label, scored in (("single view", m), (f"TTA {m.get('tta_views')} views", m.get("with_tta"))):
        if not scored:
            continue
        mel = scored["melanoma"]
        print(f"  {label}: " + "  ".join(f"{k} {fmt_entry(mel[k])}" for k in ("auc", "auc_80", "sensitivity",
                                                                              "specificity", "average_precision")))
    print(f"wrote {Path(result.out_dir) / 'predictions.csv'}, metrics.json")


def fmt_entry(entry: dict) -> str:
    if entry.get("value") is None:
        return "n/a"
    ci = entry.get("ci95")
    return f"{entry['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def print_summary(result: EvalResult, tta: bool) -> None:
    m, chain = result.metrics, result.chain
    if m.get("task") == "melanoma":
        print_melanoma(result)
        return
    where = m.get("split") or m.get("external")
    print(f"{where}: {m['n_images']} images, {m['n_lesions']} lesions, temperature {chain.temperature:.3f}")
    if chain.metadata_prior is not None:
        print(f"metadata prior added for {m['metadata_prior']['images_with_metadata']} of {m['n_images']} images "
              "(age / sex / site known)")  # fmt: skip
    if chain.pool_lesions:
        ids = result.predictions["lesion_id"]
        print(lesion_pooling.describe(ids) if m["lesion_pooling"]["applied"] else
              "lesion pooling: no two images share a lesion id")  # fmt: skip
    point = chain.operating_point
    if point is not None:
        fitted_here = point["fitted_on"] == m.get("split")
        print(f"operating point {operating_point.describe(point)}" + (f" (set on these {point['fitted_on']} images: "
              "its sensitivity here is in-sample)" if fitted_here else ""))  # fmt: skip
        if m["lesion_pooling"]["applied"]:
            print("note: the operating point was set on single images; pooled, its sensitivity is close to the target "
                  "rather than exactly on it")  # fmt: skip
        if point.get("metadata_prior") and chain.metadata_prior is None:
            print("note: the operating point was set with the metadata prior; without it its sensitivity is not kept")
        if tta and point.get("tta_views") not in (None, chain.tta_views):
            print(f"note: the operating point's TTA bias was set on {point['tta_views']} views, not "
                  f"{chain.tta_views}; its sensitivity with these is not kept")  # fmt: skip
    columns = {"images": m}
    if "with_tta" in m:
        columns["images+TTA"] = m["with_tta"]
    if "lesion_level" in m:
        columns["lesions"] = m["lesion_level"]
    for name, scored in (m.get("per_source") or {}).items():
        columns[name] = scored
    print(summary_table(columns))
    if m.get("clinical"):
        print("\n".join(per_class_lines(m["clinical"], list(chain.classes))))
    print_safeguards(m.get("safeguards"))
    extra = ", subgroups.csv, risk_coverage.csv" if result.subgroups is not None else ""
    print(f"wrote {Path(result.out_dir) / 'predictions.csv'}, metrics.json, classification_report.txt{extra}")


def print_safeguards(found: dict | None) -> None:
    """What the run's safeguards did on the scored images."""
    if not found:
        return
    if "conformal" in found:
        c = found["conformal"]
        print(f"conformal sets ({found['settings']['conformal']}): coverage {c['coverage']:.3f}, mean size "
              f"{c['mean_size']:.2f}")  # fmt: skip
    if "ood" in found:
        print(f"out of distribution: {found['ood']['refused']} image(s) refused ({found['ood']['rate']:.1%}; the "
              f"threshold was set to refuse {found['ood']['target_rate']:.0%} of in-distribution images)")  # fmt: skip
    rest = found["referred"]["accuracy_of_the_rest"]
    print(f"referred to a dermatologist: {found['referred']['images']} ({found['referred']['rate']:.1%}); accuracy "
          f"of the rest {'n/a' if rest is None else f'{rest:.3f}'}")  # fmt: skip
