"""Command line: argument parsing only. Each subcommand delegates to ``<module>.main(args)``.

Seed-style spellings with underscores (``--data_dir``, ``--run_name``, ``--img_size`` ...) are accepted for every
option: they are rewritten to the dashed form before parsing. Numbers are checked against the project's one set of
input rules (skinlesion/rules.py) while parsing; ``train``'s options are generated from ``TrainConfig``'s fields
(training/config.py), grouped as there, with each recipe's default in the help.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from skinlesion import __version__, fileio, rules
from skinlesion.errors import SkinLesionError
from skinlesion.inference.weight_rounding import ROUNDINGS
from skinlesion.training.config import DATA_OPTIONS, GROUPS, LABEL_SET_NAMES, OUTPUT_KEYS, TrainConfig, field_type
from skinlesion.training.recipes import RECIPES


def number(rule: rules.Range) -> Callable[[str], int | float]:
    """An argparse ``type=`` from a rules.Range: a bad value is argparse's usage line plus one error line (exit code
    2), before any work."""

    def parse(text: str) -> int | float:
        try:
            return rule.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = rule.kind.__name__  # argparse names the type in some messages
    return parse


POSITIVE = number(rules.POSITIVE)
FRACTION = number(rules.FRACTION)
AT_LEAST_0 = number(rules.AT_LEAST_0)
AT_LEAST_1 = number(rules.AT_LEAST_1)
BATCH = number(rules.BATCH_SIZE)
WORKERS = number(rules.WORKERS)
SEED = number(rules.SEED)
IMG_SIZE = number(rules.IMG_SIZE)
PORT = number(rules.PORT)

DATA_HELP = "HAM10000 folder (Kaggle layout, one image folder, or ISIC 2018 Task 3); default: bundled sample"
DEVICES = ["auto", "cuda", "mps", "cpu"]
RUN_DIR_HELP = "run folder made by `skinlesion train` (or `skinlesion ensemble`)"


# --------------------------------------------------------------------------------- option groups, written once
def _run_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help=RUN_DIR_HELP)


def _device_arg(p: argparse.ArgumentParser | Any, default: str | None = "auto") -> None:
    p.add_argument("--device", default=default, choices=DEVICES,
                   help="where the model runs: auto (default) = cuda, then mps, then cpu")  # fmt: skip


def _data_args(p: argparse.ArgumentParser, title: str = "data", exclude: tuple[str, ...] = ()) -> None:
    """Which images with which labels: TrainConfig's data options (DATA_OPTIONS), the same flags everywhere."""
    g = p.add_argument_group(title)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in DATA_OPTIONS:
        if name not in exclude:
            _field_option(g, fields[name])


def _cache_args(p: argparse.ArgumentParser | Any) -> None:
    p.add_argument("--no-cache", dest="cache", action="store_false", help="decode the original files every time "
                   "(the same pixels as the cache: one preprocessing)")  # fmt: skip
    p.add_argument("--cache-dir", help="where the image cache lives (default: $SKINLESION_CACHE_DIR, else the user "
                   "cache folder, e.g. ~/.cache/skinlesion)")  # fmt: skip


def _scoring_args(p: argparse.ArgumentParser, batch_size: int = 64) -> None:
    """How images are scored (inference.options.ScoringOptions): batch, workers, device, cache."""
    g = p.add_argument_group("scoring")
    g.add_argument("--batch-size", type=BATCH, default=batch_size, help=f"images per forward pass (default "
                   f"{batch_size})")  # fmt: skip
    g.add_argument("--workers", type=WORKERS, default=0, help="data loader workers (default 0)")
    _device_arg(g)
    _cache_args(g)


def _backend_arg(p: argparse.ArgumentParser, default: str, auto: str) -> None:
    """The scoring backend (inference.selection): every one feeds the same decision chain."""
    p.add_argument("--backend", default=default, choices=["auto", "torch", "onnx", "onnx-int8"],
                   help=f"torch: best.pt; onnx: model.onnx (`skinlesion export`); onnx-int8: model.int8.onnx "
                   f"(`skinlesion export --int8`); {auto} (default {default})")  # fmt: skip


