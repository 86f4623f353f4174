"""skinlesion: train, evaluate, explain and serve dermatoscopic skin-lesion classifiers.

``skinlesion.load(run_dir)`` is the Python API (skinlesion/api.py); it is imported on first use, so
``import skinlesion`` stays light.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("load", "Classifier", "DecisionChain", "Decisions"):
        from skinlesion import api

        return getattr(api, name)
    raise AttributeError(f"module 'skinlesion' has no attribute {name!r}")
