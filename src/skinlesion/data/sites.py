"""Body-site vocabularies of the sources and the maps onto HAM10000's ``localization`` terms.

The source tables' ``site`` column uses HAM10000's terms where a source term means one of them (or a HAM term
that covers it), and otherwise the source's own term in lower case. ``general_site`` maps any of them onto the
coarser ISIC "anatom_site_general" vocabulary, which every source can reach (for mixing sources in one prior).
The maps were checked on the 10,015 HAM10000 images that ISIC 2019 also lists with its general site.
"""

from __future__ import annotations

import pandas as pd

HAM_SITES = (
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand", "lower extremity", "neck",
    "scalp", "trunk", "upper extremity",
)  # fmt: skip  # + "unknown", which the tables hold as missing

# ISIC 2019 anatom_site_general / ISIC 2020 anatom_site_general_challenge -> HAM term (or kept as is).
ISIC_GENERAL_TO_HAM = {
    "anterior torso": "trunk",  # HAM splits it into abdomen and chest; "trunk" is HAM's torso without a side
    "lateral torso": "trunk",
    "torso": "trunk",
    "posterior torso": "back",  # on HAM's images: back <-> posterior torso, 2,192 of 2,192
    "upper extremity": "upper extremity",
    "lower extremity": "lower extremity",
    "palms/soles": "acral",  # on HAM's images: acral -> palms/soles (7 of 7); HAM "foot" is lower extremity
    "head/neck": "head/neck",  # no single HAM term (face, ear, neck, scalp): kept
    "oral/genital": "oral/genital",  # oral is not genital: kept
}

# PAD-UFES-20 region (upper case there) -> HAM term.
PAD_REGION_TO_HAM = {
    "abdomen": "abdomen", "arm": "upper extremity", "back": "back", "chest": "chest", "ear": "ear", "face": "face",
    "foot": "foot", "forearm": "upper extremity", "hand": "hand", "lip": "face", "neck": "neck", "nose": "face",
    "scalp": "scalp", "thigh": "lower extremity",
}  # fmt: skip

# Any site term of the tables -> ISIC general site (HAM's assignment, as ISIC 2019 made it for HAM's images).
GENERAL_SITE = {
    "abdomen": "anterior torso", "chest": "anterior torso", "back": "posterior torso", "trunk": "torso",
    "face": "head/neck", "ear": "head/neck", "neck": "head/neck", "scalp": "head/neck", "head/neck": "head/neck",
    "hand": "upper extremity", "upper extremity": "upper extremity", "lower extremity": "lower extremity",
    "foot": "lower extremity", "acral": "palms/soles", "genital": "oral/genital", "oral/genital": "oral/genital",
}  # fmt: skip

MISSING_SITES = frozenset({"", "unknown", "unk", "na", "n/a", "nan", "none"})


def to_ham_site(values: pd.Series, mapping: dict[str, str]) -> tuple[pd.Series, dict[str, int]]:
    """Lower-cased, mapped sites (HAM terms pass through; missing/unknown -> NA) and the counts of terms that are
    neither a HAM term nor in ``mapping`` (kept, lower-cased)."""
    text = values.astype(str).str.strip().str.lower()
    text = text.where(~text.isin(MISSING_SITES) & text.notna())
    known = {**{s: s for s in HAM_SITES}, **mapping}
    mapped = text.map(lambda v: known.get(v, v) if isinstance(v, str) else v)
    other = text[text.notna() & ~text.isin(list(known))]
    return mapped.astype(str), {str(k): int(n) for k, n in other.value_counts().items()}


def general_site(sites: pd.Series) -> pd.Series:
    """ISIC general site of each table site (NA when missing, or a source's own term kept as is)."""
    return sites.map(lambda v: GENERAL_SITE.get(v) if isinstance(v, str) else None).astype(str)
