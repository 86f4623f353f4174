"""Clinical metadata prior: age, sex and body site as a second opinion added to the image logits.

HAM10000 records the patient's age, sex and the lesion's body site with every image, and they carry
diagnostic signal the pixels do not (nevi in the young, keratoses on the face of the old). A multinomial
logistic regression (scikit-learn, default C = 1) fit on the *training* rows of a run estimates
p(y | metadata); assuming image and metadata independent given the class, the posterior is

    log p(y | image, metadata) = log p(y | image) + [log p(y | metadata) - log p(y)] + const,

so the bracket -- the *offset* -- is added to the (tempered) image logits by decision/chain.py. It is a
per-image constant, so it composes with TTA, temperature scaling and the logit adjustment stored in best.pt.
An image with no known field gets offset 0: without metadata the model is exactly the image model. Never
used: ``dx_type`` (how the diagnosis was confirmed), which leaks the label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.data.clinical import FIELDS  # noqa: F401 - the fields the prior reads
from skinlesion.data.sources.contract import clean_age
from skinlesion.errors import SkinLesionError

MISSING = {"", "unknown", "nan", "none"}
VERSION = 1


def _text(values: pd.Series) -> pd.Series:
    """Lower-case strings with every spelling of 'not recorded' as ''."""
    s = values.astype("string").fillna("").str.strip().str.lower()
    return s.where(~s.isin(MISSING), "")


def _decade(values: pd.Series) -> pd.Series:
    """Age decade as text ('40' for 40-49); '' when missing or not an age (clean_age: -5, 1e309, -inf)."""
    age, _, _ = clean_age(values)
    return pd.Series(
        np.where(age.isna(), "", (age.fillna(0) // 10 * 10).astype(int).astype(str)), index=values.index
    )


def features(table: pd.DataFrame) -> pd.DataFrame:
    """The categorical features of each row: age decade, sex, body site ('' = not known)."""
    empty = pd.Series([""] * len(table), index=table.index)
    return pd.DataFrame(
        {
            "age_decade": _decade(table["age"]) if "age" in table else empty,
            "sex": _text(table["sex"]) if "sex" in table else empty,
            "localization": _text(table["localization"]) if "localization" in table else empty,
        }
    )


def encode(table: pd.DataFrame, categories: Mapping[str, Sequence[str]]) -> np.ndarray:
    """One-hot rows over the fitted categories; an unknown or unseen value is all zeros for its field."""
    feats = features(table)
    blocks = [(feats[name].to_numpy()[:, None] == np.asarray(cats, dtype=object)[None, :]) for name, cats in
              categories.items()]  # fmt: skip
    return np.concatenate(blocks, axis=1).astype(np.float64) if blocks else np.zeros((len(table), 0))


def known(table: pd.DataFrame, model: Mapping[str, Any] | None = None) -> np.ndarray:
    """Rows with at least one of age, sex, site recorded -- with ``model``: recorded with a value the prior
    was fitted on (the rows whose offset is not 0)."""
    if model is not None:
        return encode(table, model["categories"]).any(axis=1)
    return (features(table) != "").any(axis=1).to_numpy()


def fit(train: pd.DataFrame, classes: Sequence[str], c: float = 1.0) -> dict[str, Any]:
    """Fit p(class | age decade, sex, site) on training rows; a JSON-able model for ``offsets``."""
    from sklearn.linear_model import LogisticRegression

    feats = features(train)
    categories = {name: sorted(v for v in feats[name].unique() if v) for name in feats.columns}
    x = encode(train, categories)
    has = x.sum(1) > 0
    if not has.any():
        raise SkinLesionError(
            "no age, sex or localization in the training metadata; the metadata prior needs a HAM10000-style "
            "metadata CSV with those columns"
        )
    y = train["dx"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    present = sorted(set(y.tolist()))
    if len(present) < 2:
        raise SkinLesionError("the metadata prior needs at least two classes in the training rows")
    model = LogisticRegression(C=c, max_iter=2000).fit(x, y)
    coef = np.zeros((len(classes), x.shape[1]))
    intercept = np.zeros(len(classes))
    if len(model.classes_) == 2:  # one logit row (for classes_[1] against classes_[0]): the same softmax
        coef[model.classes_[1]], intercept[model.classes_[1]] = model.coef_[0], model.intercept_[0]
    else:
        for row, k in enumerate(model.classes_):
            coef[k], intercept[k] = model.coef_[row], model.intercept_[row]
    counts = np.bincount(y, minlength=len(classes)).astype(np.float64)
    return {
        "version": VERSION,
        "classes": list(classes),
        "fitted_classes": [classes[k] for k in present],
        "categories": categories,
        "coef": coef.tolist(),
        "intercept": intercept.tolist(),
        "log_prior": np.log(np.maximum(counts, 1.0) / counts.sum()).tolist(),
        "c": float(c),
        "n_fit": int(len(train)),
        "n_fit_with_metadata": int(has.sum()),
    }


def offsets(model: Mapping[str, Any], table: pd.DataFrame) -> np.ndarray:
    """(N, classes) log p(y | metadata) - log p(y), added to the image logits; 0 for classes the prior
    was not fit on and for rows with no known field."""
    x = encode(table, model["categories"])
    fitted = np.isin(np.asarray(model["classes"]), np.asarray(model["fitted_classes"]))
    z = x @ np.asarray(model["coef"]).T + np.asarray(model["intercept"])
    z = np.where(fitted, z, -np.inf)
    log_p = z - np.logaddexp.reduce(z[:, fitted], axis=1, keepdims=True)
    out = np.where(fitted, log_p - np.asarray(model["log_prior"]), 0.0)
    out[x.sum(1) == 0] = 0.0
    return out


def summary(model: Mapping[str, Any]) -> str:
    cats = model["categories"]
    return (
        f"metadata prior fit on {model['n_fit_with_metadata']}/{model['n_fit']} training images "
        f"({len(cats['age_decade'])} age decades, {len(cats['sex'])} sexes, {len(cats['localization'])} sites)"
    )
