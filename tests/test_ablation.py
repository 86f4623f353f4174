"""benchmarks/ablation.py without training: post-hoc variants, target checks, CSV -> docs/results.md rendering."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinlesion import posthoc

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablation"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def line(row: str, variant: str, bal: float, f1: float, auc: float, ece_after: float, mel: float) -> dict:
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
    }
    for k, v in values.items():
        out.update({k: v, f"{k}_lo": v - 0.03, f"{k}_hi": v + 0.03})
    return out


def test_variant_logits(ablation):
    rng = np.random.default_rng(0)
    views = rng.normal(size=(8, 5, 7))
    data = {"views": views, "counts": np.arange(1.0, 8.0)}
    np.testing.assert_allclose(ablation.variant_logits(data, "plain"), views[0])
    np.testing.assert_allclose(ablation.variant_logits(data, "tta4"), views[:4].mean(0))
    np.testing.assert_allclose(ablation.variant_logits(data, "tta8"), views.mean(0))
    np.testing.assert_allclose(ablation.variant_logits(data, "la"), views[0] + posthoc.offset(data["counts"]))
    np.testing.assert_allclose(ablation.variant_logits(data, "tta8+la"), views.mean(0) + posthoc.offset(data["counts"]))
    half = views.mean(0) + 0.5 * posthoc.offset(data["counts"])
    np.testing.assert_allclose(ablation.variant_logits(data, "tta8+la0.5"), half)
    data["meta"] = np.random.default_rng(1).normal(size=views.shape[1:])
    full = views.mean(0) + posthoc.offset(data["counts"]) + data["meta"]
    np.testing.assert_allclose(ablation.variant_logits(data, "tta8+la+meta"), full)
    np.testing.assert_allclose(ablation.variant_logits(data, "tta8+meta"), views.mean(0) + data["meta"])


def test_variant_names_parse_to_views_tau_and_metadata(ablation):
    assert ablation.parse_variant("plain") == ("plain", 0.0, False, False, False)
    assert ablation.parse_variant("la") == ("plain", 1.0, False, False, False)
    assert ablation.parse_variant("tta4+la") == ("tta4", 1.0, False, False, False)
    assert ablation.parse_variant("tta8+la0.5") == ("tta8", 0.5, False, False, False)
    assert ablation.parse_variant("tta8+la+meta") == ("tta8", 1.0, True, False, False)
    assert ablation.parse_variant("tta8+meta") == ("tta8", 0.0, True, False, False)
    assert ablation.parse_variant("tta8+la+meta+op") == ("tta8", 1.0, True, True, False)
    assert ablation.parse_variant("tta8+op").op and not ablation.parse_variant("tta8+op").meta
    assert ablation.parse_variant("tta8+la+meta+op+pool") == ("tta8", 1.0, True, True, True)
    assert ablation.variant_note("tta8+op+pool").endswith("+ operating point mel=0.75 + lesion pooling")
    assert ablation.variant_note("tta8+la0.5") == "8-view TTA + logit adjustment tau=0.5"
    assert ablation.variant_note("tta8+la+meta") == "8-view TTA + logit adjustment tau=1 + metadata prior"
    assert ablation.variant_note("tta8+la+meta+op").endswith("+ metadata prior + operating point mel=0.75")
    for bad in ("tta16", "tta8+meta+la", "tta8+tta4", "meta", "op", "tta8+op+meta", "pool", "tta8+pool+op"):
        with pytest.raises(ValueError, match="unknown variant"):
            ablation.parse_variant(bad)


def test_targets_and_best_line(ablation):
    frame = pd.DataFrame(
        [
            line("reference", "plain", 0.60, 0.64, 0.950, 0.04, 0.48),
            line("reference", "la", 0.71, 0.66, 0.950, 0.06, 0.72),  # 3 targets met
            line("regularised", "la", 0.72, 0.70, 0.955, 0.03, 0.75),  # all 5 met
            line("regularised", "plain", 0.90, 0.60, 0.940, 0.03, 0.40),  # highest bal acc, 2 targets met
        ]
    )
    ref = ablation.reference_line(frame)
    met = ablation.targets(frame.iloc[1], ref)
    assert list(met.values()) == [True, False, True, False, True]
    assert all(ablation.targets(frame.iloc[2], ref).values())
    best = ablation.best_line(frame)
    assert (best["row"], best["variant"]) == ("regularised", "la")


def test_render_has_table_commands_targets_and_confusion(ablation):
    frame = pd.DataFrame(
        [
            line("reference", "plain", 0.60, 0.64, 0.950, 0.04, 0.48),
            line("regularised", "tta8", 0.72, 0.70, 0.96, 0.03, 0.75),
        ]
    )
    y = np.array([0, 0, 1, 4, 4, 5])
    pred = np.array([0, 1, 1, 4, 5, 5])
    confusion = ablation.confusion_markdown(y, pred, ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"])
    assert "| **mel** | 0 | 0 | 0 | 0 | 1 | 1 | 0 | 0.50 |" in confusion
    text = ablation.render(frame, confusion)
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


def test_rows_are_distinct_and_prior_correction_is_off_for_rebalanced_training(ablation):
    names = [r.name for r in ablation.ROWS]
    assert len(names) == len(set(names)) and names[0] == "reference"
    for row in ablation.ROWS:
        balanced = "--sampler" in row.flags and row.flags[row.flags.index("--sampler") + 1] == "balanced"
        balanced |= "--class-weights" in row.flags  # a re-weighted loss also targets a flatter prior
        assert not (balanced and (row.prior_correction or any(ablation.parse_variant(v)[1] for v in row.variants)))


def test_paired_deltas_are_zero_against_itself_and_see_a_real_gain(ablation):
    rng = np.random.default_rng(1)
    n = 400
    y = rng.integers(0, 7, n)
    lesions = np.array([f"L{i // 2}" for i in range(n)])  # two images per lesion
    noisy = rng.normal(size=(1, n, 7))
    ref = {"views": noisy, "labels": y, "lesions": lesions, "counts": np.ones(7)}
    same = ablation.paired_deltas(ref, "plain", ref, n_boot=200)
    assert all(v == 0 for v in same.values())
    better = {**ref, "views": noisy + 3 * np.eye(7)[y][None]}  # much more often right
    d = ablation.paired_deltas(better, "plain", ref, n_boot=200)
    assert d["d_balanced_accuracy"] > 0.3 and d["d_balanced_accuracy_lo"] > 0
    frame = pd.DataFrame([{**line("regularised", "plain", 0.7, 0.7, 0.96, 0.03, 0.7), **d}])
    assert "| regularised | single centre crop | **+0." in ablation.delta_table(frame)


def test_the_shipped_line_is_the_winner_when_present(ablation):
    frame = pd.DataFrame(
        [
            line("reference", "plain", 0.60, 0.64, 0.950, 0.04, 0.48),
            line(*ablation.SHIPPED, 0.70, 0.62, 0.950, 0.04, 0.63),
            line("improved", "tta8", 0.90, 0.90, 0.990, 0.01, 0.95),
            line("regularised", "tta8", 0.90, 0.90, 0.990, 0.01, 0.95),
        ]
    )
    assert tuple(ablation.best_line(frame)[["row", "variant"]]) == ablation.SHIPPED


def test_a_row_flag_replaces_the_fixed_one_instead_of_repeating_it(ablation):
    row = ablation.Row("px", ["--recipe", "reference", "--img-size", "160"], "160 px")
    cmd = ablation.train_command(row, Path("data"), Path("out"))
    assert cmd.count("--img-size") == 1 and cmd[cmd.index("--img-size") + 1] == "160"
    assert cmd[cmd.index("--epochs") + 1] == "8"  # the rest of the fixed setting stays


def test_a_longer_row_counts_as_finished_only_after_its_own_epochs(ablation, tmp_path, monkeypatch):
    """A 16-epoch row stopped after 8 must be resumed, not scored as if the fixed 8 epochs were its end."""
    long = ablation.Row("long", ["--recipe", "improved", "--epochs", "16"], "16 epochs")
    short = ablation.Row("short", ["--recipe", "improved"], "fixed setting")
    assert (long.epochs, short.epochs) == (16, 8)
    for row in (long, short):
        (tmp_path / row.name).mkdir()
        pd.DataFrame({"epoch": range(1, 9)}).to_csv(tmp_path / row.name / "history.csv", index=False)
    runs = []
    monkeypatch.setattr(ablation.subprocess, "run", lambda cmd, **kw: runs.append(cmd))
    for row in (long, short):
        ablation.train(row, Path("data"), tmp_path)
    assert len(runs) == 1 and "long" in runs[0] and "--epochs" in runs[0]


def test_tau_sweep_moves_decisions_towards_the_rare_classes(ablation):
    rng = np.random.default_rng(3)
    n = 700
    y = np.repeat(np.arange(7), 100)
    # A model that leans towards class 5 (nv) by its training prior: correcting the prior raises balanced accuracy.
    counts = np.array([30, 50, 110, 10, 110, 670, 15], dtype=float)
    logits = rng.normal(size=(n, 7)) + 2.0 * np.eye(7)[y] + np.log(counts / counts.sum())
    data = {"views": logits[None], "labels": y, "counts": counts}
    sweep = ablation.tau_sweep(data, "plain")
    assert sweep[1.0][0] > sweep[0.0][0] + 0.1  # balanced accuracy
    text = ablation.tau_markdown({"reference": sweep})
    rows = text.splitlines()
    assert len(rows) == 3 and all(r.count("|") == len(ablation.TAUS) + 2 for r in rows) and "tau=0.5" in rows[0]
    assert rows[2].startswith(f"| reference | {sweep[0.0][0]:.3f} / ")


def test_seed_table_averages_only_rows_that_differ_by_seed(ablation):
    frame = pd.DataFrame(
        [
            line("reference", "plain", 0.60, 0.64, 0.950, 0.04, 0.40),
            line("reference_seed1", "plain", 0.62, 0.66, 0.952, 0.02, 0.60),
            line("reference_la", "plain", 0.99, 0.99, 0.999, 0.01, 0.99),  # another recipe, not a seed
            line("improved", "tta8+la", 0.72, 0.67, 0.955, 0.02, 0.60),  # one seed: no spread to show
            line("improved_lr2e3", ablation.SHIPPED[1], 0.70, 0.66, 0.950, 0.03, 0.50),  # seeded: shipped line
            line("improved_lr2e3_seed1", ablation.SHIPPED[1], 0.74, 0.64, 0.954, 0.03, 0.70),
            line("improved_lr2e3_seed1", "tta8+la" if ablation.SHIPPED[1] != "tta8+la" else "tta4", 0, 0, 0, 0, 0),
            line("improved_lr2e3_seed1", "plain", 0.1, 0.1, 0.1, 0.1, 0.1),
        ]
    )
    rows = ablation.seed_table(frame).splitlines()
    assert len(rows) == 4 and rows[2].startswith("| reference | single centre crop | 2 | 0.610 ± 0.014 | 0.650 ± ")
    assert "0.500 ± 0.141" in rows[2]  # melanoma recall of 0.40 and 0.60
    note = ablation.variant_note(ablation.SHIPPED[1])
    assert rows[3].startswith(f"| improved_lr2e3 | {note} | 2 | 0.720 ± 0.028 | 0.650 ± ")
    assert ablation.seed_table(frame[~frame["row"].str.contains("_seed")]) is None


def test_rows_on_another_split_train_on_it_and_pair_with_its_reference(ablation):
    rows = {r.name: r for r in ablation.ROWS}
    improved, reference = rows["improved_split7"], rows["reference_split7"]
    assert (improved.reference, reference.reference, rows["improved"].reference) == (
        "reference_split7", "reference_split7", "reference")  # fmt: skip
    cmd = ablation.train_command(improved, Path("data"), Path("out"))
    assert cmd[cmd.index("--splits") + 1] == str(Path("out") / "splits_seed7.csv")
    assert ablation.train_command(rows["improved"], Path("d"), Path("o"))[5] == str(Path("o") / "splits.csv")
    frame = pd.DataFrame(
        [
            {**line("reference_split7", "plain", 0.6, 0.6, 0.95, 0.03, 0.5), **dict.fromkeys(DELTA_KEYS, 0.0)},
            {**line("improved_split7", "tta8", 0.7, 0.7, 0.96, 0.03, 0.6), **dict.fromkeys(DELTA_KEYS, 0.1)},
        ]
    )
    table = ablation.delta_table(frame).splitlines()
    assert len(table) == 3 and table[2].startswith("| improved_split7 | mean logit over the 8 dihedral views |")


DELTA_KEYS = [f"d_{d}{end}" for d in ("balanced_accuracy", "macro_f1", "macro_auc", "mel_recall")
              for end in ("", "_lo", "_hi")]  # fmt: skip


def test_seed_table_compares_a_recipe_on_another_split_like_the_recipe(ablation):
    frame = pd.DataFrame(
        [line(name, variant, 0.7, 0.7, 0.95, 0.03, 0.6) for name in ("improved_split7", "improved_split7_seed1")
         for variant in ("tta8", "tta8+la", "plain")]  # fmt: skip
    )
    rows = ablation.seed_table(frame).splitlines()[2:]
    notes = [r.split(" | ")[1] for r in rows]
    assert notes == ["mean logit over the 8 dihedral views", "8-view TTA + logit adjustment tau=1"]


def test_operating_point_variant_is_scored_out_of_fold_and_moves_decisions_only(ablation):
    """"+op": the recipe's melanoma operating point, set on one half of the val lesions and scored on the other."""
    from skinlesion import operating_point
    from skinlesion.calibration import lesion_folds
    from skinlesion.classes import CLASS_INDEX, CLASSES
    from skinlesion.evaluate import softmax

    assert ablation.OPERATING_POINT == __import__("skinlesion.recipes").recipes.IMPROVED["min_sensitivity"]
    rng = np.random.default_rng(5)
    n, mel = 800, CLASS_INDEX["mel"]
    y = rng.choice(7, n, p=[0.04, 0.05, 0.11, 0.02, 0.12, 0.62, 0.04])
    views = rng.normal(size=(1, n, 7)) + 0.1 * rng.normal(size=(8, n, 7)) + 1.2 * np.eye(7)[y][None]
    views[..., CLASS_INDEX["nv"]] += 1.0  # melanoma under-called
    data = {"views": views, "labels": y, "lesions": np.array([f"L{i // 2}" for i in range(n)]),
            "counts": np.bincount(y, minlength=7).astype(float)}  # fmt: skip
    decided = ablation.decisions(data, "tta8+op")
    assert ablation.decisions(data, "tta8") is None
    z = views.mean(0)
    fold = lesion_folds(y, data["lesions"], 2, seed=0)
    for f in range(2):  # each half decided with the bias fitted on the other half
        bias = operating_point.fit(z[fold != f], y[fold != f], CLASSES, {"mel": 0.75})
        assert bias[mel] > 0
        assert np.array_equal(decided[fold == f], operating_point.decide(softmax(z[fold == f]), bias))
    plain, op = (ablation.score_variant(data, v, n_boot=50) for v in ("tta8", "tta8+op"))
    assert op["mel_recall"] > plain["mel_recall"] and op["mel_recall"] > 0.65
    for key in ("macro_auc", "ece_before", "ece_after", "mel_auc"):  # the probabilities are the same
        assert op[key] == plain[key]


