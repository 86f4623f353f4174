"""Write an ensemble run folder from member run folders: best.pt (model.ensemble, every member's weights in one
self-contained file), config.json and splits.csv. Evaluate, predict, serve, report, gradcam and export then
treat it as any run folder.

The ensemble's splits.csv marks an image ``train`` when any member trained on it; otherwise the part the
members agree on (``val`` when one member used it as val and another as test). So a K-fold ensemble has no val
part (every non-test image trained some member) and only its shared test part is left to score it on.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from skinlesion import fileio
from skinlesion.data.datasets import DATA_OPTIONS
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.data.run_folder import read_config
from skinlesion.data.split import read_splits, write_splits
from skinlesion.errors import SkinLesionError
from skinlesion.model import checkpoint, ensemble

# A member's chain settings are not the ensemble's: the chain runs once, after the average.
CHAIN_KEYS = ("temperature", "calibration", "metadata_prior", "operating_point")
# Where the data lives and how its labels map: the ensemble reads the same images as its first member.
DATA_KEYS = (*DATA_OPTIONS, "cache", "cache_dir")


def combined_splits(splits: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """One split for the ensemble: ``train`` if any member trained on the image, else the members' part."""
    frames = [s.set_index("image_id") for s in splits]
    ids = sorted(set().union(*(f.index for f in frames)))
    rows = []
    for image_id in ids:
        parts = {f.at[image_id, "split"] for f in frames if image_id in f.index}
        part = "train" if "train" in parts else ("test" if parts == {"test"} else "val")
        first = next(f for f in frames if image_id in f.index)
        rows.append((image_id, first.at[image_id, "lesion_id"], first.at[image_id, "dx"], part))
    frame = pd.DataFrame(rows, columns=["image_id", "lesion_id", "dx", "split"])
    # A lesion whose images ended up in different parts counts as seen in training.
    seen = frame.groupby("lesion_id")["split"].transform(lambda s: "train" if s.nunique() > 1 else s.iloc[0])
    return frame.assign(split=seen)


def member_record(run_dir: Path, ckpt: Mapping[str, Any], root: Path) -> dict[str, Any]:
    try:
        where = str(Path(run_dir).resolve().relative_to(root.resolve()))
    except ValueError:
        where = str(Path(run_dir).resolve())
    return {"run": where, "backbone": ckpt["backbone"], "img_size": ckpt["img_size"], "epoch": ckpt.get("epoch"),
            "model_id": fileio.sha256_file(checkpoint.checkpoint_file(run_dir))[:12],
            "metrics": ckpt.get("metrics") or {}}  # fmt: skip


def refuse_repeats(members: Sequence[Path], model_ids: Sequence[str] | None = None) -> None:
    """One line when a member is listed twice (the same folder, or a copy: the same best.pt bytes): averaging a
    model with itself only weights it twice."""
    keys = model_ids if model_ids is not None else [m.resolve() for m in members]
    first: dict[Any, Path] = {}
    for m, key in zip(members, keys, strict=True):
        if key in first:
            same = "is listed twice" if model_ids is None else f"holds the same model as {first[key]}"
            raise SkinLesionError(f"ensemble member {m} {same}; list each trained run once")
        first[key] = m


def write(members: Sequence[str | Path], out: str | Path, extra_config: Mapping[str, Any] | None = None) -> Path:
    """Combine ``members`` (run folders) into the ensemble run folder ``out``; best.pt is its path."""
    out = Path(out)
    if len(members) < 1:
        raise SkinLesionError("an ensemble needs at least one run folder")
    members = [Path(m) for m in members]
    if any(m.resolve() == out.resolve() for m in members):
        raise SkinLesionError(f"--out {out} is one of the members; pick a new folder")
    refuse_repeats(members)
    ckpts = [checkpoint.read(m) for m in members]
    classes = list(ckpts[0]["classes"])
    for m, c in zip(members, ckpts, strict=True):
        if list(c["classes"]) != classes:
            raise SkinLesionError(f"{m} has classes {list(c['classes'])}, {members[0]} has {classes}; "
                                  "only runs with the same classes in the same order can be ensembled")  # fmt: skip
        if c["backbone"] == ensemble.ENSEMBLE:
            raise SkinLesionError(f"{m} is itself an ensemble; list its members instead")
    specs = [ensemble.member_spec(c) for c in ckpts]
    mean, std = ensemble.input_normalisation(specs)
    largest = max(ckpts, key=lambda c: int(c["img_size"]))
    # The ensemble is fed the largest member's pixels (smaller members get them resized inside the graph): only
    # members that decode and colour-correct alike can share them.
    preprocessing = Preprocessing.from_meta(largest).replace(mean=tuple(mean), std=tuple(std))
    for m, c in zip(members, ckpts, strict=True):
        mine = Preprocessing.from_meta(c)
        if (mine.decode, mine.color_constancy) != (preprocessing.decode, preprocessing.color_constancy):
            raise SkinLesionError(f"{m} was trained on other pixels ({mine.describe()}) than the largest member "
                                  f"({preprocessing.describe()}); ensemble runs with the same decode and colour "
                                  "constancy")  # fmt: skip
    records = [member_record(m, c, out) for m, c in zip(members, ckpts, strict=True)]
    refuse_repeats(members, [r["model_id"] for r in records])
    first_config = read_config(members[0])
    config = {
        "kind": "ensemble",
        "members": records,
        **{k: first_config.get(k) for k in DATA_KEYS},
        "backbone": ensemble.ENSEMBLE,
        **checkpoint.preprocessing_entries(preprocessing),
        "class_codes": classes,
        "class_names": ckpts[0].get("class_names"),
        # TTA views and lesion pooling: the first member's, as a single run would have them.
        "tta_views": (ckpts[0].get("config") or {}).get("tta_views", 4),
        "pool_lesions": (ckpts[0].get("config") or {}).get("pool_lesions", False),
        "recipe": (ckpts[0].get("config") or {}).get("recipe"),
        "versions": checkpoint.versions(),
        **(extra_config or {}),
    }
    payload = {
        "backbone": ensemble.ENSEMBLE,
        "members": specs,
        "num_classes": len(classes),
        "classes": classes,
        "class_names": ckpts[0].get("class_names"),
        **checkpoint.preprocessing_entries(preprocessing),
        "temperature": 1.0,
        "epoch": None,
        "metrics": {},
        "config": config,
        "versions": checkpoint.versions(),
        "model": ensemble.combined_state([c["model"] for c in ckpts]),
    }
    splits = combined_splits([read_splits(m / "splits.csv") for m in members])
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_splits(out / "splits.csv", splits)
        fileio.write_json(out / "config.json", config)
        path = fileio.torch_save(out / "best.pt", payload)
    except BaseException:
        if made:  # a failed write (a full disk) leaves no half ensemble folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    checkpoint.load(path)  # proves the members fit the combined state dict
    return path