def _chain_args(p: argparse.ArgumentParser, what: str) -> None:
    """The decision chain's switches (DecisionChain.switched): each turns one stored step off or changes it."""
    g = p.add_argument_group("decision chain")
    g.add_argument("--tta-views", type=int, choices=[4, 8],
                   help="TTA views: 4 flips or the 8 dihedral symmetries (default: the run's recipe)")  # fmt: skip
    g.add_argument("--pool-lesions", action=argparse.BooleanOptionalAction, help=f"score images that share a "
                   f"lesion_id {what} together (default: the run's recipe)")  # fmt: skip
    g.add_argument("--no-metadata-prior", dest="metadata_prior", action="store_false",
                   help="ignore the run's metadata prior (image model only)")  # fmt: skip
    g.add_argument("--no-operating-point", dest="operating_point", action="store_false",
                   help="decide by the plain argmax even if the run holds an operating point")  # fmt: skip


def _min_sensitivity_arg(p: argparse.ArgumentParser | Any, help: str) -> None:
    p.add_argument("--min-sensitivity", action="append", metavar="CLASS=FRACTION", type=_targets,
                   help=f"{help} ({rules.TARGETS_HELP})")  # fmt: skip


def _targets(text: str) -> str:
    try:
        rules.targets(text)
    except SkinLesionError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--min-sensitivity {text!r}: ")) from None
    return text


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="validate a HAM10000 folder, print a summary and build the image cache")
    _data_args(p)
    g = p.add_argument_group("image cache")
    _cache_args(g)
    g.add_argument("--img-size", type=IMG_SIZE, default=224, help="training size the cache is made for (default "
                   "224; the cache holds the run's preprocessing at that size)")  # fmt: skip
    g.add_argument("--color-constancy", default="none", choices=["none", "shades-of-gray"],
                   help="the colour constancy of the runs that will read it (default none)")  # fmt: skip
    p.set_defaults(module="skinlesion.commands.prepare")


def _add_split(sub) -> None:
    p = sub.add_parser("split", help="lesion-grouped stratified train/val(/test) split to a CSV")
    _data_args(p)
    p.add_argument("--out", default="splits.csv", help="output CSV (default splits.csv)")
    p.add_argument("--val-frac", type=FRACTION, default=0.2, help="validation fraction (default 0.2)")
    p.add_argument("--test-frac", type=number(rules.PART), default=0.0, help="test fraction for three parts "
                   "(default 0)")  # fmt: skip
    p.add_argument("--folds", type=number(rules.Range(int, 2, 100)), help="K-fold mode: number of folds (val = fold "
                   "--fold)")  # fmt: skip
    p.add_argument("--fold", type=AT_LEAST_0, default=0, help="which fold is val in K-fold mode (default 0)")
    p.add_argument("--seed", type=SEED, default=42, help="split seed (default 42)")
    p.set_defaults(module="skinlesion.commands.split")


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic HAM10000-layout folder that a small net learns fast")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-per-class", type=number(rules.Range(int, 1, 10_000)), default=40,
                   help="images per class (default 40)")  # fmt: skip
    p.add_argument("--size", default="96x72", help="image size WxH (default 96x72)")
    p.add_argument("--imbalance", action="store_true", help="HAM10000-like class proportions (ham10000 layout)")
    p.add_argument("--layout", default="ham10000", choices=["ham10000", "isic2019", "isic2020", "pad-ufes-20", "csv",
                   "imagefolder"], help="whose folder layout to copy (default ham10000)")  # fmt: skip
    p.add_argument("--classes", default="ham7", choices=list(LABEL_SET_NAMES), help="the label set the summary "
                   "counts in (default ham7)")  # fmt: skip
    p.add_argument("--seed", type=SEED, default=0, help="seed of the drawn images and metadata (default 0)")
    p.set_defaults(module="skinlesion.commands.synth")


# ------------------------------------------------------------------------------------------------------ train
def _recipe_default(name: str) -> str:
    """' (reference X, improved Y)' or ' (default X)', from the recipe objects; '' where every recipe has None."""
    values = {k: getattr(r, name) for k, r in RECIPES.items()}

    def text(v: Any) -> str:
        return "off" if v is False else "on" if v is True else " ".join(map(str, v)) if isinstance(v, tuple) else str(v)

    if len(set(map(str, values.values()))) == 1:
        value = next(iter(values.values()))
        return "" if value is None else f" (default {text(value)})"
    return " (" + ", ".join(f"{k} {text(v)}" for k, v in values.items()) + ")"


