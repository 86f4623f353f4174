"""skinlesion: train, evaluate, explain and serve dermatoscopic skin-lesion classifiers.

The Python API (skinlesion/api.py): ``skinlesion.TrainConfig``, ``skinlesion.train``, ``skinlesion.evaluate``,
``skinlesion.load``. It is imported on first use, so ``import skinlesion`` stays light.
"""

from typing import Any

__version__ = "0.1.0"
_API = ("RECIPES", "Classifier", "DecisionChain", "Decisions", "EvalResult", "ExternalSet", "Preprocessing",
        "ScoringOptions", "TrainConfig", "evaluate", "load", "train")  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _API:
        from skinlesion import api

        return getattr(api, name)
    raise AttributeError(f"module 'skinlesion' has no attribute {name!r}")
