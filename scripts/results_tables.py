"""The published real-data numbers, rendered from the tracked files that the measuring commands wrote: the generated
blocks of docs/results.md and README.md's results table. Nothing here trains or scores.

    python scripts/results_tables.py              # rewrite the blocks from the tracked files
    python scripts/results_tables.py --check      # exit 1 when a block differs from what the files give
    python scripts/results_tables.py --from-logits --data-dir ../shared/data/ham10000_200x150
        # (re)write docs/results_tau_sweep.csv and docs/results_confusion.csv from docs/ablation_logits/reference.npz
        # through benchmarks/ablation_scoring.py (the metadata prior needs the val images' age, sex and site)

Sources: docs/ablation.csv (`python benchmarks/ablation.py`: chain-scored lines only), docs/cv5_improved/*.json
(`skinlesion train --folds 5`, `skinlesion evaluate`, benchmarks/cv_ensemble.py, benchmarks/paired_runs.py),
docs/results_tau_sweep.csv and docs/results_confusion.csv (--from-logits), docs/measured/*.json (the benchmark that
wrote each one is named in its block).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_blocks  # noqa: E402
from doc_blocks import wrap  # noqa: E402

DOCS = doc_blocks.REPO / "docs"
CV = DOCS / "cv5_improved"
ABLATION = DOCS / "ablation.csv"
TAU_CSV = DOCS / "results_tau_sweep.csv"
CONFUSION_CSV = DOCS / "results_confusion.csv"
MEASURED = DOCS / "measured"  # one JSON per measuring command (benchmarks/preprocessing_shift.py --json, ...)
RESULTS = DOCS / "results.md"
README = doc_blocks.REPO / "README.md"
SHIPPED = "tta8+la+meta+op+pool"  # what `evaluate --tta` gives with every post-hoc step of --recipe improved
STEPS = {
    "tta4": "4 flips",
    "tta8": "8 views",
    "la": "prior correction",
    "meta": "metadata prior",
    "op": "mel operating point",
    "pool": "lesion pooling",
}
LABELS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "macro_auc": "macro AUC",
    "log_loss": "log loss",
    "ece": "ECE",
    "mel_recall": "melanoma recall",
}


# ------------------------------------------------------------------------------------------ formatting
def ci(value: float, lo: float | None = None, hi: float | None = None) -> str:
    return f"{value:.3f}" if lo is None or pd.isna(lo) else f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def entry(e: dict[str, Any]) -> str:
    """metrics.json's {"value", "ci95"}."""
    return ci(e["value"], *e.get("ci95", (None, None)))


def signed(value: float, lo: float, hi: float) -> str:
    text = f"{value:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    return f"**{text}**" if lo > 0 or hi < 0 else text  # bold: the interval excludes 0


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"


def steps(variant: str) -> str:
    """ "tta8+la+meta" -> "8 views + prior correction + metadata prior"."""
    parts = [STEPS.get(p, p) for p in variant.split("+") if p != "plain"]
    return " + ".join(parts) if parts else "single crop"


def mel(metrics: dict[str, Any]) -> dict[str, Any]:
    return metrics["per_class"]["mel"]["recall"]


# ------------------------------------------------------------------------------------------ the 5-fold run
def cv5_test(metrics: dict[str, Any], host: str) -> str:
    """`skinlesion evaluate --tta` on the held-out part: single view and with TTA."""
    tta = metrics["with_tta"]
    rows = [
        [LABELS[k], entry(metrics[k]), entry(tta[k])]
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "log_loss")
    ]
    rows.append(["ECE", f"{metrics['ece']['value']:.3f}", f"{tta['ece']['value']:.3f}"])
    rows.append(["melanoma recall", entry(mel(metrics)), entry(mel(tta))])
    rows.append(["melanoma AUC", entry(metrics["per_class"]["mel"]["auc"]), entry(tta["per_class"]["mel"]["auc"])])
    views = metrics.get("tta_views", 8)
    return (
        wrap(
            f"{metrics['n_images']:,} held-out images ({metrics['n_lesions']:,} lesions), 95 % lesion-bootstrap "
            f"intervals; measured on {host}."
        )
        + "\n\n"
        + table(["metric", "single view", f"{views}-view TTA (`--tta`)"], rows)
    )