def _field_option(group: Any, f: dataclasses.Field) -> None:
    """One TrainConfig field as a command-line option: default None, so an option left out takes the recipe's
    value (and ``--resume`` knows what was given)."""
    meta, kinds = f.metadata, field_type(f.name)
    flags = (f"--{f.name.replace('_', '-')}", *meta["flags"])
    help = (meta["help"] + _recipe_default(f.name)).replace("%", "%%")  # argparse formats help with %
    if f.name == "min_sensitivity":
        _min_sensitivity_arg(group, help)
    elif meta.get("paths"):
        group.add_argument(*flags, dest=f.name, action="append", metavar="DIR", help=help + " (repeatable)")
    elif bool in kinds:
        group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help)
    elif tuple in kinds:
        group.add_argument(*flags, dest=f.name, type=number(meta["rule"]), nargs=3, metavar="V", help=help)
    else:
        kind = number(meta["rule"]) if meta["rule"] is not None else (int if int in kinds else str)
        group.add_argument(*flags, dest=f.name, type=kind, choices=meta["choices"], help=help)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a timm backbone; writes a run folder",
        description="Every option left out takes its value from --recipe (shown in each option's help).",
    )  # fmt: skip
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of option values (keys = option names, e.g. "
                   "img-size: 128); options given on the command line override it; a run's config.json reproduces "
                   "that run; recipe files to copy: configs/*.yaml")  # fmt: skip
    p.add_argument("--recipe", default="reference", choices=sorted(RECIPES),
                   help="named preset of defaults (default reference; docs/training.md#recipes)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the run folder from last.pt")
    groups = {name: p.add_argument_group(title) for name, title in GROUPS.items()}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["cli"]:
            _field_option(groups[f.metadata["group"]], f)
    p.add_argument("--max-train-batches", type=AT_LEAST_1, help=argparse.SUPPRESS)
    # Stop as if interrupted after N epochs of this invocation (tests of --resume; time-boxed runs).
    p.add_argument("--stop-after-epochs", type=AT_LEAST_1, help=argparse.SUPPRESS)
    p.set_defaults(module="skinlesion.commands.train")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="predict a split or external set; metrics with lesion-bootstrap CIs")
    _run_dir_arg(p)
    p.add_argument("--split", choices=["train", "val", "test", "oof"],
                   help="part of the run's splits.csv to score (default val; test for a run without val, e.g. a "
                   "K-fold ensemble; oof = a --folds run's out-of-fold predictions, what cv.json reports, the "
                   "default when it has no test part)")  # fmt: skip
    _data_args(p, "an external labelled set to score instead of the run's own split (its labels mapped into the "
               "run's classes)", exclude=("classes", "keep_unmapped"))  # fmt: skip
    p.add_argument("--task", default="auto", choices=["auto", "multiclass", "melanoma"], help="external set: score "
                   "the run's classes, or melanoma vs the rest (AUC, partial AUC, sensitivity / specificity); auto "
                   "(default) = melanoma when the set's labels know only that, or when the run's classes would keep "
                   "less than half of its images (ISIC 2020)")  # fmt: skip
    p.add_argument("--name", help="name of an external set (results in <run>/eval_<name>/)")
    p.add_argument("--keep-overlap", action="store_true", help="score external images the run trained on (same "
                   "image or lesion id) too, with a warning in metrics.json; by default they are left out")
    p.add_argument("--tta", action="store_true", help="also score test-time augmentation (the run's views)")
    p.add_argument("--lesion-level", action="store_true", help="also score lesions (mean probability)")
    p.add_argument("--bootstrap", type=number(rules.BOOTSTRAP), default=1000,
                   help="lesion-bootstrap resamples for the CIs (default 1000)")  # fmt: skip
    p.add_argument("--seed", type=SEED, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--isic-csv", metavar="PATH", help="also write an ISIC 2018 Task 3 submission CSV (image,MEL,NV,BCC,"
                   "AKIEC,BKL,DF,VASC) whose argmax is this command's decision (docs/usage.md#isic-submission-files)")
    _chain_args(p, "(in splits.csv or the external metadata)")
    _scoring_args(p, 64)
    _backend_arg(p, "auto", "auto = ONNX Runtime INT8, then fp32, when an up-to-date model.int8.onnx / model.onnx "
                 "exists and the device is the CPU, else torch")  # fmt: skip
    p.set_defaults(module="skinlesion.commands.evaluate")


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="fit temperature scaling; stores T in best.pt")
    _run_dir_arg(p)
    p.add_argument("--method", default="crossfit", choices=["crossfit", "train-slice"],
                   help="crossfit: fit and score on disjoint halves of val lesions, store T fitted on all val "
                        "(default); train-slice: fit on a lesion slice of train, score on val")  # fmt: skip
    p.add_argument("--split", default="val", choices=["train", "val", "test"],
                   help="held-out part to fit/score on (default val)")  # fmt: skip
    p.add_argument("--folds", type=number(rules.Range(int, 2, 100)), default=2,
                   help="crossfit folds over lesions (default 2)")  # fmt: skip
    p.add_argument("--slice-frac", type=FRACTION, default=0.1,
                   help="train-slice: fraction of train lesions (default 0.1)")  # fmt: skip
    p.add_argument("--seed", type=SEED, default=0, help="seed of the lesion folds / slice (default 0)")
    g = p.add_argument_group("safeguards fitted on the same images (stored in best.pt; predict / serve / the API "
                             "return them)")  # fmt: skip
    g.add_argument("--conformal", type=FRACTION, metavar="COVERAGE", help="also fit split-conformal label sets that "
                   "hold the true class with this probability, e.g. 0.9 (lesions as the calibration units)")
    g.add_argument("--conformal-method", default="aps", choices=["aps", "raps"],
                   help="APS, or RAPS (regularised: smaller sets; default aps)")  # fmt: skip
    g.add_argument("--ood", choices=["energy", "max_logit", "max_softmax", "mahalanobis"], help="also fit an "
                   "out-of-distribution detector: a score of the raw logits, or Mahalanobis on the pooled features; "
                   "an image above its threshold gets no diagnosis")  # fmt: skip
    g.add_argument("--ood-refusal", type=number(rules.Range(float, 0, 0.5, low_open=True, high_open=True)),
                   default=0.05, help="share of in-distribution images the threshold refuses (default 0.05)")
    _scoring_args(p, 64)
    p.set_defaults(module="skinlesion.commands.calibrate")


