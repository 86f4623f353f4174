"""benchmarks/ablation*.py without training: variants scored through the decision chain (out of fold), the chain
built from a run's stored settings against `skinlesion evaluate`, tracked logits, CSV -> docs/results.md."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import ablation  # noqa: E402
import ablation_logits  # noqa: E402
import ablation_report as report  # noqa: E402
import ablation_rows as rows  # noqa: E402
import ablation_scoring as scoring  # noqa: E402

from skinlesion import metrics  # noqa: E402
from skinlesion.classes import CLASS_INDEX, CLASSES  # noqa: E402
from skinlesion.data.split import lesion_folds  # noqa: E402
from skinlesion.decision import lesion_pooling, operating_point  # noqa: E402
from skinlesion.decision.chain import softmax  # noqa: E402
from skinlesion.decision.temperature import fit_temperature  # noqa: E402
from skinlesion.model.logit_adjustment import offset  # noqa: E402

SHIPPED_VARIANT = "tta8+la+meta+op+pool"


def line(row: str, variant: str, bal: float, f1: float, auc: float, ece_after: float, mel: float, **extra) -> dict:
    values = {"accuracy": 0.8, "balanced_accuracy": bal, "macro_f1": f1, "macro_auc": auc, "ece_before": 0.08,
              "ece_after": ece_after, "mel_recall": mel, "mel_auc": 0.9}  # fmt: skip
    out = {
        "row": row,
        "variant": variant,
        "epochs": 8,
        "best_epoch": 7,
        "wall_s": 900.0,
        "train_img_s": 88.0,
        "n_val": 2004,
        **extra,
    }
    for k, v in values.items():
        out.update({k: v, f"{k}_lo": v - 0.03, f"{k}_hi": v + 0.03})
    return out


def synthetic(n: int = 600, per_lesion: int = 2, seed: int = 0, nv_shift: float = 1.0) -> dict:
    """Val logits (8 views) of a model that under-calls melanoma, with lesion ids and train counts."""
    rng = np.random.default_rng(seed)
    y = rng.choice(7, n // per_lesion, p=[0.04, 0.05, 0.11, 0.02, 0.12, 0.62, 0.04]).repeat(per_lesion)
    scale = rng.uniform(0.5, 3.0, size=(1, n, 1))  # over- and under-confident images
    views = scale * (rng.normal(size=(1, n, 7)) + 1.5 * np.eye(7)[y][None]) + 0.3 * rng.normal(size=(8, n, 7))
    views[..., CLASS_INDEX["nv"]] += nv_shift
    return {
        "views": views.astype(np.float32),
        "labels": y,
        "lesions": np.array([f"L{i // per_lesion}" for i in range(n)]),
        "counts": np.bincount(y, minlength=7).astype(float) + 1.0,
    }


# ------------------------------------------------------------------------------------------ rows and variants
def test_variant_names_parse_to_views_tau_and_metadata():
    assert rows.parse_variant("plain") == ("plain", 0.0, False, False, False)
    assert rows.parse_variant("la") == ("plain", 1.0, False, False, False)
    assert rows.parse_variant("tta4+la") == ("tta4", 1.0, False, False, False)
    assert rows.parse_variant("tta8+la0.5") == ("tta8", 0.5, False, False, False)
    assert rows.parse_variant("tta8+la+meta") == ("tta8", 1.0, True, False, False)
    assert rows.parse_variant("tta8+meta") == ("tta8", 0.0, True, False, False)
    assert rows.parse_variant("tta8+la+meta+op") == ("tta8", 1.0, True, True, False)
    assert rows.parse_variant("tta8+op").op and not rows.parse_variant("tta8+op").meta
    assert rows.parse_variant(SHIPPED_VARIANT) == ("tta8", 1.0, True, True, True)
    assert rows.variant_note("tta8+op+pool").endswith("+ operating point mel=0.75 + lesion pooling")
    assert rows.variant_note("tta8+la0.5") == "8-view TTA + logit adjustment tau=0.5"
    assert rows.variant_note("tta8+la+meta") == "8-view TTA + logit adjustment tau=1 + metadata prior"
    assert rows.variant_note("tta8+la+meta+op").endswith("+ metadata prior + operating point mel=0.75")
    for bad in ("tta16", "tta8+meta+la", "tta8+tta4", "meta", "op", "tta8+op+meta", "pool", "tta8+pool+op"):
        with pytest.raises(ValueError, match="unknown variant"):
            rows.parse_variant(bad)


def test_rows_are_distinct_and_prior_correction_is_off_for_rebalanced_training():
    names = [r.name for r in rows.ROWS]
    assert len(names) == len(set(names)) and names[0] == "reference"
    for row in rows.ROWS:
        balanced = "--sampler" in row.flags and row.flags[row.flags.index("--sampler") + 1] == "balanced"
        balanced |= "--class-weights" in row.flags  # a re-weighted loss also targets a flatter prior
        assert not (balanced and (row.prior_correction or any(rows.parse_variant(v)[1] for v in row.variants)))


def test_a_row_flag_replaces_the_fixed_one_instead_of_repeating_it():
    row = rows.Row("px", ["--recipe", "reference", "--img-size", "160"], "160 px")
    cmd = rows.train_command(row, Path("data"), Path("out"))
    assert cmd.count("--img-size") == 1 and cmd[cmd.index("--img-size") + 1] == "160"
    assert cmd[cmd.index("--epochs") + 1] == "8"  # the rest of the fixed setting stays


def test_a_longer_row_counts_as_finished_only_after_its_own_epochs(tmp_path, monkeypatch):
    """A 16-epoch row stopped after 8 must be resumed, not scored as if the fixed 8 epochs were its end."""
    long = rows.Row("long", ["--recipe", "improved", "--epochs", "16"], "16 epochs")
    short = rows.Row("short", ["--recipe", "improved"], "fixed setting")
    assert (long.epochs, short.epochs) == (16, 8)
    for row in (long, short):
        (tmp_path / row.name).mkdir()
        pd.DataFrame({"epoch": range(1, 9)}).to_csv(tmp_path / row.name / "history.csv", index=False)
        (tmp_path / row.name / "best.pt").write_bytes(b"")
    runs = []
    monkeypatch.setattr(rows.subprocess, "run", lambda cmd, **kw: runs.append(cmd))
    for row in (long, short):
        rows.train(row, Path("data"), tmp_path)
    assert len(runs) == 1 and "long" in runs[0] and "--epochs" in runs[0]
    assert rows.finished(short, tmp_path) and not rows.finished(long, tmp_path)


def test_rows_on_another_split_train_on_it_and_pair_with_its_reference():
    by_name = {r.name: r for r in rows.ROWS}
    improved, reference = by_name["improved_split7"], by_name["reference_split7"]
    assert (improved.reference, reference.reference, by_name["improved"].reference) == (
        "reference_split7", "reference_split7", "reference")  # fmt: skip
    cmd = rows.train_command(improved, Path("data"), Path("out"))
    assert cmd[cmd.index("--splits") + 1] == str(Path("out") / "splits_seed7.csv")
    assert rows.train_command(by_name["improved"], Path("d"), Path("o"))[5] == str(Path("o") / "splits.csv")
    frame = pd.DataFrame(
        [
            {**line("reference_split7", "plain", 0.6, 0.6, 0.95, 0.03, 0.5), **dict.fromkeys(DELTA_KEYS, 0.0)},
            {**line("improved_split7", "tta8", 0.7, 0.7, 0.96, 0.03, 0.6), **dict.fromkeys(DELTA_KEYS, 0.1)},
        ]
    )
    table = report.delta_table(frame).splitlines()
    assert len(table) == 3 and table[2].startswith("| improved_split7 | mean logit over the 8 dihedral views |")


def test_the_operating_point_is_the_recipes():
    from skinlesion.training.recipes import IMPROVED

    assert rows.OPERATING_POINT == IMPROVED.min_sensitivity


# ------------------------------------------------------------------------------------------ scoring (chain)
def test_network_views_are_the_first_views_plus_the_logit_adjustment():
    data = synthetic(n=40)
    views = data["views"].astype(np.float64)
    np.testing.assert_allclose(scoring.network_views(data, "plain"), views[:1])
    np.testing.assert_allclose(scoring.network_views(data, "tta4+meta"), views[:4])
    np.testing.assert_allclose(scoring.network_views(data, "la"), views[:1] + offset(data["counts"]))
    half = views + offset(data["counts"], 0.5)
    np.testing.assert_allclose(scoring.network_views(data, "tta8+la0.5+op"), half)
    # A cache of a run with the adjustment in best.pt's bias: the stored offset is taken out first.
    stored = offset(data["counts"])
    adjusted = {**data, "views": (views + stored).astype(np.float32), "stored_offset": stored}
    np.testing.assert_allclose(scoring.network_views(adjusted, "tta8"), views, atol=1e-5)
    np.testing.assert_allclose(scoring.network_views(adjusted, "tta8+la"), views + stored, atol=1e-5)
    with pytest.raises(ValueError, match="needs 8 views"):
        scoring.network_views({**data, "views": data["views"][:4]}, "tta8")


def test_variant_chain_keeps_only_the_steps_the_variant_names():
    prior_like = None  # a chain without a prior: the variant switch is what is checked
    point = {"classes": list(CLASSES), "bias": [0, 0, 0, 0, 1.0, 0, 0], "bias_tta": [0, 0, 0, 0, 0.5, 0, 0]}
    meta = {"classes": list(CLASSES), "temperature": 1.3, "operating_point": point, "metadata_prior": prior_like,
            "config": {"tta_views": 4, "pool_lesions": True}}  # fmt: skip
    plain = scoring.variant_chain("plain", meta)
    assert plain.temperature == 1.3 and plain.operating_point is None and not plain.pool_lesions
    full = scoring.variant_chain("tta8+op+pool", meta, temperature=2.0)
    assert (full.temperature, full.tta_views, full.pool_lesions) == (2.0, 8, True)
    assert full.operating_point == point


def test_ece_before_is_at_temperature_one_and_the_temperature_is_fitted_out_of_fold():
    data = synthetic(n=600, seed=1)
    y, lesions = data["labels"], data["lesions"]
    out = scoring.chain_outputs(data, "tta8")
    scored = scoring.score_variant(data, "tta8", n_boot=0, outputs=out)
    assert scored["scoring"] == "chain"
    z = data["views"].astype(np.float64).mean(0)
    fold = lesion_folds(y, lesions, 2, seed=0)
    expected = np.empty_like(z)
    for f in range(2):  # T fitted on the other fold's single-view logits, applied to the 8-view mean of this one
        t = fit_temperature(data["views"][0][fold != f].astype(np.float64), y[fold != f])
        assert out.temperatures[f] == pytest.approx(t)
        expected[fold == f] = softmax(z[fold == f] / t)
    assert abs(out.temperatures[0] - out.temperatures[1]) > 1e-3  # one T per fold, not one for all of val
    assert all(abs(t - 1) > 0.05 for t in out.temperatures)
    in_sample = fit_temperature(data["views"][0].astype(np.float64), y)
    assert all(abs(t - in_sample) > 1e-4 for t in out.temperatures)
    np.testing.assert_allclose(out.probabilities, expected, atol=1e-9)
    assert scored["ece_after"] == pytest.approx(metrics.ece(y, expected))
    assert scored["ece_before"] == pytest.approx(metrics.ece(y, softmax(z)))  # T = 1
    assert scored["ece_before"] != pytest.approx(scored["ece_after"], abs=1e-3)
    assert scored["temperature"] == pytest.approx(np.mean(out.temperatures))
    assert (scored["temperature_fold0"], scored["temperature_fold1"]) == out.temperatures


def test_operating_point_variant_is_set_out_of_fold_through_the_chain_and_moves_decisions_only():
    """"+op": the recipe's melanoma operating point, set on one half of the val lesions (through the chain with
    that half's temperature, as `skinlesion operating-point` sets it) and scored on the other."""
    data = synthetic(n=800, seed=5)
    y, mel = data["labels"], CLASS_INDEX["mel"]
    plain, op = scoring.chain_outputs(data, "tta8"), scoring.chain_outputs(data, "tta8+op")
    assert plain.points == (None, None)
    np.testing.assert_array_equal(plain.labels, plain.probabilities.argmax(1))
    z = data["views"].astype(np.float64)
    fold = lesion_folds(y, data["lesions"], 2, seed=0)
    for f in range(2):
        fit, held = fold != f, fold == f
        t = op.temperatures[f]
        single = operating_point.fit(z[0][fit] / t, y[fit], CLASSES, {"mel": 0.75})
        tta = operating_point.fit(z.mean(0)[fit] / t, y[fit], CLASSES, {"mel": 0.75})
        np.testing.assert_allclose(op.points[f]["bias"], single)
        np.testing.assert_allclose(op.points[f]["bias_tta"], tta)  # 8 views: the TTA bias decides
        assert tta[mel] > 0 and not np.allclose(single, tta)
        np.testing.assert_array_equal(op.labels[held], operating_point.decide(softmax(z.mean(0)[held] / t), tta))
    np.testing.assert_allclose(op.probabilities, plain.probabilities)  # it moves decisions only
    a, b = (scoring.score_variant(data, v, n_boot=20, outputs=o) for v, o in (("tta8", plain), ("tta8+op", op)))
    assert b["mel_recall"] > a["mel_recall"] and b["mel_recall"] > 0.6
    for key in ("macro_auc", "ece_before", "ece_after", "mel_auc"):
        assert a[key] == b[key]


