"""Real-data ablation: train each recipe row on one fixed setting, score post-hoc variants, write its report.

    python benchmarks/ablation.py                       # every row not yet in the CSV, one at a time
    python benchmarks/ablation.py --rows reference,regularised
    python benchmarks/ablation.py --only-report         # regenerate outputs/ablation_report.md from the CSV
    python benchmarks/ablation.py --dry-run             # print the commands only
    python benchmarks/ablation.py --rescore             # score trained rows again from their cached logits
    python benchmarks/ablation.py --save-logits         # copy finished rows' logits to docs/ablation_logits/

Each row runs ``skinlesion train`` (resumed if its run folder is incomplete, skipped if complete), then
predicts val once through all 8 dihedral views of every image (logits cached in <run>/ablation_logits.npz)
and scores post-hoc variants without retraining: plain, flip TTA (4 views), dihedral TTA (8 views),
logit adjustment with tau = 1 fixed (Menon et al. 2021; not tuned on val), the metadata prior (age, sex,
site; fitted on the run's train rows), the operating point of --recipe improved and lesion pooling. Every
variant is scored by skinlesion's DecisionChain -- what ``skinlesion evaluate`` produces for the run with the
variant's steps stored -- with the temperature and the operating point fitted out of fold on val lesions
(ablation_scoring.py). Every metric gets the lesion-bootstrap 95 % interval of ``skinlesion evaluate``.
One CSV line per (row, variant), with ``scoring`` = "chain"; a row already in the CSV is skipped, so the
script resumes after an interruption. Lines without ``scoring`` were scored the old way (v1: softmax at
T = 1) and are reported apart until ``--rescore`` replaces them.

Run folders are not in git: ``--save-logits [DIR]`` copies each finished row's logits (float32, compressed,
with its metadata prior and run stats) to DIR (default docs/ablation_logits/), and rows whose run folder is
missing are scored from DIR/<row>.npz (``--logits-dir``); the metadata offsets then read the val images'
age, sex and site from ``--data-dir``.

Modules: ablation_rows.py (rows, variants, training commands), ablation_logits.py (cached and tracked logits),
ablation_scoring.py (the chain, out of fold), ablation_report.py (markdown).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling modules, also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import ablation_logits  # noqa: E402
import ablation_report  # noqa: E402
import ablation_scoring  # noqa: E402
from ablation_rows import DATA, REPO, ROWS, Row, display_command, ensure_split, finished, parse_variant, train  # noqa: E402

CSV = REPO / "docs" / "ablation.csv"
# The ablation's own long report (every row, every table). docs/results.md is the short page built from tracked
# files by scripts/results_tables.py; this one is not tracked (outputs/).
RESULTS = REPO / "outputs" / "ablation_report.md"
NOTES = Path(__file__).with_name("ablation_notes.md")  # hand-written findings, appended to results.md


# ------------------------------------------------------------------------------------------------ scoring
def row_data(row: Row, out: Path, logits_dir: Path | None, data_dir: Path | None, clinical: bool = True,
             cached_only: bool = False):  # fmt: skip
    """The row's logits (and, ``clinical``, metadata prior and val table): from its finished run folder (computed
    there unless ``cached_only``), else from its tracked copy; None when neither is there."""
    return ablation_logits.load(row.name, out, logits_dir, data_dir, finished(row, out), clinical, cached_only)


def score_row(row: Row, out: Path, n_boot: int, logits_dir: Path | None = None, data_dir: Path | None = None,
              old: pd.DataFrame | None = None) -> pd.DataFrame:  # fmt: skip
    """One CSV line per variant of ``row``, scored through the chain (``old``: the CSV, for the run stats of a
    row scored from a tracked copy that has none)."""
    data = row_data(row, out, logits_dir, data_dir)
    if data is None:
        raise FileNotFoundError(f"{row.name}: no finished run folder in {out} and no {row.name}.npz in {logits_dir}")
    stats = data.get("stats")
    if stats is None and old is not None and (old["row"] == row.name).any():
        stats = old[old["row"] == row.name].iloc[0][["epochs", "best_epoch", "wall_s", "train_img_s"]].to_dict()
    by_name = {r.name: r for r in ROWS}
    ref_row = by_name.get(row.reference)
    ref = row_data(ref_row, out, logits_dir, data_dir, clinical=False) if ref_row is not None else None
    ref_out = ablation_scoring.chain_outputs(ref, "plain") if ref is not None else None
    lines = []
    for v in row.variants:
        outputs = ablation_scoring.chain_outputs(data, v)
        line = {"row": row.name, "variant": v, **(stats or {}), "n_val": len(data["labels"]),
                **ablation_scoring.score_variant(data, v, n_boot, outputs)}  # fmt: skip
        if ref_out is not None:
            line.update(ablation_scoring.paired_deltas(outputs, ref_out, n_boot))
        lines.append(line)
    return pd.DataFrame(lines)


def read_csv(csv: Path) -> pd.DataFrame | None:
    return pd.read_csv(csv) if Path(csv).is_file() else None


def put_lines(frame: pd.DataFrame, csv: Path) -> None:
    """Write ``frame``'s lines to the CSV in place of that row's old lines (appended for a new row); lines from
    before the ``scoring`` column are marked "v1"."""
    from skinlesion import fileio

    old = read_csv(csv)
    if old is None:
        fileio.write_csv(csv, frame)
        return
    old = old.assign(scoring=ablation_report.scoring_of(old))
    rows = set(frame["row"])
    if (old["row"].isin(rows)).any():  # keep the row's place in the file
        first = int(np.flatnonzero(old["row"].isin(rows))[0])
        kept = old[~old["row"].isin(rows)]
        before, after = kept[kept.index < first], kept[kept.index > first]
        new = pd.concat([before, frame, after], ignore_index=True)
    else:
        new = pd.concat([old, frame], ignore_index=True)
    fileio.write_csv(csv, new)


# ------------------------------------------------------------------------------------------------ report
def write_report(csv: Path, out: Path, results: Path = RESULTS, logits_dir: Path | None = None,
                 data_dir: Path | None = None) -> Path:  # fmt: skip
    """The ablation report (outputs/ablation_report.md): the CSV's tables, plus (where a row's logits are cached or
    tracked; never computed here) the tau sweep and the winning chain line's confusion matrix, both through the
    chain; then the written findings."""
    from skinlesion import fileio
    from skinlesion.classes import CLASSES

    frame = pd.read_csv(csv)
    by_name = {r.name: r for r in ROWS}
    confusion = None
    best = ablation_report.winner(frame)
    if ablation_report.scoring_of(frame).loc[best.name] == ablation_report.CHAIN and best["row"] in by_name:
        meta = parse_variant(best["variant"]).meta
        data = row_data(by_name[best["row"]], out, logits_dir, data_dir, clinical=meta, cached_only=True)
        if data is not None:
            outputs = ablation_scoring.chain_outputs(data, best["variant"])
            confusion = ablation_report.confusion_markdown(outputs.y, outputs.labels, list(CLASSES))
    sweeps = {}
    for name in dict.fromkeys(frame["row"]):
        row = by_name.get(name)
        if row is not None and row.prior_correction:
            data = row_data(row, out, logits_dir, data_dir, clinical=False, cached_only=True)
            if data is not None:
                sweeps[name] = ablation_scoring.tau_sweep(data)
    notes = NOTES.read_text(encoding="utf-8") if NOTES.is_file() else None
    taus = ablation_report.tau_markdown(sweeps) if sweeps else None
    fileio.write_text(results, ablation_report.render(frame, confusion, taus=taus, notes=notes))
    print(f"wrote {results}")
    return results


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", help="comma-separated row names (default: all): " + ",".join(r.name for r in ROWS))
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "ablation", help="parent of the run folders")
    p.add_argument("--csv", type=Path, default=CSV)
    p.add_argument("--results", type=Path, default=RESULTS, help="the markdown report to write")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--only-report", action="store_true", help="regenerate the ablation report from the CSV")
    p.add_argument("--dry-run", action="store_true", help="print each row's command and stop")
    p.add_argument("--rescore", action="store_true",
                   help="score rows again through the chain and replace their CSV lines: rows whose run folder is "
                        "trained to the end, or that have no run folder and a tracked logits file")  # fmt: skip
    p.add_argument("--logits-dir", type=Path, default=ablation_logits.TRACKED,
                   help="tracked logits (<row>.npz) to score rows whose run folder is missing")  # fmt: skip
    p.add_argument("--save-logits", type=Path, nargs="?", const=ablation_logits.TRACKED, metavar="DIR",
                   help="copy finished rows' logits to DIR (default docs/ablation_logits) and stop")  # fmt: skip
    args = p.parse_args(argv)
    names = args.rows.split(",") if args.rows else [r.name for r in ROWS]
    unknown = set(names) - {r.name for r in ROWS}
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}")
    selected = [r for r in ROWS if r.name in names]
    if args.dry_run:
        for row in selected:
            print(f"{row.name}: {display_command(row)}")
        return
    if args.save_logits:
        for row in selected:
            if finished(row, args.out):
                print(f"[{row.name}] wrote {ablation_logits.save_tracked(args.out / row.name, args.save_logits)}")
            elif args.rows:
                print(f"[{row.name}] not trained to the end in {args.out}; no logits saved")
        return
    report = dict(results=args.results, logits_dir=args.logits_dir, data_dir=args.data_dir)
    if args.rescore:  # never starts or resumes training
        for row in selected:
            where = ablation_logits.available(row.name, args.out, args.logits_dir, finished(row, args.out))
            if where is None:
                continue
            t0 = time.perf_counter()
            frame = score_row(row, args.out, args.bootstrap, args.logits_dir, args.data_dir, read_csv(args.csv))
            put_lines(frame, args.csv)
            print(f"[{row.name}] re-scored from its {where} logits in {time.perf_counter() - t0:.0f} s", flush=True)
    elif not args.only_report:
        args.out.mkdir(parents=True, exist_ok=True)
        for row in selected:
            done = read_csv(args.csv)
            if done is not None and row.name in set(done["row"]):
                print(f"[{row.name}] already in {args.csv}; skipped")
                continue
            t0 = time.perf_counter()
            if ablation_logits.available(row.name, args.out, args.logits_dir, finished(row, args.out)) != "tracked":
                ensure_split(args.data_dir, args.out, row)
                train(row, args.data_dir, args.out)
            put_lines(score_row(row, args.out, args.bootstrap, args.logits_dir, args.data_dir, done), args.csv)
            print(f"[{row.name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
            write_report(args.csv, args.out, **report)
    write_report(args.csv, args.out, **report)


if __name__ == "__main__":
    main()