def _add_fit_metadata_prior(sub) -> None:
    p = sub.add_parser("fit-metadata-prior", help="fit p(class | age, sex, site) on the run's train split; "
                       "stores it in best.pt")  # fmt: skip
    _run_dir_arg(p)
    p.add_argument("--remove", action="store_true", help="take the prior out of best.pt instead")
    p.set_defaults(module="skinlesion.commands.fit_metadata_prior")


def _add_operating_point(sub) -> None:
    p = sub.add_parser("operating-point", help="set a minimum sensitivity per class (e.g. mel=0.75) on the val "
                       "split; stores the per-class bias in best.pt")  # fmt: skip
    _run_dir_arg(p)
    _min_sensitivity_arg(p, "the smallest bias per class that reaches this sensitivity")
    p.add_argument("--split", default="val", choices=["train", "val", "test"],
                   help="labelled images to set it on (default val; train images were trained on, avoid them)")
    p.add_argument("--no-tta", dest="tta", action="store_false",
                   help="fit on single-view logits instead of the run's TTA views (default: TTA, as evaluate --tta)")
    p.add_argument("--remove", action="store_true", help="take the operating point out of best.pt instead")
    g = p.add_argument_group("referral (refer to a dermatologist instead of naming a class)")
    g.add_argument("--referral", type=FRACTION, metavar="ACCURACY", help="fit a referral rule on the same images: "
                   "refer the least confident images so that the rest reach this accuracy, e.g. 0.9")  # fmt: skip
    g.add_argument("--referral-melanoma", type=FRACTION, metavar="SENSITIVITY", help="with --referral: also refer "
                   "images whose melanoma probability lies in the band that brings melanomas called or referred to "
                   "this sensitivity, e.g. 0.95")  # fmt: skip
    _scoring_args(p, 64)
    p.set_defaults(module="skinlesion.commands.operating_point")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="figures/*.png and a self-contained report.html")
    _run_dir_arg(p)
    _device_arg(p)
    p.add_argument("--cam-method", default="gradcam", choices=["gradcam", "gradcam++", "eigencam"],
                   help="Grad-CAM gallery method (default gradcam)")
    p.add_argument("--no-gallery", dest="gallery", action="store_false", help="skip the Grad-CAM gallery")
    p.add_argument("--grid-per-class", type=number(rules.Range(int, 0, 100)), default=2,
                   help="lesion-grid images per class (default 2)")  # fmt: skip
    p.add_argument("--grid-size", type=number(rules.GRID_SIZE), default=160,
                   help="lesion-grid tile size in pixels (default 160)")  # fmt: skip
    p.set_defaults(module="skinlesion.commands.report")