def cv5_vs_folds(ens: dict[str, Any]) -> str:
    """benchmarks/cv_ensemble.py --tta: the ensemble against the mean single fold on the same images."""
    rows = []
    for key, r in ens["rows"].items():
        rows.append(
            [
                LABELS.get(key, key),
                f"{r['ensemble']:.3f}",
                f"{r['fold_mean']:.3f} ± {r['fold_sd']:.3f}",
                signed(r["diff"], *r["diff_ci95"]),
            ]
        )
    return (
        wrap(
            f"{ens['n_test']:,} held-out images, {ens['n_views']} views; difference = ensemble − mean fold, "
            f"95 % interval over 1,000 paired lesion resamples; measured on {host_text(ens['host'])}."
        )
        + "\n\n"
        + table(["metric", "ensemble", "single fold: mean ± sd", "difference [95 %]"], rows)
    )


def cv5_folds(cv: dict[str, Any]) -> str:
    """cv.json: each fold's val through the ensemble's chain, and the pooled out-of-fold predictions."""
    oof = cv["out_of_fold"]
    rows = []
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "log_loss", "ece", "mel_recall"):
        pooled = mel(oof) if key == "mel_recall" else oof[key]
        rows.append([LABELS[key], f"{cv['mean'][key]:.3f} ± {cv['sd'][key]:.3f}", entry(pooled)])
    return (
        wrap(f"{cv['folds']} folds, {oof['n_images']:,} out-of-fold images ({oof['n_lesions']:,} lesions).")
        + "\n\n"
        + table(["metric", "folds: mean ± sd", "pooled out of fold [95 %]"], rows)
    )


def lite1_vs_lite0(pair: dict[str, Any]) -> str:
    """benchmarks/paired_runs.py: one candidate run against one reference run on the same images."""
    rows = [
        [LABELS.get(k, k), f"{r['reference_mean']:.3f}", f"{r['candidate']:.3f}", signed(r["diff"], *r["diff_ci95"])]
        for k, r in pair["rows"].items()
    ]
    return (
        wrap(
            f"{pair['n_images']:,} held-out images, {'TTA' if pair['tta'] else 'single view'}; 95 % interval "
            f"over 1,000 paired lesion resamples; measured on {host_text(pair['host'])}."
        )
        + "\n\n"
        + table(["metric", "Lite0", "Lite1", "Lite1 − Lite0 [95 %]"], rows)
    )


# ------------------------------------------------------------------------------------------ the ablation (chain)
def chain_lines(frame: pd.DataFrame) -> pd.DataFrame:
    scoring = frame["scoring"] if "scoring" in frame else pd.Series("", index=frame.index)
    return frame[scoring.fillna("") == "chain"]


def line_ci(line: pd.Series, name: str) -> str:
    return ci(line[name], line.get(f"{name}_lo"), line.get(f"{name}_hi"))


def chain_table(frame: pd.DataFrame) -> str:
    names = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")
    rows = [
        [
            f"`{r['variant']}`",
            steps(r["variant"]),
            *(line_ci(r, m) for m in names),
            f"{r['ece_after']:.3f}",
            line_ci(r, "mel_recall"),
        ]
        for _, r in frame.iterrows()
    ]
    return table(
        ["line", "post-hoc steps", "accuracy", "balanced acc.", "macro F1", "macro AUC", "ECE cal.", "melanoma recall"],
        rows,
    )


def delta_table(frame: pd.DataFrame) -> str:
    names = ("balanced_accuracy", "macro_f1", "macro_auc", "mel_recall")
    rows = [
        [f"`{r['variant']}`", *(signed(r[f"d_{m}"], r[f"d_{m}_lo"], r[f"d_{m}_hi"]) for m in names)]
        for _, r in frame.iterrows()
        if r["variant"] != "plain"
    ]
    return table(["line", "Δ balanced acc.", "Δ macro F1", "Δ macro AUC", "Δ melanoma recall"], rows)


def tau_table(sweep: pd.DataFrame) -> str:
    rows = [
        [f"{r['tau']:g}", f"{r['balanced_accuracy']:.3f}", f"{r['macro_f1']:.3f}", f"{r['mel_recall']:.3f}"]
        for _, r in sweep.iterrows()
    ]
    return table(["tau", "balanced accuracy", "macro F1", "melanoma recall"], rows)


def confusion_table(cm: pd.DataFrame) -> str:
    classes = list(cm.columns[1:])
    rows = []
    for _, r in cm.iterrows():
        counts = [int(r[c]) for c in classes]
        rows.append([f"**{r['true']}**", *map(str, counts), f"{counts[classes.index(r['true'])] / sum(counts):.2f}"])
    return table(["true \\ predicted", *classes, "recall"], rows)