def test_pooled_variant_pools_the_chains_probabilities_with_per_image_temperature_and_bias():
    """"+pool": each image scored with its lesion's pooled probabilities; the temperature and the operating
    point's bias are still set on single images, as `calibrate` and `operating-point` set them."""
    data = synthetic(n=900, per_lesion=3, seed=6)
    y, lesions = data["labels"], data["lesions"]
    single, pooled = scoring.chain_outputs(data, "tta8+op"), scoring.chain_outputs(data, "tta8+op+pool")
    assert single.temperatures == pooled.temperatures
    z = data["views"].astype(np.float64).mean(0)
    fold = lesion_folds(y, lesions, 2, seed=0)
    for f in range(2):
        held = fold == f
        p = lesion_pooling.pool(softmax(z[held] / pooled.temperatures[f]), lesions[held])
        np.testing.assert_allclose(pooled.probabilities[held], p, atol=1e-12)
        assert pooled.points[f]["bias_tta"] == single.points[f]["bias_tta"]
        bias = np.asarray(pooled.points[f]["bias_tta"])
        np.testing.assert_array_equal(pooled.labels[held], operating_point.decide(p, bias))
    np.testing.assert_allclose(pooled.uncalibrated, lesion_pooling.pool(softmax(z), lesions), atol=1e-12)
    a, b = (scoring.score_variant(data, v, n_boot=0, outputs=o) for v, o in (("x", single), ("y", pooled)))
    assert b["balanced_accuracy"] > a["balanced_accuracy"] + 0.02  # three noisy images know a lesion better