def _add_gradcam(sub) -> None:
    p = sub.add_parser("gradcam", help="Grad-CAM image | heatmap | overlay for one image")
    _run_dir_arg(p)
    p.add_argument("--image", required=True, help="the image to explain (.jpg / .png)")
    p.add_argument("--target-class", help="class code to explain (default: the predicted one)")
    p.add_argument("--method", default="gradcam", choices=["gradcam", "gradcam++", "eigencam"],
                   help="pytorch-grad-cam method (default gradcam)")
    p.add_argument("--out", help="output PNG (default <run>/figures/gradcam_<image>.png)")
    _device_arg(p)
    p.set_defaults(module="skinlesion.commands.gradcam")


def _add_grid(sub) -> None:
    p = sub.add_parser("grid", help="labelled grid of example lesions per class")
    _data_args(p)
    p.add_argument("--n-per-class", type=number(rules.Range(int, 1, 100)), default=1,
                   help="images per class (default 1)")  # fmt: skip
    p.add_argument("--size", type=number(rules.GRID_SIZE), default=256, help="tile size in pixels (default 256)")
    p.add_argument("--out", default="lesion_grid.png", help="output PNG (default lesion_grid.png)")
    p.add_argument("--seed", type=SEED, default=0, help="which images are drawn (default 0)")
    p.set_defaults(module="skinlesion.commands.grid")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="class probabilities for images or folders")
    p.add_argument("--run-dir", required=True, help="run folder with best.pt (and model.onnx for --backend onnx)")
    p.add_argument("inputs", nargs="+", help="image files or folders (their .jpg/.jpeg/.png files, sorted)")
    p.add_argument("--tta", action="store_true", help="average over flipped/rotated views (the run's recipe)")
    p.add_argument("--top-k", type=AT_LEAST_1, default=3, help="classes listed per image (default 3)")
    p.add_argument("--format", default="table", choices=["table", "json", "csv"], help="stdout format (default table: "
                   "class codes, fits 120 columns; full names in json)")  # fmt: skip
    _backend_arg(p, "torch", "auto = the fastest up-to-date one, as evaluate")
    p.add_argument("--isic-csv", metavar="PATH", help="also write an ISIC 2018 Task 3 submission CSV (image,MEL,NV,BCC,"
                   "AKIEC,BKL,DF,VASC) whose argmax is this command's decision (docs/usage.md#isic-submission-files)")
    g = p.add_argument_group("patient metadata (the run's metadata prior)")
    g.add_argument("--metadata", help="CSV with image_id (= file name stem) and any of age, sex, localization, "
                   "lesion_id, e.g. HAM10000_metadata.csv: per-image input for the run's metadata prior and "
                   "lesion pooling")  # fmt: skip
    g.add_argument("--age", type=number(rules.AGE), help="patient age in years, for every input image")
    g.add_argument("--sex", choices=["male", "female"], help="for every input image")
    g.add_argument("--site", help="body site as in HAM10000's localization column (e.g. back, face), for every "
                   "input image")  # fmt: skip
    _chain_args(p, "in --metadata")
    g = p.add_argument_group("scoring")
    g.add_argument("--batch-size", type=BATCH, default=32, help="images per forward pass (default 32)")
    p.set_defaults(module="skinlesion.commands.predict")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export best.pt to ONNX (checked against PyTorch)")
    p.add_argument("--run-dir", required=True, help="run folder with best.pt")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default onnx)")
    p.add_argument("--opset", type=AT_LEAST_1, default=18, help="ONNX opset: 18 (default) up to the newest the "
                   "installed onnx defines (28 for onnx 1.23); others are refused before exporting")
    p.add_argument("--out", help="output file (default <run>/model.onnx)")
    g = p.add_argument_group("INT8 (ONNX Runtime static quantization)")
    g.add_argument("--int8", action="store_true", help="also write model.int8.onnx beside it: INT8 weights and "
                   "activations calibrated on the run's training images, with its decision agreement and metric "
                   "differences from fp32 on val (used by --backend auto when it loses at most 0.01 balanced "
                   "accuracy)")  # fmt: skip
    g.add_argument("--calibration-images", type=AT_LEAST_1, default=300,
                   help="training images that set the INT8 activation ranges (default 300)")  # fmt: skip
    g.add_argument("--weight-rounding", choices=ROUNDINGS, default="gptq",
                   help="how INT8 weights are rounded: gptq (default: each layer's output kept close to fp32 on the "
                   "calibration images) or nearest (ONNX Runtime's own, each weight to its nearest step)")  # fmt: skip
    _cache_args(g)  # the val images of the drift check: the run's image cache, or decoded files
    p.set_defaults(module="skinlesion.commands.export")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="web page + JSON API for a trained run")
    _run_dir_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=PORT, default=8000, help="port 1-65535 (default 8000)")
    p.add_argument("--max-upload-mb", type=number(rules.Range(float, 0, 1024, low_open=True)), default=20.0,
                   help="request size limit (default 20, at most 1024)")  # fmt: skip
    p.add_argument("--max-megapixels", type=number(rules.Range(float, 0, 50, low_open=True)), default=50.0,
                   help="decoded pixel limit, refuses decompression bombs (default and most: 50, the project's "
                   "one limit)")  # fmt: skip
    p.add_argument("--allowed-hosts", nargs="+", metavar="NAME",
                   help="Host headers to answer besides localhost / the bound address / this machine's name, e.g. "
                   "lesions.example.org or '*.example.org'; '*' = any (other Host headers get 400)")
    _backend_arg(p, "auto", "auto = ONNX Runtime INT8, then fp32, when an up-to-date model.int8.onnx / model.onnx "
                 "exists, else torch")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    p.set_defaults(module="skinlesion.commands.serve")


