"""Which images must stay together in a split: ``group_ids`` (patient, else lesion, else image) and the
class x source strata a multi-source split balances (``strata``)."""

from __future__ import annotations

import pandas as pd

from skinlesion.data.sources.registry import SOURCES
from skinlesion.errors import SkinLesionError

LEVELS = ("patient", "lesion", "image")
SHARED_ID_SOURCES = frozenset(s.name for s in SOURCES.values() if s.shared_ids)


def group_ids(table: pd.DataFrame) -> tuple[pd.Series, dict[str, dict[str, int]]]:
    """The group of each row: ``patient:<id>`` where the row has a patient id, else ``lesion:<id>``, else
    ``image:<id>``; and per source how many rows each level grouped. Sources with ISIC archive ids (ham10000,
    isic2019, isic2020) share one namespace, so one lesion read through two of them is one group; the ids of any
    other source are prefixed with its name (``lesion:pad-ufes-20:1765``), so plain numbers cannot meet."""
    missing = [c for c in ("image_id", "lesion_id", "patient_id", "source") if c not in table.columns]
    if missing:
        raise SkinLesionError(f"group_ids: the table lacks column(s) {', '.join(missing)} (read it with data.sources)")
    level = pd.Series("image", index=table.index, dtype=object)
    value = table["image_id"].astype(str)
    for name, col in (("lesion", "lesion_id"), ("patient", "patient_id")):
        known = table[col].notna()
        level[known] = name
        value = value.where(~known, table[col].astype(str))
    scope = table["source"].map(lambda s: "" if s in SHARED_ID_SOURCES else f"{s}:")
    ids = level + ":" + scope + value
    counts = pd.crosstab(table["source"], level)
    used = {str(s): {lv: int(counts.loc[s, lv]) for lv in LEVELS if lv in counts.columns and counts.loc[s, lv]}
            for s in counts.index}  # fmt: skip
    return ids.astype(str), used


def strata(table: pd.DataFrame) -> pd.Series:
    """``<label>|<source>`` per row: stratifying on it keeps every class of every source spread over the parts."""
    return (table["label"].astype(str) + "|" + table["source"].astype(str)).astype(str)