def test_paired_deltas_are_zero_against_itself_and_see_a_real_gain():
    data = synthetic(n=400, seed=1)
    ref = scoring.chain_outputs(data, "plain")
    same = scoring.paired_deltas(ref, ref, n_boot=200)
    assert all(v == 0 for v in same.values())
    rng = np.random.default_rng(1)
    better = {**data, "views": data["views"] + 3 * np.eye(7)[data["labels"]][None] * rng.uniform(1, 2)}
    d = scoring.paired_deltas(scoring.chain_outputs(better, "plain"), ref, n_boot=200)
    assert d["d_balanced_accuracy"] > 0.2 and d["d_balanced_accuracy_lo"] > 0
    frame = pd.DataFrame([{**line("regularised", "plain", 0.7, 0.7, 0.96, 0.03, 0.7), **d}])
    assert "| regularised | single centre crop | **+0." in report.delta_table(frame)
    other = {**data, "lesions": np.roll(data["lesions"], 1)}
    with pytest.raises(ValueError, match="different val images"):
        scoring.paired_deltas(scoring.chain_outputs(other, "plain"), ref, n_boot=10)


def test_tau_sweep_moves_decisions_towards_the_rare_classes():
    rng = np.random.default_rng(3)
    n = 700
    y = np.repeat(np.arange(7), 100)
    # A model that leans towards class 5 (nv) by its training prior: correcting the prior raises balanced accuracy.
    counts = np.array([30, 50, 110, 10, 110, 670, 15], dtype=float)
    logits = rng.normal(size=(n, 7)) + 2.0 * np.eye(7)[y] + np.log(counts / counts.sum())
    data = {"views": logits[None], "labels": y, "counts": counts, "lesions": np.array([f"L{i}" for i in range(n)])}
    sweep = scoring.tau_sweep(data, "plain")
    assert sweep[1.0][0] > sweep[0.0][0] + 0.1  # balanced accuracy
    from sklearn.metrics import balanced_accuracy_score

    pred = scoring.chain_outputs(data, "la0.5").labels  # the chain's decisions, as every line is scored
    assert sweep[0.5][0] == pytest.approx(balanced_accuracy_score(y, pred))
    text = report.tau_markdown({"reference": sweep})
    lines = text.splitlines()
    assert len(lines) == 3 and all(r.count("|") == len(scoring.TAUS) + 2 for r in lines) and "tau=0.5" in lines[0]
    assert lines[2].startswith(f"| reference | {sweep[0.0][0]:.3f} / ")


