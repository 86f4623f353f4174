"""A run's data: one or more folders of any known source, read (data/sources), their labels mapped into the run's
label set (data/taxonomy), taken together once per image (sources/union), grouped by what each source knows
(patient, else lesion, else image) — as the one image table every stage uses.

The table: ``image_id``, ``path``, ``dx`` (the run's class code), ``lesion_id`` (the image id where unknown),
``patient_id`` (NA where unknown), ``group_id`` (what a split keeps together), ``source``, ``source_label`` (the
label as the source wrote it), ``age``, ``sex``, ``localization`` (body site), plus ``dx_type`` / ``fitzpatrick`` /
``target`` where a source has them. ``attrs`` hold the per-source summary: what was read, dropped, unmapped,
repeated across sources, and how the images were grouped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from skinlesion.data.sources.contract import Frozen
from skinlesion.data.sources.grouping import group_ids
from skinlesion.data.sources.registry import detect, get_source, read
from skinlesion.data.sources.union import union
from skinlesion.data.taxonomy import LabelSet, label_set, map_labels
from skinlesion.errors import SkinLesionError

DEFAULT_CLASSES = "ham7"
# Options of the generic CSV source (``--labels-csv`` and the column names), by TrainConfig / CLI name.
CSV_OPTIONS = ("labels_csv", "image_col", "label_col", "lesion_col", "patient_col", "age_col", "sex_col", "site_col")
# The options that say which images with which labels (DataSpec): TrainConfig's data fields, shared by train,
# prepare, split, grid and evaluate, and copied into an ensemble's config.json.
DATA_OPTIONS = ("data_dir", "metadata", "images", "allow_missing", "source", "classes", "keep_unmapped",
                "label_field", *CSV_OPTIONS)


@dataclass(frozen=True)
class DataSpec:
    """Which images with which labels: the data options of train / evaluate / prepare / split / grid."""

    data_dirs: tuple[str, ...] = ()  # none: the bundled HAM10000 sample
    metadata: str | None = None  # HAM10000 only: this metadata CSV instead of the folder's
    images: str | None = None  # HAM10000 only: this image folder instead of the folder's
    source: str | None = None  # every folder read as this source (default: detected per folder)
    classes: str = DEFAULT_CLASSES  # the label set to train / score in (data/taxonomy)
    keep_unmapped: str | None = None  # keep images whose label has no class, as this extra class
    label_field: str | None = None  # ISIC 2020: diagnosis (default) or target (melanoma yes / no)
    allow_missing: bool = False
    csv: tuple[tuple[str, str], ...] = ()  # the generic CSV's options as (name, value) pairs

    @classmethod
    def of(cls, options: Any, data_dirs: Sequence[str] | str | None = None) -> DataSpec:
        """From anything with the options as attributes (a TrainConfig, an argparse namespace)."""
        dirs = getattr(options, "data_dir", None) if data_dirs is None else data_dirs
        dirs = () if dirs is None else (dirs,) if isinstance(dirs, str | Path) else tuple(dirs)
        csv = tuple((k, getattr(options, k)) for k in CSV_OPTIONS if getattr(options, k, None) is not None)
        get = lambda k, d=None: getattr(options, k, d)  # noqa: E731
        return cls(tuple(str(d) for d in dirs), get("metadata"), get("images"), get("source"),
                   get("classes") or DEFAULT_CLASSES, get("keep_unmapped"), get("label_field"),
                   bool(get("allow_missing", False)), csv)  # fmt: skip

    def replace(self, **changes: Any) -> DataSpec:
        return dataclasses.replace(self, **changes)

    @property
    def label_set(self) -> LabelSet:
        return label_set(self.classes)


def classes_of(spec: DataSpec, table: pd.DataFrame | None = None) -> tuple[str, ...]:
    """The run's class codes: the label set's codes the data holds (all of them without data), in the set's order,
    plus the ``keep_unmapped`` class."""
    codes = spec.label_set.codes
    if table is not None:
        held = set(table["dx"])
        codes = tuple(c for c in codes if c in held)
    return (*codes, spec.keep_unmapped) if spec.keep_unmapped else codes


def class_names(spec: DataSpec, classes: Sequence[str]) -> dict[str, str]:
    names = spec.label_set.full_names
    return {c: names.get(c, "Other (labels without a class of this set)" if c == spec.keep_unmapped else c)
            for c in classes}  # fmt: skip


def read_folder(folder: str | None, spec: DataSpec, check: str = "quick", progress: bool = False) -> pd.DataFrame:
    """One folder as a source table (data/sources/contract)."""
    from skinlesion.data.ham10000 import sample_dir

    if folder is None and (spec.metadata or spec.images):  # HAM10000's --metadata / --images without a folder
        folder = str(Path(spec.metadata or spec.images).expanduser().resolve().parent)
    root = Path(folder) if folder is not None else sample_dir()
    options: dict[str, Any] = {}
    if spec.source is not None:
        source = get_source(spec.source)
    elif spec.metadata or spec.images:
        source = get_source("ham10000")
    elif spec.csv and any(k == "labels_csv" for k, _ in spec.csv):
        source = get_source("csv")
    else:
        source = detect(root)
    if source.name == "csv":
        options = dict(spec.csv)
    if source.name == "ham10000" and (spec.metadata or spec.images):
        options = {"metadata": spec.metadata, "images": spec.images}
    if source.name == "isic2020" and spec.label_field:
        options["label_field"] = spec.label_field
    return read(root, source, allow_missing=spec.allow_missing, check=check, progress=progress, **options)


def read_sources(spec: DataSpec, check: str = "quick", progress: bool = False) -> list[pd.DataFrame]:
    """Every folder of ``spec`` as a source table, labels as the source wrote them."""
    return [read_folder(folder, spec, check, progress) for folder in spec.data_dirs or (None,)]


def load_dataset(spec: DataSpec, check: str = "quick", progress: bool = False,
                 sources: list[pd.DataFrame] | None = None) -> pd.DataFrame:  # fmt: skip
    """Every folder of ``spec`` read (or ``sources``, read already), mapped into its label set, joined (each image
    once) and grouped."""
    tables, unmapped = [], []
    for table in sources if sources is not None else read_sources(spec, check, progress):
        mapped, lost = map_labels(table, spec.label_set.name, spec.keep_unmapped)
        mapped.attrs = {**table.attrs, "unmapped": lost.to_dict("records")}
        tables.append(mapped)
        unmapped += lost.to_dict("records")
    joined = union(tables) if len(tables) > 1 else tables[0]
    if joined.empty:
        where = ", ".join(spec.data_dirs) or "the data"
        raise SkinLesionError(f"no image of {where} has a label of the {spec.label_set.name} classes; pass "
                              "--classes with a set its labels map to")  # fmt: skip
    out = internal(joined)
    out.attrs = {"sources": [t.attrs for t in tables], "union": dict(joined.attrs) if len(tables) > 1 else None,
                 "unmapped": unmapped, "label_set": spec.label_set.name,
                 "dropped": Frozen(d for t in tables for d in t.attrs.get("dropped", ())),
                 "grouping": out.attrs.get("grouping")}  # fmt: skip
    return out


def internal(table: pd.DataFrame) -> pd.DataFrame:
    """A source table (mapped) in the columns every stage reads (module doc)."""
    groups, levels = group_ids(table)
    out = pd.DataFrame({
        "image_id": table["image_id"].astype(str),
        "path": table["path"].astype(str),
        "dx": table["label"].astype(str),
        "lesion_id": table["lesion_id"].where(table["lesion_id"].notna(), table["image_id"]).astype(str),
        "patient_id": table["patient_id"],
        "group_id": _plain_groups(groups, table),
        "source": table["source"].astype(str),
        "source_label": table.get("source_label", table["label"]).astype(str),
        "age": pd.to_numeric(table["age"], errors="coerce"),
        "sex": table["sex"].astype("string").fillna("unknown").astype(str),
        "localization": table["site"].astype("string").fillna("unknown").astype(str),
    })  # fmt: skip
    for extra in ("dx_type", "fitzpatrick", "target"):
        if extra in table.columns:
            out[extra] = table[extra].to_numpy()
    out = out.reset_index(drop=True)
    out.attrs = {"grouping": levels}
    return out


def _plain_groups(groups: pd.Series, table: pd.DataFrame) -> pd.Series:
    """A one-source table grouped by lesion keeps the lesion ids themselves as groups, so HAM10000's split is the
    same lesion-grouped split as ever; any other table keeps group_ids' prefixed ids."""
    lesion_only = groups.str.startswith("lesion:").all() and table["source"].nunique() == 1
    return table["lesion_id"].astype(str) if lesion_only else groups


