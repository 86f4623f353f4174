"""The known sources: recognise a folder (``detect``) and read it into a source table (``read``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from skinlesion.data.sources.contract import Source
from skinlesion.data.sources.generic_csv import CSV
from skinlesion.data.sources.ham import HAM10000
from skinlesion.data.sources.image_folder import IMAGE_FOLDER
from skinlesion.data.sources.isic2019 import ISIC_2019
from skinlesion.data.sources.isic2020 import ISIC_2020
from skinlesion.data.sources.pad_ufes import PAD_UFES
from skinlesion.errors import SkinLesionError

SOURCES: dict[str, Source] = {s.name: s for s in (HAM10000, ISIC_2019, ISIC_2020, PAD_UFES, CSV, IMAGE_FOLDER)}
ALIASES = {"ham": "ham10000", "isic2018": "ham10000", "pad": "pad-ufes-20", "padufes20": "pad-ufes-20",
           "image-folder": "imagefolder", "generic": "csv"}  # fmt: skip


def get_source(name: str | Source) -> Source:
    """The source called ``name`` (letter case, '_' for '-' and the aliases ham, isic2018, pad, generic ignored)."""
    if isinstance(name, Source):
        return name
    key = name.strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in SOURCES:
        raise SkinLesionError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    return SOURCES[key]


def _folder(folder: str | Path) -> Path:
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise SkinLesionError(f"data folder {root} does not exist")
    return root


def detect(folder: str | Path) -> Source:
    """The one source whose layout ``folder`` holds (ImageFolder only when no other fits); a one-line error
    naming what each source misses when none does, or the candidates when several do."""
    root = _folder(folder)
    findings = {s.name: s.missing(root) for s in SOURCES.values() if s.detectable}
    hits = [name for name, missing in findings.items() if missing is None]
    if len(hits) > 1 and IMAGE_FOLDER.name in hits:
        hits.remove(IMAGE_FOLDER.name)
    if len(hits) == 1:
        return SOURCES[hits[0]]
    if hits:
        raise SkinLesionError(f"{root} holds the layouts of several sources ({', '.join(hits)}); choose with source=")
    missing = "; ".join(f"{name}: {why}" for name, why in findings.items())
    raise SkinLesionError(f"no known data layout in {root} ({missing}); or read a labels CSV with source='csv'")


def read(
    folder: str | Path,
    source: str | Source | None = None,
    allow_missing: bool = False,
    check: str = "quick",
    progress: bool = False,
    **options: object,
) -> pd.DataFrame:
    """``folder`` as a source table (``data.sources.contract``), with ``source`` given or detected. ``options``
    go to the source's reader (e.g. ``part`` for isic2019, ``label_field`` for isic2020, the column names for csv);
    ``check`` and ``allow_missing`` work as in ``ham10000.load_table``."""
    root = _folder(folder)
    chosen = get_source(source) if source is not None else detect(root)
    unknown = sorted(set(options) - set(chosen.options))
    if unknown:
        takes = ", ".join(chosen.options) or "none"
        raise SkinLesionError(f"source {chosen.name} has no option {', '.join(unknown)} (its options: {takes})")
    return chosen.reader(root, allow_missing=allow_missing, check=check, progress=progress, **options)