def _add_ensemble(sub) -> None:
    p = sub.add_parser("ensemble", help="combine trained runs into one ensemble run folder (logits averaged)",
                       description="Members' logits are averaged before the decision chain (temperature, metadata "
                       "prior, operating point, pooling), which the ensemble has its own of: fit them with "
                       "calibrate / fit-metadata-prior / operating-point on the ensemble folder.")  # fmt: skip
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="trained run folders (same classes)")
    p.add_argument("--out", required=True, help="the ensemble run folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.set_defaults(module="skinlesion.commands.ensemble")


def _add_convert_checkpoint(sub) -> None:
    p = sub.add_parser("convert-checkpoint", help="rewrite an old best.pt / last.pt (NumPy values pickled inside) as "
                       "tensors and plain data, so it loads safely")  # fmt: skip
    p.add_argument("path", help="checkpoint file, or a run folder (its best.pt and last.pt)")
    p.add_argument("--i-trust-this-file", dest="trust", action="store_true",
                   help="required: reading the old file unpickles it, which runs any code hidden in it")
    p.set_defaults(module="skinlesion.commands.convert_checkpoint")


def _describe(sub: argparse._SubParsersAction) -> None:
    """Every subcommand's --help opens with what it does and where its reference lives."""
    summaries = {a.dest: a.help for a in sub._choices_actions}
    for name, parser in sub.choices.items():
        summary = summaries[name]
        lead = f"{summary[0].upper()}{summary[1:]}."
        reference = f"Reference: docs/usage.md#skinlesion-{name}"
        parser.description = " ".join(x for x in (lead, parser.description, reference) if x)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skinlesion",
        description="Train, evaluate, explain and serve dermatoscopic skin-lesion classifiers (HAM10000).",
    )
    parser.add_argument("--version", action="version", version=f"skinlesion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_prepare, _add_split, _add_synth, _add_train, _add_evaluate, _add_calibrate,
                _add_fit_metadata_prior, _add_operating_point, _add_report, _add_gradcam, _add_grid, _add_predict,
                _add_export, _add_serve, _add_ensemble, _add_convert_checkpoint):
        add(sub)
    _describe(sub)
    return parser