def grouping_text(table: pd.DataFrame) -> str:
    """What the split keeps together, per source: 'ham10000: lesion 10,015'."""
    levels = table.attrs.get("grouping") or {}
    return "; ".join(f"{s}: " + ", ".join(f"{k} {n:,}" for k, n in by.items()) for s, by in levels.items())


def summary_lines(table: pd.DataFrame) -> list[str]:
    """What the run reads, in a few lines: per source the images kept and dropped, the labels without a class of
    the label set, images found in two sources, and how the split groups them."""
    a = table.attrs
    lines = []
    for s in a.get("sources", []):
        counts = table[table["source"] == s.get("source")]["dx"].value_counts().sort_index()  # stable, by code
        kept = ", ".join(f"{k} {n}" for k, n in counts.items())
        lines.append(f"{s.get('source')}: {int(counts.sum()):,} images in {a.get('label_set')} classes ({kept}) from "
                     f"{s.get('data_dir')}")  # fmt: skip
    lost = [u for u in a.get("unmapped", []) if u.get("rows")]
    if lost:
        verb = "kept as " + str(lost[0]["kept_as"]) if lost[0].get("kept_as") else "left out"
        lines.append(f"labels without a class of {a.get('label_set')} ({verb}): " + ", ".join(
            f"{u['source']} {u['label']} {u['rows']}" for u in lost))  # fmt: skip
    union = a.get("union") or {}
    for dup in union.get("duplicates", []):
        lines.append(f"{dup['rows']:,} images of {dup['dropped_from']} are also in {dup['kept']}: used once")
    if union.get("conflicts"):
        lines.append(f"{len(union['conflicts'])} image(s) labelled differently by two sources (first source kept)")
    if a.get("dropped"):
        lines.append(f"dropped {len(a['dropped'])} unusable image(s) (--allow-missing); `skinlesion prepare "
                     "--allow-missing` lists them")  # fmt: skip
    lines.append(f"split groups: {grouping_text(table)}")
    return lines
