"""Named label sets of the data sources and the written maps between them (``map_labels``).

Every source table (``data.sources``) says in its ``label_set`` column which set its ``label`` codes come from;
``map_labels`` turns them into one target set. A map sends a code to a target code or to None (no class of the
target fits: the row is dropped and counted, or kept under a name of your choice). The decisions, with reasons,
are in docs/data.md ("How the labels map"); the tests pin each one.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from skinlesion.classes import CLASSES, FULL_NAMES
from skinlesion.errors import SkinLesionError


@dataclass(frozen=True)
class LabelSet:
    """A named set of label codes, in their fixed order, with full names."""

    name: str
    codes: tuple[str, ...]
    full_names: dict[str, str]

    def canonical(self, value: str) -> str | None:
        """The code ``value`` names, matched without regard to letter case or surrounding blanks; None if none."""
        return {c.lower(): c for c in self.codes}.get(str(value).strip().lower())


HAM7 = LabelSet("ham7", CLASSES, dict(FULL_NAMES))
ISIC2019 = LabelSet(
    "isic2019",
    ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"),
    {
        "MEL": "Melanoma",
        "NV": "Melanocytic nevus",
        "BCC": "Basal cell carcinoma",
        "AK": "Actinic keratosis",
        "BKL": "Benign keratosis (solar lentigo / seborrheic keratosis / lichen planus-like keratosis)",
        "DF": "Dermatofibroma",
        "VASC": "Vascular lesion",
        "SCC": "Squamous cell carcinoma",
        "UNK": "None of the others",
    },
)
ISIC2020 = LabelSet(
    "isic2020",
    (
        "melanoma", "nevus", "seborrheic keratosis", "lentigo NOS", "lichenoid keratosis", "solar lentigo",
        "cafe-au-lait macule", "atypical melanocytic proliferation", "unknown",
    ),  # fmt: skip
    {
        "melanoma": "Melanoma",
        "nevus": "Nevus",
        "seborrheic keratosis": "Seborrheic keratosis",
        "lentigo NOS": "Lentigo, not otherwise specified",
        "lichenoid keratosis": "Lichenoid keratosis (lichen planus-like keratosis)",
        "solar lentigo": "Solar lentigo",
        "cafe-au-lait macule": "Cafe-au-lait macule",
        "atypical melanocytic proliferation": "Atypical melanocytic proliferation",
        "unknown": "Benign, diagnosis not given",
    },
)
PAD_UFES_20 = LabelSet(
    "pad-ufes-20",
    ("ACK", "BCC", "MEL", "NEV", "SCC", "SEK"),
    {
        "ACK": "Actinic keratosis",
        "BCC": "Basal cell carcinoma",
        "MEL": "Melanoma",
        "NEV": "Nevus",
        "SCC": "Squamous cell carcinoma (incl. Bowen's disease)",
        "SEK": "Seborrheic keratosis",
    },
)
MELANOMA = LabelSet("melanoma-binary", ("mel", "other"), {"mel": "Melanoma", "other": "Any other diagnosis"})

LABEL_SETS: dict[str, LabelSet] = {s.name: s for s in (HAM7, ISIC2019, ISIC2020, PAD_UFES_20, MELANOMA)}
ALIASES = {"ham10000": "ham7", "isic2019-8": "isic2019", "pad": "pad-ufes-20", "melanoma": "melanoma-binary"}
CUSTOM = "custom"  # the label_set of labels that fit no named set (generic CSV / ImageFolder); map them with mapping=

_BKL = ("seborrheic keratosis", "lentigo NOS", "lichenoid keratosis", "solar lentigo")
MAPS: dict[tuple[str, str], dict[str, str | None]] = {
    ("isic2019", "ham7"): {
        "MEL": "mel", "NV": "nv", "BCC": "bcc", "AK": "akiec", "SCC": "akiec", "BKL": "bkl", "DF": "df",
        "VASC": "vasc", "UNK": None,
    },  # fmt: skip
    ("isic2020", "ham7"): {
        "melanoma": "mel", "nevus": "nv", **dict.fromkeys(_BKL, "bkl"),
        "cafe-au-lait macule": None, "atypical melanocytic proliferation": None, "unknown": None,
    },  # fmt: skip
    ("pad-ufes-20", "ham7"): {"ACK": "akiec", "SCC": "akiec", "BCC": "bcc", "MEL": "mel", "NEV": "nv", "SEK": "bkl"},
    # akiec is AK or SCC in situ (Bowen's disease); ISIC 2019 splits HAM's 327 into AK 130 / SCC 197, so either
    # choice mislabels a large share: unmapped. Read HAM10000 images through ISIC 2019 to get the split per image.
    ("ham7", "isic2019"): {
        "akiec": None, "bcc": "BCC", "bkl": "BKL", "df": "DF", "mel": "MEL", "nv": "NV", "vasc": "VASC",
    },  # fmt: skip
    ("isic2020", "isic2019"): {
        "melanoma": "MEL", "nevus": "NV", **dict.fromkeys(_BKL, "BKL"),
        "cafe-au-lait macule": None, "atypical melanocytic proliferation": None, "unknown": None,
    },  # fmt: skip
    ("pad-ufes-20", "isic2019"): {"ACK": "AK", "SCC": "SCC", "BCC": "BCC", "MEL": "MEL", "NEV": "NV", "SEK": "BKL"},
    # Melanoma or not. ISIC 2020 "unknown" is benign by its ground truth (target 0), ISIC 2019 UNK is "none of
    # the others": neither is a melanoma.
    **{(s.name, "melanoma-binary"): {c: "mel" if c.lower() in ("mel", "melanoma") else "other" for c in s.codes}
       for s in (HAM7, ISIC2019, ISIC2020, PAD_UFES_20)},  # fmt: skip
}


def label_set(name: str) -> LabelSet:
    """The named label set (case-insensitive; aliases ham10000, melanoma, pad, isic2019-8)."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in LABEL_SETS:
        raise SkinLesionError(f"unknown label set {name!r}; known: {', '.join(LABEL_SETS)}")
    return LABEL_SETS[key]