def normalise_argv(argv: Sequence[str]) -> list[str]:
    """``--data_dir=x`` -> ``--data-dir=x``: seed-style spellings work everywhere."""
    out = []
    for tok in argv:
        if tok.startswith("--") and "_" in tok.split("=", 1)[0]:
            name, *rest = tok.split("=", 1)
            tok = "=".join([name.replace("_", "-"), *rest])
        out.append(tok)
    return out


def close_progress_bars() -> None:
    """End any open tqdm bar first, so the error starts its own line instead of trailing a half-drawn bar."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def one_line(error: SkinLesionError) -> str:
    """The error's own message. A DataLoader worker re-raises ours as 'Caught SkinLesionError in DataLoader
    worker process 0. Original Traceback ...': keep its last line, the message."""
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(("skinlesion.", "SkinLesionError")) else last
    return text


MAX_CONFIG_BYTES = fileio.MAX_SETTINGS_BYTES  # a --config file is a page of options, never megabytes


def _yaml_loader():
    """PyYAML's safe loader without aliases: an alias can expand a few lines into gigabytes (a YAML bomb)."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", event.start_mark)
            return super().compose_node(parent, index)

    return NoAliases


def read_config_file(path: str) -> dict[str, Any]:
    """A ``--config`` file: YAML or JSON mapping option names (``img-size`` or ``img_size``) to values."""
    import json

    import yaml

    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        size = Path(path).stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise SkinLesionError(f"--config {path}: {size:,} bytes is not an options file (at most "
                                  f"{MAX_CONFIG_BYTES:,}); pass a YAML or JSON file of options")  # fmt: skip
        text = Path(path).read_text(encoding="utf-8")
        values = json.loads(text) if kind == "JSON" else yaml.load(text, Loader=_yaml_loader())  # noqa: S506
    except FileNotFoundError as e:
        raise SkinLesionError(f"--config {path}: file not found") from e
    except IsADirectoryError as e:
        raise SkinLesionError(f"--config {path} is a folder; pass a YAML or JSON file") from e
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, yaml.YAMLError) as e:
        raise SkinLesionError(f"--config {path}: not valid {kind} ({fileio.first_line(e)})") from e
    if not isinstance(values, dict):
        raise SkinLesionError(f"--config {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The file's values as defaults of ``parser``, each checked as if typed on the command line (so the command
    line still overrides them): unknown keys and bad values are one error naming the key. A run's config.json
    works too (its output keys are skipped)."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {k: v for k, v in read_config_file(path).items() if k not in OUTPUT_KEYS}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        near = {k: difflib.get_close_matches(k, actions, 1) for k in unknown}
        hint = ", ".join(f"{k} (did you mean {m[0]}?)" if m else k for k, m in near.items())
        raise SkinLesionError(f"--config {path}: unknown option(s) {hint}; keys are `{parser.prog} --help` options")
    out = {key: _config_value(path, key, value, actions[key]) for key, value in values.items()}
    if parser.prog.endswith(" train"):  # every value of the right type for its TrainConfig field, before any work
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        base = RECIPES.get(out.get("recipe") or "reference", RECIPES["reference"])
        TrainConfig.from_dict({**base.to_dict(), **{k: v for k, v in out.items() if k in fields}}, f"--config {path}")
    return out


def _config_value(path: str, key: str, value: Any, action: argparse.Action) -> Any:
    """One --config value through the option's own parser (lists elementwise) and choices."""
    if isinstance(value, dict):
        raise SkinLesionError(f"--config {path}: {key}: expected a value, got a mapping")
    if action.nargs == 0:  # a switch (--amp / --no-amp, --allow-missing)
        if not isinstance(value, bool):
            raise SkinLesionError(f"--config {path}: {key}: expected true or false, got {value!r}")
        return value
    if action.type in (None, str) and value is not None and not isinstance(value, str | list):
        raise SkinLesionError(f"--config {path}: {key}: expected a string, got {value!r}")
    try:
        if value is not None and action.type is not None:
            value = [action.type(str(v)) for v in value] if isinstance(value, list) else action.type(str(value))
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise SkinLesionError(f"--config {path}: {key}: {e}") from e
    if value is not None and action.choices is not None and not isinstance(value, list) and (
        value not in action.choices
    ):
        raise SkinLesionError(f"--config {path}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    if isinstance(value, list) and action.nargs is None and not isinstance(action, argparse._AppendAction):
        raise SkinLesionError(f"--config {path}: {key}: expected one value, got a list")
    return value


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse with the subcommand's own usage for an unknown option, and ``--config`` values as defaults."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    if extra:
        known = [o for a in sub._actions for o in a.option_strings]
        near = [m for x in extra if x.startswith("-") for m in difflib.get_close_matches(x.split("=")[0], known, 1)]
        sub.error(f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {near[0]}?)" if near else ""))
    if getattr(args, "config", None):
        sub.set_defaults(**config_defaults(sub, args.config))
        args = parser.parse_args(argv)
    return args


# ------------------------------------------------------------------------------------- paths, before any work
FILE_OUT = ("split", "grid", "gradcam", "export")  # commands whose --out is a file; train / ensemble / synth: a folder


def check_paths(args: argparse.Namespace) -> None:
    """The paths a command line names, checked before any work (fileio's rules): an input folder or file that is
    a link loop, unreadable or of the other kind, an output file that is a folder, an output folder that is a
    file or lies under one: one line each, nothing written."""
    # True: a folder, False: a file, None: either (--run-dir may name a run's best.pt); repeatable ones are lists
    inputs = {"--data-dir": True, "--images": True, "--run-dir": None, "--metadata": False, "--config": False,
              "--labels-csv": False, "RUN_DIR": None}  # fmt: skip
    for flag, folder in inputs.items():
        value = getattr(args, "run_dirs" if flag == "RUN_DIR" else flag[2:].replace("-", "_"), None)
        for item in [value] if isinstance(value, str) else value if isinstance(value, list) else ():
            if isinstance(item, str):
                fileio.input_path(item, flag, folder)
    out = getattr(args, "out", None)
    if isinstance(out, str):
        (fileio.output_file if args.command in FILE_OUT else fileio.output_folder)(out, "--out")
    if isinstance(getattr(args, "isic_csv", None), str):
        fileio.output_file(args.isic_csv, "--isic-csv")
    if isinstance(getattr(args, "cache_dir", None), str):
        fileio.output_folder(args.cache_dir, "--cache-dir")


def remove_stale_temps(args: argparse.Namespace) -> None:
    """Temp files a killed process left in the run folder this command uses (a checkpoint write's
    ``.best.pt.*.tmp``): removed at the start of every command that uses the folder. (train: training/loop.py,
    which knows the run folder; the image cache: data/cache.py, when it is opened.)"""
    run_dir = getattr(args, "run_dir", None)
    if isinstance(run_dir, str) and os.path.isfile(run_dir):  # a checkpoint file given as the run
        run_dir = os.path.dirname(os.path.abspath(run_dir))
    for folder in (run_dir, args.out if args.command == "ensemble" else None):
        if isinstance(folder, str) and os.path.isdir(folder):
            fileio.remove_stale_temps(folder)


def os_error_line(e: OSError) -> str | None:
    """The last net for a file-system error the code did not catch itself (a folder deep in a data set that cannot
    be listed, a full disk under another library's writer): one line naming the path; None for an OSError that
    names no path and is not a full disk (a bug: its traceback is more use)."""
    if e.errno in fileio.DISK_FULL:
        where = f" {e.filename}" if e.filename else " an output"
        free = fileio.free_bytes(Path(e.filename or ".").parent)
        have = f" ({fileio.size_text(free)} free)" if free is not None else ""
        return f"no space left on the disk of{where}{have}; free some space or write to another folder"
    if not e.filename:
        return None
    return f"cannot use {e.filename} ({e.strerror or e}); check the path and its permissions"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(normalise_argv(sys.argv[1:] if argv is None else argv))
        check_paths(args)
    except SkinLesionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        remove_stale_temps(args)
        importlib.import_module(args.module).main(args)
    except SkinLesionError as e:
        close_progress_bars()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            return broken_pipe()
        line = os_error_line(e)
        if line is None:
            raise
        close_progress_bars()
        print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def broken_pipe() -> int:
    """stdout closed early (`skinlesion predict ... | head`): stop quietly, as shell tools do."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
    except (OSError, ValueError, AttributeError):
        pass
    return 141


if __name__ == "__main__":
    raise SystemExit(main())