# ------------------------------------------------------------------------------------------ report
def test_targets_and_best_line():
    frame = pd.DataFrame(
        [
            line("reference", "plain", 0.60, 0.64, 0.950, 0.04, 0.48),
            line("reference", "la", 0.71, 0.66, 0.950, 0.06, 0.72),  # 3 targets met
            line("regularised", "la", 0.72, 0.70, 0.955, 0.03, 0.75),  # all 5 met
            line("regularised", "plain", 0.90, 0.60, 0.940, 0.03, 0.40),  # highest bal acc, 2 targets met
        ]
    )
    ref = report.reference_line(frame)
    met = report.targets(frame.iloc[1], ref)
    assert list(met.values()) == [True, False, True, False, True]
    assert all(report.targets(frame.iloc[2], ref).values())
    best = report.best_line(frame)
    assert (best["row"], best["variant"]) == ("regularised", "la")


def test_the_shipped_line_is_the_winner_when_present():
    frame = pd.DataFrame(
        [
            line("reference", "plain", 0.60, 0.64, 0.950, 0.04, 0.48),
            line(*rows.SHIPPED, 0.70, 0.62, 0.950, 0.04, 0.63),
            line("improved", "tta8", 0.90, 0.90, 0.990, 0.01, 0.95),
            line("regularised", "tta8", 0.90, 0.90, 0.990, 0.01, 0.95),
        ]
    )
    assert tuple(report.best_line(frame)[["row", "variant"]]) == rows.SHIPPED


