"""Lesion pooling: the images of one lesion are scored together.

HAM10000 holds 1-6 dermoscopic images of a lesion (on the real val split 45 % of the images share their
lesion with another image): different shots of one lesion with one diagnosis. Where the input says which
images belong to which lesion (a ``lesion_id``), each image gets its lesion's pooled probabilities: the
normalised geometric mean over the lesion's images, softmax(mean_i log p_i). That is the mean logit after
the temperature and the metadata prior (a lesion's images share age, sex and site), the same average TTA
takes over flips, here over real, different views. An image alone in its lesion, or without a lesion id,
is unchanged.

The temperature and the operating point stay fitted per image (one image is what serve and Grad-CAM see);
on the real val split the operating point's melanoma sensitivity carries over to pooled images (0.73-0.80
on 27 networks, benchmarks/ablation.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def _ids(lesion_ids: Sequence[str | None] | np.ndarray) -> np.ndarray:
    """Lesion ids as text; a missing one (None, NaN, "") becomes an id of its own row, never shared."""
    ids = pd.Series(list(lesion_ids), dtype=object)
    missing = ids.isna() | (ids.astype(str).str.strip() == "")
    return np.where(missing, [f"\0row {i}" for i in range(len(ids))], ids.astype(str))


def pool(probs: np.ndarray, lesion_ids: Sequence[str | None] | np.ndarray) -> np.ndarray:
    """(N, C) probabilities with each row replaced by its lesion's softmax(mean log p)."""
    probs = np.asarray(probs, dtype=np.float64)
    ids = _ids(lesion_ids)
    if len(ids) != len(probs):
        raise ValueError(f"{len(ids)} lesion ids for {len(probs)} images")
    log_p = np.log(np.clip(probs, np.finfo(np.float64).tiny, None))
    mean = pd.DataFrame(log_p).groupby(ids, sort=False).transform("mean").to_numpy()
    mean = mean - mean.max(1, keepdims=True)
    e = np.exp(mean)
    return e / e.sum(1, keepdims=True)


def shared(lesion_ids: Sequence[str | None] | np.ndarray) -> int:
    """How many images share their lesion with at least one other image (the ones pooling changes)."""
    ids = pd.Series(_ids(lesion_ids))
    return int((ids.map(ids.value_counts()) > 1).sum())


def describe(lesion_ids: Sequence[str | None] | np.ndarray) -> str:
    ids = _ids(lesion_ids)
    n = shared(ids)
    return (
        f"lesion pooling: {n} of {len(ids)} images share their lesion with others "
        f"({len(np.unique(ids))} lesions); each is scored with its lesion's pooled probabilities"
    )
