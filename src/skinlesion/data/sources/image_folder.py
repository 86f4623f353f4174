"""ImageFolder: one sub-folder per class (``root/<class>/<image>.jpg``), as torchvision reads it.

The label is the folder name, checked like a generic CSV's labels (``label_set`` or the first named set that
holds every folder name, else ``custom``). image_id is the file name stem, unique over all classes; images
right in the root are ignored and counted (attrs ``ignored_files``). No lesion, patient or clinical columns.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from skinlesion.data.images import IMAGE_SUFFIXES
from skinlesion.data.sources.contract import Source, clinical, finish, holds_images, listing, resolve_label_set
from skinlesion.errors import SkinLesionError


def _class_dirs(folder: Path) -> list[Path]:
    try:
        subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    return [p for p in subs if holds_images(p)]


def missing(folder: Path) -> str | None:
    if any(folder.glob("*.csv")):
        return "a CSV beside the class folders (an ImageFolder has none)"
    if len(_class_dirs(folder)) < 2:
        return "no two class sub-folders of images"
    return None


def read_image_folder(
    folder: str | Path,
    allow_missing: bool = False,
    check: str = "quick",
    progress: bool = False,
    label_set: str | None = None,
    name: str = "imagefolder",
) -> pd.DataFrame:
    """``folder/<class>/*.jpg|png`` as a source table named ``name``."""
    root = Path(folder).expanduser().resolve()
    classes = _class_dirs(root)
    if not classes:
        raise SkinLesionError(f"{root} has no sub-folder of images; an ImageFolder holds one folder per class")
    rows = []
    for class_dir in classes:
        with os.scandir(class_dir) as it:
            files = sorted(e.path for e in it if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
        rows += [{"image_id": Path(f).stem, "path": f, "folder": class_dir.name} for f in files]
    frame = pd.DataFrame(rows)
    clash = frame[frame["image_id"].duplicated(keep=False)].groupby("image_id")["folder"].apply(sorted)
    if len(clash):
        shown = listing([f"{i} ({', '.join(f)})" for i, f in clash.items()])
        raise SkinLesionError(f"{root}: the same file name in several class folders: {shown}; rename them")
    frame["label"], labels_of = resolve_label_set(frame.pop("folder"), label_set, root, "class folder name")
    frame, counts = clinical(frame, {})
    ignored = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return finish(frame, name, labels_of, root, root, classes, allow_missing, check, progress,
                  {**counts, "ignored_files": ignored})  # fmt: skip


IMAGE_FOLDER = Source(
    name="imagefolder",
    title="ImageFolder (one sub-folder per class)",
    label_set=None,
    layout="<class>/<image>.jpg for every class, no CSV",
    citation="(that of the data)",
    licence="(that of the data)",
    url="",
    missing=missing,
    reader=read_image_folder,
    options=("label_set", "name"),
)