def test_render_has_table_commands_targets_confusion_and_a_written_part():
    frame = pd.DataFrame(
        [
            line("reference", "plain", 0.60, 0.64, 0.950, 0.04, 0.48, scoring="chain"),
            line("regularised", "tta8", 0.72, 0.70, 0.96, 0.03, 0.75, scoring="chain"),
        ]
    )
    y = np.array([0, 0, 1, 4, 4, 5])
    pred = np.array([0, 1, 1, 4, 5, 5])
    confusion = report.confusion_markdown(y, pred, ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"])
    assert "| **mel** | 0 | 0 | 0 | 0 | 1 | 1 | 0 | 0.50 |" in confusion
    text = report.render(frame, confusion, notes="Written: the winner is good.\n")
    assert "200×150" in text and "2-core CPU" in text
    assert "| reference | single centre crop | 0.800 [0.770, 0.830] | 0.600 [0.570, 0.630] |" in text
    assert "mean logit over the 8 dihedral views" in text
    assert "| balanced accuracy >= ref + 0.10 | 0.600 [0.570, 0.630] | 0.720 [0.690, 0.750] | yes |" in text
    assert (
        "--run-name regularised" in text
        and "--head-lr-mult 10" in text
        and "--splits outputs/ablation/splits.csv" in text
    )
    assert "## Confusion matrix of the winning line (`regularised`, tta8" in text
    assert "| 7/8 | 15.0 | 88 |" in text
    assert "Old scoring" not in text and report.OLD_NOTE not in text  # no v1 line: no v1 section
    generated, written = text.split(report.FINDINGS)
    assert "Written: the winner is good." in written and "Written:" not in generated
    assert "| recipe |" not in written


def test_lines_without_chain_scoring_are_rendered_apart_and_labelled():
    chain = [line("reference", "plain", 0.60, 0.64, 0.950, 0.04, 0.48, scoring="chain"),
             line("improved", "tta8", 0.71, 0.70, 0.96, 0.03, 0.71, scoring="chain")]  # fmt: skip
    old = [line("improved_ls", "tta8", 0.99, 0.99, 0.99, 0.01, 0.99),  # no scoring column: v1
           line("improved_focal", "tta8", 0.98, 0.98, 0.99, 0.01, 0.99, scoring="v1")]  # fmt: skip
    frame = pd.DataFrame(chain + old)
    frame.loc[0, "scoring"] = "chain"
    frame.loc[2, "scoring"] = np.nan  # as read from a CSV line written before the column
    assert list(report.scoring_of(frame)) == ["chain", "chain", "v1", "v1"]
    text = report.render(frame, None)
    chain_part, old_part = text.split("## Old scoring (v1: softmax at T = 1)")
    assert "## Scored through the decision chain" in chain_part
    assert "| improved | " in chain_part
    assert "| improved_ls |" not in chain_part and "| improved_focal" not in chain_part
    old_part = old_part.split("## Commands")[0]
    assert "| improved_ls | " in old_part and "| improved_focal | " in old_part and "| improved | " not in old_part
    assert "not what `skinlesion evaluate` produces" in old_part
    # The winner (and its confusion matrix) is the chain part's, never a v1 line that scored higher.
    assert tuple(report.winner(frame)[["row", "variant"]]) == ("improved", "tta8")
    only_old = report.render(pd.DataFrame(old), None)
    assert "## Scored through the decision chain" not in only_old and "## Old scoring (v1" in only_old


def test_seed_table_averages_only_rows_that_differ_by_seed():
    shipped = rows.SHIPPED[1]
    frame = pd.DataFrame(
        [
            line("reference", "plain", 0.60, 0.64, 0.950, 0.04, 0.40),
            line("reference_seed1", "plain", 0.62, 0.66, 0.952, 0.02, 0.60),
            line("reference_la", "plain", 0.99, 0.99, 0.999, 0.01, 0.99),  # another recipe, not a seed
            line("improved", "tta8+la", 0.72, 0.67, 0.955, 0.02, 0.60),  # one seed: no spread to show
            line("improved_lr2e3", shipped, 0.70, 0.66, 0.950, 0.03, 0.50),  # seeded: shipped line
            line("improved_lr2e3_seed1", shipped, 0.74, 0.64, 0.954, 0.03, 0.70),
            line("improved_lr2e3_seed1", "tta8+la" if shipped != "tta8+la" else "tta4", 0, 0, 0, 0, 0),
            line("improved_lr2e3_seed1", "plain", 0.1, 0.1, 0.1, 0.1, 0.1),
        ]
    )
    lines = report.seed_table(frame).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| reference | single centre crop | 2 | 0.610 ± 0.014 | 0.650 ± ")
    assert "0.500 ± 0.141" in lines[2]  # melanoma recall of 0.40 and 0.60
    note = rows.variant_note(shipped)
    assert lines[3].startswith(f"| improved_lr2e3 | {note} | 2 | 0.720 ± 0.028 | 0.650 ± ")
    assert report.seed_table(frame[~frame["row"].str.contains("_seed")]) is None


DELTA_KEYS = [f"d_{d}{end}" for d in ("balanced_accuracy", "macro_f1", "macro_auc", "mel_recall")
              for end in ("", "_lo", "_hi")]  # fmt: skip


def test_seed_table_compares_a_recipe_on_another_split_like_the_recipe():
    frame = pd.DataFrame(
        [line(name, variant, 0.7, 0.7, 0.95, 0.03, 0.6) for name in ("improved_split7", "improved_split7_seed1")
         for variant in ("tta8", "tta8+la", "plain")]  # fmt: skip
    )
    lines = report.seed_table(frame).splitlines()[2:]
    notes = [r.split(" | ")[1] for r in lines]
    assert notes == ["mean logit over the 8 dihedral views", "8-view TTA + logit adjustment tau=1"]


def test_put_lines_replaces_a_rows_lines_in_place_and_marks_old_lines(tmp_path):
    csv = tmp_path / "ablation.csv"
    pd.DataFrame([line("reference", "plain", 0.6, 0.6, 0.9, 0.05, 0.5),
                  line("reference", "la", 0.7, 0.6, 0.9, 0.05, 0.6),
                  line("ema", "plain", 0.6, 0.6, 0.9, 0.05, 0.5)]).to_csv(csv, index=False)  # fmt: skip
    new = pd.DataFrame([line("reference", "plain", 0.65, 0.6, 0.9, 0.04, 0.5, scoring="chain")])
    ablation.put_lines(new, csv)
    frame = pd.read_csv(csv)
    assert list(zip(frame["row"], frame["variant"], frame["scoring"], strict=True)) == [
        ("reference", "plain", "chain"), ("ema", "plain", "v1")]  # fmt: skip
    assert frame.loc[0, "balanced_accuracy"] == 0.65
    ablation.put_lines(pd.DataFrame([line("px160", "plain", 0.6, 0.6, 0.9, 0.05, 0.5, scoring="chain")]), csv)
    assert list(pd.read_csv(csv)["row"]) == ["reference", "ema", "px160"]


def test_only_report_renders_the_existing_csv(tmp_path):
    """The committed docs/ablation.csv (lines from before the scoring column) still renders, all as v1."""
    out = tmp_path / "results.md"
    ablation.main(["--only-report", "--out", str(tmp_path / "runs"), "--logits-dir", str(tmp_path / "none"),
                   "--results", str(out)])  # fmt: skip
    text = out.read_text()
    frame = pd.read_csv(REPO / "docs" / "ablation.csv")
    old = frame[report.scoring_of(frame) != "chain"]
    if len(old):
        assert "## Old scoring (v1: softmax at T = 1)" in text
    assert text.count(report.FINDINGS) == 1 and text.index(report.FINDINGS) > text.index("## Commands")


# ------------------------------------------------------------------------------------------ a real (tiny) run
def set_config(run: Path, **values) -> None:
    """What `train --tta-views 8 --pool-lesions` records, without training again."""
    from skinlesion import fileio
    from skinlesion.model import checkpoint

    ckpt = checkpoint.read(run)
    ckpt["config"] = {**ckpt["config"], **values}
    fileio.torch_save(run / "best.pt", ckpt)


@pytest.fixture(scope="module")
def full_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run with every step stored: logit adjustment, T = 1.7, metadata prior, 8 TTA views,
    lesion pooling and a melanoma operating point; evaluated with --tta."""
    from skinlesion.cli import main
    from skinlesion.evaluation.fitting import fit_metadata_prior, set_operating_point
    from skinlesion.model import checkpoint
    from skinlesion.model.logit_adjustment import set_logit_adjustment

    run = tmp_path_factory.mktemp("ablation") / "reference"  # named like the ablation's reference row
    shutil.copytree(tiny_run, run)
    set_config(run, tta_views=8, pool_lesions=True)
    set_logit_adjustment(run, 1.0)
    checkpoint.set_temperature(run, 1.7)
    assert fit_metadata_prior(run) is not None
    set_operating_point(run, {"mel": 0.6})
    assert main(["evaluate", "--run-dir", str(run), "--tta", "--bootstrap", "20"]) == 0
    return run


def test_the_chain_built_from_a_runs_stored_settings_is_what_evaluate_runs(full_run):
    """The ablation's chain for the shipped variant, with the run's stored T, prior and operating point, gives
    `skinlesion evaluate --tta`'s probabilities and decisions (predictions_tta.csv)."""
    data = ablation_logits.from_run(full_run)
    assert np.abs(data["stored_offset"]).max() > 0.1 and data["views"].dtype == np.float32
    chain = scoring.stored_chain(full_run, SHIPPED_VARIANT)
    assert chain.temperature == pytest.approx(1.7) and chain.metadata_prior is not None
    assert chain.operating_point is not None and chain.operating_point["bias_tta"] is not None
    assert chain.pool_lesions and chain.tta_views == 8
    views = scoring.network_views(data, SHIPPED_VARIANT)
    offsets = chain.offsets(data["table"])
    decisions = chain(views, offsets, data["lesions"])

    evaluated = pd.read_csv(full_run / "predictions_tta.csv")
    assert list(evaluated["image_id"].astype(str)) == list(data["image_ids"])
    expected = evaluated[[f"p_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(decisions.probabilities, expected, atol=1e-5, rtol=0)
    assert decisions.names == list(evaluated["y_pred"])
    # Every step matters here: the old scoring (T = 1) is visibly off, so the check can fail.
    assert np.abs(offsets).max() > 0 and lesion_pooling.shared(data["lesions"]) > 0
    v1 = lesion_pooling.pool(softmax(views.mean(0) + offsets), data["lesions"])
    assert np.abs(v1 - expected).max() > 1e-3
    # The scoring builds its per-fold chains with the same function (T = 1 for ece_before).
    meta = {"classes": list(CLASSES)}
    uncalibrated = scoring.variant_chain(SHIPPED_VARIANT, meta, metadata_prior=chain.metadata_prior)
    out = scoring.chain_outputs(data, SHIPPED_VARIANT)
    np.testing.assert_allclose(out.uncalibrated, uncalibrated(views, offsets, data["lesions"]).probabilities)
    assert out.points[0]["tta_views"] == 8 and out.points[0]["metadata_prior"]


def test_tracked_logits_rescore_a_row_without_its_run_folder(full_run, synth_dir, tmp_path):
    """--save-logits writes a float32 copy; --rescore scores the row from it (no run folder) exactly as from the
    run folder, and replaces the row's old lines."""
    tracked = tmp_path / "tracked"
    path = ablation_logits.save_tracked(full_run, tracked)
    assert path == tracked / "reference.npz"
    with np.load(path, allow_pickle=False) as f:
        assert f["views"].dtype == np.float32 and "metadata_prior" in f.files and "run_stats" in f.files
    from_run = ablation_logits.from_run(full_run)
    copy = ablation_logits.from_tracked(path, synth_dir)
    np.testing.assert_array_equal(copy["views"], from_run["views"])
    assert copy["prior"] == from_run["prior"] and copy["stats"] == from_run["stats"]
    for field in ("image_id", "localization", "sex"):
        np.testing.assert_array_equal(copy["table"][field].astype(str), from_run["table"][field].astype(str))
    a, b = (scoring.score_variant(d, SHIPPED_VARIANT, n_boot=10) for d in (from_run, copy))
    np.testing.assert_equal(a, b)

    csv, results = tmp_path / "ablation.csv", tmp_path / "results.md"
    pd.DataFrame([line("reference", "plain", 0.1, 0.1, 0.1, 0.1, 0.1),
                  line("ema", "plain", 0.6, 0.6, 0.9, 0.05, 0.5)]).to_csv(csv, index=False)  # fmt: skip
    ablation.main(["--rescore", "--rows", "reference", "--out", str(tmp_path / "no_runs"), "--csv", str(csv),
                   "--logits-dir", str(tracked), "--data-dir", str(synth_dir), "--bootstrap", "10",
                   "--results", str(results)])  # fmt: skip
    frame = pd.read_csv(csv)
    mine = frame[frame["row"] == "reference"]
    assert list(mine["variant"]) == list(rows.VARIANTS) and set(mine["scoring"]) == {"chain"}
    assert list(frame[frame["row"] == "ema"]["scoring"]) == ["v1"]
    shipped = mine[mine["variant"] == SHIPPED_VARIANT].iloc[0]
    assert shipped["balanced_accuracy"] == pytest.approx(a["balanced_accuracy"])
    assert shipped["n_val"] == len(copy["labels"])
    assert shipped["epochs"] == from_run["stats"]["epochs"]
    plain = mine[mine["variant"] == "plain"].iloc[0]
    assert plain["d_balanced_accuracy"] == 0 and plain["temperature_fold0"] != plain["temperature_fold1"]
    text = results.read_text()
    assert "## Scored through the decision chain" in text and "## Old scoring (v1" in text
    assert "## How much prior correction" in text and "## Confusion matrix of the winning line (`reference`" in text