def label_map(source: str, target: str) -> dict[str, str | None]:
    """Code -> target code (None: no class fits) from label set ``source`` to ``target``."""
    src, dst = label_set(source), label_set(target)
    if src.name == dst.name:
        return {c: c for c in src.codes}
    if (src.name, dst.name) not in MAPS:
        known = ", ".join(f"{a} -> {b}" for a, b in MAPS)
        raise SkinLesionError(f"no label map from {src.name} to {dst.name}; written maps: {known}; or pass mapping=")
    return dict(MAPS[(src.name, dst.name)])


def guess_label_set(labels: pd.Series) -> str:
    """The first named set holding every label (letter case ignored), in the order ham7, isic2019, pad-ufes-20,
    isic2020, melanoma-binary; ``custom`` when none does."""
    values = set(labels.dropna().astype(str))
    for name in ("ham7", "isic2019", "pad-ufes-20", "isic2020", "melanoma-binary"):
        if values and all(LABEL_SETS[name].canonical(v) is not None for v in values):
            return name
    return CUSTOM


def map_labels(
    table: pd.DataFrame,
    to: str = "ham7",
    keep_unmapped_as: str | None = None,
    mapping: dict[str, str | None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``table`` with ``label`` mapped to label set ``to`` (``label_set`` set to it; the first original label kept
    in ``source_label``), and the unmapped rows counted per source and source label (columns source, label_set,
    label, rows, kept_as). Unmapped rows are dropped, or kept with label ``keep_unmapped_as`` (e.g. "other").
    ``mapping`` (code -> code or None) overrides the written maps, and is the only way to map a ``custom`` set.
    """
    target = label_set(to)
    missing = [c for c in ("label", "label_set", "source") if c not in table.columns]
    if missing:
        raise SkinLesionError(f"map_labels: the table lacks column(s) {', '.join(missing)} (read it with data.sources)")
    if table["label_set"].isna().any():
        raise SkinLesionError(f"map_labels: {int(table['label_set'].isna().sum())} row(s) without a label_set")
    mapped = table.copy()
    if "source_label" not in mapped.columns:
        mapped["source_label"] = mapped["label"]
    new = pd.Series(None, index=mapped.index, dtype=object)
    for name, rows in mapped.groupby("label_set", sort=False).groups.items():
        if name != CUSTOM:
            codes = {**label_map(str(name), target.name), **(mapping or {})}
        elif mapping is None:
            raise SkinLesionError(f"labels of set {CUSTOM!r} have no written map to {target.name}; pass mapping=")
        else:
            codes = dict(mapping)
        new.loc[rows] = mapped.loc[rows, "label"].map(lambda c, m=codes: m.get(c))
    unknown = sorted(set(new.dropna()) - set(target.codes) - {keep_unmapped_as})
    if unknown:
        raise SkinLesionError(f"mapping gives label(s) {', '.join(unknown)} outside {target.name}: {target.codes}")
    lost = new.isna()
    counts = (
        mapped.loc[lost].groupby(["source", "label_set", "label"], sort=True).size().rename("rows").reset_index()
    )
    counts["kept_as"] = keep_unmapped_as
    if keep_unmapped_as is None:
        mapped = mapped.loc[~lost]
        new = new.loc[~lost]
    else:
        new = new.fillna(keep_unmapped_as)
    mapped["label"] = new.astype(str)
    mapped["label_set"] = target.name
    return mapped.reset_index(drop=True), counts


MELANOMA_NAMES = ("mel", "melanoma")


def melanoma_code(classes: tuple[str, ...] | list[str]) -> str | None:
    """The class code that means melanoma in ``classes`` (mel, MEL, melanoma), or None."""
    return next((c for c in classes if c.lower() in MELANOMA_NAMES), None)