def test_pooled_variant_pools_probabilities_with_per_image_temperature_and_bias(ablation):
    """"+pool": each image scored with its lesion's pooled probabilities; the operating point's bias and the
    temperature are still set on single images, as `skinlesion operating-point` and `calibrate` set them."""
    from skinlesion import lesion_pooling, metrics, operating_point
    from skinlesion.calibration import crossfit
    from skinlesion.classes import CLASS_INDEX, CLASSES
    from skinlesion.evaluate import softmax

    rng = np.random.default_rng(6)
    n = 900
    y = rng.choice(7, n // 3, p=[0.04, 0.05, 0.11, 0.02, 0.12, 0.62, 0.04]).repeat(3)  # 3 images per lesion
    lesions = np.array([f"L{i // 3}" for i in range(n)])
    views = rng.normal(size=(1, n, 7)) * 1.5 + 0.1 * rng.normal(size=(8, n, 7)) + 1.0 * np.eye(7)[y][None]
    views[..., CLASS_INDEX["nv"]] += 1.0
    data = {"views": views, "labels": y, "lesions": lesions, "counts": np.bincount(y, minlength=7).astype(float)}
    z = views.mean(0)
    np.testing.assert_allclose(ablation.variant_probs(data, "tta8+pool"), lesion_pooling.pool(softmax(z), lesions))
    bias = ablation.out_of_fold_bias(z, y, lesions)  # set on the single images
    expected = operating_point.decide(lesion_pooling.pool(softmax(z), lesions), bias)
    assert np.array_equal(ablation.decisions(data, "tta8+op+pool"), expected)
    single, pooled = (ablation.score_variant(data, v, n_boot=20) for v in ("tta8", "tta8+pool"))
    assert pooled["temperature"] == single["temperature"]  # T fitted per image ...
    calibrated, _ = crossfit(z, y, lesions, n_folds=2, seed=0)
    ece = metrics.evaluate(y, lesion_pooling.pool(calibrated, lesions), lesions, CLASSES, n_boot=0)["ece"]
    assert pooled["ece_after"] == pytest.approx(ece["value"])  # ... and applied before pooling
    # Three noisy views of one lesion know its class better than one.
    assert pooled["balanced_accuracy"] > single["balanced_accuracy"] + 0.02
