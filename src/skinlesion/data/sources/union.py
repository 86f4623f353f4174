"""Several source tables as one: ``union`` keeps each image once (HAM10000's images are inside ISIC 2019 under
the same ids) and reports what it left out and where the sources disagree on a label."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from skinlesion.data.sources.contract import COLUMNS, OPTIONAL
from skinlesion.errors import SkinLesionError

TEXT = ("image_id", "path", "label", "label_set", "lesion_id", "patient_id", "sex", "site", "source", "dx_type")


def union(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """One table with every image once: an image id in several tables is taken from the first table given.

    attrs: ``sources`` (in order), ``rows_per_source`` (kept), ``duplicates`` (list of {kept, dropped_from,
    rows}), ``conflicts`` (list of {image_id, kept, kept_label, dropped_from, dropped_label}: the same id with
    different labels of the same label set — map the tables to one set first), ``unchecked_duplicates`` (repeats
    whose label sets differ, so their labels could not be compared).
    """
    if not tables:
        raise SkinLesionError("union needs at least one table")
    for n, table in enumerate(tables):
        missing = [c for c in COLUMNS if c not in table.columns]
        if missing:
            raise SkinLesionError(f"union: table {n} lacks column(s) {', '.join(missing)} (read it with data.sources)")
    every = pd.concat([t.assign(_table=n) for n, t in enumerate(tables)], ignore_index=True)
    repeat = every["image_id"].duplicated(keep="first")
    kept, dropped = every.loc[~repeat], every.loc[repeat]
    pairs = dropped.merge(kept[["image_id", "source", "label", "label_set"]], on="image_id", suffixes=("", "_kept"))
    same_set = pairs["label_set"] == pairs["label_set_kept"]
    clash = pairs[same_set & (pairs["label"] != pairs["label_kept"])]
    counts = pairs.groupby(["source_kept", "source"], sort=False).size()
    extra = [c for c in every.columns if c not in (*COLUMNS, *OPTIONAL, "_table")]
    out = kept[[*COLUMNS, *[c for c in (*OPTIONAL, *extra) if c in every.columns]]].reset_index(drop=True)
    for col in (c for c in TEXT if c in out.columns):
        out[col] = out[col].astype(str)
    out.attrs = {
        "sources": list(dict.fromkeys(str(s) for t in tables for s in t["source"].unique())),
        "rows_per_source": {str(k): int(n) for k, n in out["source"].value_counts(sort=False).items()},
        "duplicates": [{"kept": str(a), "dropped_from": str(b), "rows": int(n)} for (a, b), n in counts.items()],
        "conflicts": [
            {"image_id": r.image_id, "kept": r.source_kept, "kept_label": r.label_kept, "dropped_from": r.source,
             "dropped_label": r.label}
            for r in clash.itertuples()
        ],  # fmt: skip
        "unchecked_duplicates": int((~same_set).sum()),
    }
    return out
