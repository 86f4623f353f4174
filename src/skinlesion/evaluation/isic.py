"""ISIC 2018 Task 3 submission files: ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``, one row per image, probabilities in
[0, 1] whose argmax is the project's decision.

Without an operating point the chain's probabilities are written as they are. With one, the decision is
argmax(log p + bias), which the plain probabilities do not encode, so the file holds p'(c) = p(c) exp(bias_c) /
sum_k p(k) exp(bias_k) (``DecisionChain.decision_probabilities``): the same ranking the decision uses, so the
challenge's argmax-based metrics (balanced accuracy) score the project's decisions. AUC per class changes too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from skinlesion import fileio
from skinlesion.errors import SkinLesionError

# The challenge's column order and names for the HAM10000 labels.
ISIC_COLUMNS = {"mel": "MEL", "nv": "NV", "bcc": "BCC", "akiec": "AKIEC", "bkl": "BKL", "df": "DF", "vasc": "VASC"}


def submission(image_ids: Sequence[str], probabilities: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """The submission frame; ``probabilities`` (N, C) in ``classes`` order, rows summing to 1."""
    missing = sorted(set(ISIC_COLUMNS) - set(classes))
    if missing:
        raise SkinLesionError(f"an ISIC 2018 file needs all seven HAM10000 classes; the model lacks {missing}")
    probs = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    frame = pd.DataFrame({"image": [str(i) for i in image_ids]})
    for label, column in ISIC_COLUMNS.items():
        frame[column] = probs[:, list(classes).index(label)]
    return frame


def write_submission(
    path: str | Path, image_ids: Sequence[str], probabilities: np.ndarray, classes: Sequence[str]
) -> Path:
    frame = submission(image_ids, probabilities, classes)
    try:
        return fileio.write_csv(path, frame)  # full precision: rounding could tie the top two
    except OSError as e:
        raise SkinLesionError(f"cannot write {path} ({e.strerror or e}); pass an --isic-csv path in a writable folder "
                              "(the other outputs were written)") from e  # fmt: skip