# ------------------------------------------------------------------------------------------ README
def readme_table(metrics: dict[str, Any], chain: pd.DataFrame, host: str) -> str:
    tta = metrics["with_tta"]
    rows = [
        [
            "`improved`, 5-fold ensemble, `evaluate --tta`",
            "held-out test",
            *(entry(tta[k]) for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")),
            f"{tta['ece']['value']:.3f}",
            entry(mel(tta)),
        ]
    ]
    for variant, what in (
        ("plain", "`reference`, one run, single crop"),
        (SHIPPED, "`reference`, one run, `improved`'s post-hoc steps"),
    ):
        line = chain[chain["variant"] == variant].iloc[0]
        rows.append(
            [
                what,
                "val",
                *(line_ci(line, m) for m in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")),
                f"{line['ece_after']:.3f}",
                line_ci(line, "mel_recall"),
            ]
        )
    head = ["model", "images", "accuracy", "balanced acc.", "macro F1", "macro AUC", "ECE", "melanoma recall"]
    intro = (
        "*Generated by [scripts/results_tables.py](scripts/results_tables.py) from the files the measuring commands "
        "wrote ([docs/results.md](docs/results.md) names the command behind each).* All 10,015 HAM10000 images as "
        "**200×150 downsized** copies, 128 px input, ImageNet EfficientNet-Lite0, 8 epochs, on a 2-core CPU without "
        f"a GPU (the 5-fold run: {host}); {metrics['n_images']:,} images of one lesion-grouped split (seed 42), "
        "95 % lesion-bootstrap intervals. **Cite the first row**: no fold trained on those images, picked an epoch "
        "with them or fitted anything on them; the `reference` rows picked their epoch on them."
    )
    outro = (
        "`improved`'s post-hoc steps: 8-view TTA, prior correction, metadata prior, a 75 % melanoma operating "
        "point (fitted out of fold), lesion pooling. Full-size images with EfficientNet-B0 at 224 px, 20+ epochs and "
        "a GPU are *expected* (from the literature, not measured here) to reach about 0.85–0.90 accuracy and "
        "0.75–0.85 balanced accuracy on lesion-grouped splits. Every table, and the command behind it: "
        "[docs/results.md](docs/results.md)."
    )
    return wrap(intro) + "\n\n" + table(head, rows) + "\n" + wrap(outro) + "\n"


def paired(row: dict[str, Any]) -> str:
    """A paired difference with its interval (bold when it excludes 0)."""
    return signed(row["diff"], *row["diff_ci95"])


def preprocessing_shift(shift: dict[str, Any]) -> str:
    """benchmarks/preprocessing_shift.py --json: one preprocessing vs the old cache's PIL resize, same network."""
    rows = shift["rows"]
    return wrap(
        f"Measured on `{shift['run']}` ({shift['n_images']:,} val images, {shift['views']}; "
        f"{host_text(shift['host'])}): max |Δp| {shift['max_abs_dp']:.3f}, {shift['decisions_differ']} of "
        f"{shift['n_images']:,} decisions differ; one preprocessing minus the old cache, paired lesion bootstrap "
        f"({shift['bootstrap']:,} resamples): balanced accuracy {paired(rows['balanced_accuracy'])}, macro AUC "
        f"{paired(rows['macro_auc'])}, melanoma recall {paired(rows['mel_recall'])}."
    ) + "\n"


def colour_constancy(val: dict[str, Any], external: dict[str, Any]) -> str:
    """benchmarks/paired_runs.py (HAM val) and paired_external.py (ISIC 2020): Shades of Gray minus none."""
    head = ["scored on", "metric", "`--color-constancy none`", "`shades-of-gray`", "difference [paired 95 %]"]
    rows = [[f"HAM10000 val ({val['n_images']:,}, TTA)", LABELS[k], f"{r['reference_mean']:.3f}",
             f"{r['candidate']:.3f}", paired(r)] for k, r in val["rows"].items()
            if k in ("balanced_accuracy", "macro_auc", "mel_recall")]  # fmt: skip
    names = {"auc": "melanoma AUC", "auc_80": "melanoma partial AUC (sens ≥ 0.8)"}
    where = f"ISIC 2020 subset ({external['n_images']:,}, {external['n_positive']} melanomas)"
    rows += [[where, names[k], f"{r['reference']:.3f}", f"{r['candidate']:.3f}", paired(r)]
             for k, r in external["rows"].items()]  # fmt: skip
    return table(head, rows) + "\n" + wrap(f"Host: {host_text(val['host'])}; {external['bootstrap']:,} paired "
                                            "resamples of lesions (HAM) or patients (ISIC 2020).") + "\n"  # fmt: skip


def interval(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    lo_hi = entry.get("ci95")
    return f"{entry['value']:.3f}" + (f" [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi and lo_hi[0] is not None else "")


def clinical_table(metrics: dict[str, Any]) -> str:
    """evaluate's metrics.json `clinical`: per class sensitivity ... average precision, with intervals."""
    keys = ("sensitivity", "specificity", "ppv", "npv", "auc", "auc_80", "average_precision")
    head = ["class", "n", *("pAUC (sens ≥ 0.8)" if k == "auc_80" else k.replace("_", " ") for k in keys)]
    per_class = metrics["clinical"]["per_class"]
    rows = [[c, str(v["positives"]), *(interval(v.get(k)) for k in keys)] for c, v in per_class.items()]
    mel = metrics["clinical"].get("melanoma") or {}
    at = lambda kind: ", ".join(f"{lvl}: {interval(e)}" for lvl, e in (mel.get(kind) or {}).items())  # noqa: E731
    text = (f"Melanoma sensitivity at specificity {at('sensitivity_at_specificity')}; specificity at sensitivity "
            f"{at('specificity_at_sensitivity')}.")  # fmt: skip
    return table(head, rows) + "\n" + wrap(text) + "\n"


def safeguards_text(metrics: dict[str, Any], external: dict[str, Any]) -> str:
    """What the fitted safeguards did on HAM val (in-sample: they were fitted there), and the run's melanoma
    ranking on ISIC 2020 (evaluate's melanoma-vs-rest task; its refusals are in the OOD table)."""
    lines = []
    for where, m in (("HAM10000 val", metrics),):
        g = m.get("safeguards") or {}
        parts = []
        if "conformal" in g:
            parts.append(f"conformal sets cover the true class for {g['conformal']['coverage']:.3f} of images "
                         f"(mean size {g['conformal']['mean_size']:.2f})")  # fmt: skip
        if "referred" in g:
            rest = g["referred"]["accuracy_of_the_rest"]
            parts.append(f"{g['referred']['rate']:.1%} referred" + (f", accuracy of the rest {rest:.3f}" if rest
                                                                     is not None else ""))  # fmt: skip
        if "ood" in g:
            ood = g["ood"]
            parts.append(f"{ood['rate']:.1%} refused as out of distribution (target {ood['target_rate']:.0%})")
        lines.append(f"- **{where}** ({m['n_images']:,} images): " + "; ".join(parts) + ".")
    single, tta = external["melanoma"], (external.get("with_tta") or {}).get("melanoma") or {}
    lines.append(f"- **ISIC 2020 subset** ({external['n_images']:,} images, {external['n_melanomas']} melanomas, "
                 f"{external['n_groups']} patients): melanoma AUC {interval(single['auc'])} single view, "
                 f"{interval(tta.get('auc'))} TTA; sensitivity of the decision {interval(single['sensitivity'])} at "
                 f"specificity {interval(single['specificity'])}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def ood_table(check: dict[str, Any]) -> str:
    """benchmarks/ood_check.py --json: per detector, AUROC of held-out val vs non-dermoscopy pictures and the share
    of each kind of image its threshold (fitted to refuse 5 % of the other val half) refuses."""
    head = ["detector", "AUROC (val vs non-dermoscopy)", "val refused", "non-dermoscopy refused",
            "ISIC 2020 refused"]  # fmt: skip
    rows = [[f"`{r['detector']}`", f"{r['auroc']:.3f}", f"{r['val_refused']:.1%}", f"{r['non_dermoscopy_refused']:.1%}",
             f"{r['other_source_refused']:.1%}" if "other_source_refused" in r else "–"] for r in check["rows"]]
    return table(head, rows) + "\n" + wrap(f"{len(check['ood_images'])} non-dermoscopy pictures available offline "
                                            "(data/ood_images.py).") + "\n"  # fmt: skip


# ------------------------------------------------------------------------------------------ all blocks
def host_text(raw: str) -> str:
    """benchmarks' "node: CPU model, avx512_bf16 yes|no" as words."""
    cpu, _, bf16 = raw.split(": ", 1)[-1].rpartition(", avx512_bf16 ")
    return f"an {cpu} with avx512_bf16" if bf16 == "yes" else f"an {cpu or raw} without avx512_bf16"


def host_of(path: Path) -> str:
    return host_text(json.loads(path.read_text(encoding="utf-8"))["host"])


def results_blocks() -> dict[str, str]:
    read = lambda name: json.loads((CV / name).read_text(encoding="utf-8"))  # noqa: E731
    chain = chain_lines(pd.read_csv(ABLATION))
    host = host_of(CV / "cv_ensemble_test.json")
    return {
        "results-cv5-test": cv5_test(read("metrics.json"), host),
        "results-cv5-ensemble": cv5_vs_folds(read("cv_ensemble_test.json")),
        "results-cv5-folds": cv5_folds(read("cv.json")),
        "results-lite1": lite1_vs_lite0(read("lite1_vs_lite0_test.json")),
        "results-chain": chain_table(chain),
        "results-chain-deltas": delta_table(chain),
        "results-tau": tau_table(pd.read_csv(TAU_CSV)),
        "results-confusion": confusion_table(pd.read_csv(CONFUSION_CSV)),
        "preprocessing-shift": preprocessing_shift(measured("preprocessing_shift.json")),
        "colour-constancy": colour_constancy(measured("colour_constancy_ham_val.json"),
                                             measured("colour_constancy_isic2020.json")),  # fmt: skip
        "clinical-val": clinical_table(measured("clinical_val_metrics.json")),
        "safeguards": safeguards_text(measured("clinical_val_metrics.json"),
                                      measured("clinical_isic2020_metrics.json")),  # fmt: skip
        "ood-check": ood_table(measured("ood_check.json")),
    }


def measured(name: str) -> dict[str, Any]:
    """A JSON a measuring command wrote into docs/measured/ (each block names its command)."""
    return json.loads((MEASURED / name).read_text(encoding="utf-8"))


def readme_blocks() -> dict[str, str]:
    metrics = json.loads((CV / "metrics.json").read_text(encoding="utf-8"))
    chain = chain_lines(pd.read_csv(ABLATION))
    return {"results-table": readme_table(metrics, chain, host_of(CV / "cv_ensemble_test.json"))}


# ------------------------------------------------------------------------------------------ from the logits
def write_logit_tables(logits: Path, data_dir: Path) -> None:
    """The tau sweep and the shipped line's confusion matrix of the tracked reference logits, through the chain."""
    from sklearn.metrics import confusion_matrix

    sys.path.insert(0, str(doc_blocks.REPO / "benchmarks"))
    import ablation_logits
    import ablation_scoring

    from skinlesion.classes import CLASSES

    plain = ablation_logits.from_tracked(logits, None, clinical=False)
    sweep = ablation_scoring.tau_sweep(plain)
    pd.DataFrame(
        [{"tau": t, "balanced_accuracy": b, "macro_f1": f, "mel_recall": m} for t, (b, f, m) in sweep.items()]
    ).to_csv(TAU_CSV, index=False)
    data = ablation_logits.from_tracked(logits, data_dir, clinical=True)
    out = ablation_scoring.chain_outputs(data, SHIPPED)
    cm = confusion_matrix(out.y, out.labels, labels=list(range(len(CLASSES))))
    frame = pd.DataFrame(cm, columns=list(CLASSES))
    frame.insert(0, "true", list(CLASSES))
    frame.to_csv(CONFUSION_CSV, index=False)
    print(f"wrote {TAU_CSV} and {CONFUSION_CSV}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 when a generated block is out of date")
    p.add_argument(
        "--from-logits",
        type=Path,
        nargs="?",
        const=DOCS / "ablation_logits" / "reference.npz",
        metavar="NPZ",
        help="first rewrite the tau-sweep and confusion CSVs from these tracked logits",
    )
    p.add_argument("--data-dir", type=Path, help="with --from-logits: the HAM10000 folder (metadata prior)")
    args = p.parse_args(argv)
    if args.from_logits:
        if args.data_dir is None:
            p.error("--from-logits needs --data-dir (the val images' age, sex and site)")
        write_logit_tables(args.from_logits, args.data_dir)
    pages = {RESULTS: results_blocks(), README: readme_blocks()}
    if args.check:
        stale = {path: doc_blocks.stale(path, blocks) for path, blocks in pages.items()}
        for path, names in stale.items():
            for name in names:
                where = path.relative_to(doc_blocks.REPO)
                print(f"{where}: block {name} is out of date; run scripts/results_tables.py")
        return 1 if any(stale.values()) else 0
    for path, blocks in pages.items():
        if doc_blocks.fill_file(path, blocks):
            print(f"updated {path.relative_to(doc_blocks.REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
