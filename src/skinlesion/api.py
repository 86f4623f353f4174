"""The public Python API: everything the command line does, with the same numbers.

    import skinlesion

    config = skinlesion.TrainConfig(data_dir="archive", backbone="tf_efficientnet_lite0", weights="lite0",
                                    img_size=128, epochs=5, out="outputs", run_name="demo")
    run_dir = skinlesion.train(config)                       # = skinlesion train ... (recipe post-hoc steps included)
    result = skinlesion.evaluate(run_dir, tta=True)          # = skinlesion evaluate --run-dir ... --tta
    result.metrics["balanced_accuracy"]["value"]             # metrics.json; result.predictions = predictions.csv
    model = skinlesion.load(run_dir)                         # best.pt (PyTorch) or ".../model.onnx" (ONNX Runtime)
    model.predict_files(["a.jpg", "b.jpg"], tta=True)        # a DataFrame, one row per file (errors as rows)
    model.predict([image], clinical=..., lesion_ids=...)     # Decisions: probabilities, labels, names

Recipes: ``skinlesion.RECIPES["improved"].replace(data_dir=..., epochs=...)``. The chain's settings:
``model.chain``; ``model.with_chain(operating_point=None)`` and the like switch a step off.
"""

from __future__ import annotations

from pathlib import Path

from skinlesion.data.preprocessing import Preprocessing
from skinlesion.decision.chain import DecisionChain, Decisions
from skinlesion.evaluation.evaluate import EvalResult, ExternalSet, evaluate
from skinlesion.evaluation.pipeline import train as _train
from skinlesion.inference.classifier import Classifier
from skinlesion.inference.options import ScoringOptions
from skinlesion.training.config import TrainConfig
from skinlesion.training.recipes import RECIPES

__all__ = ["RECIPES", "Classifier", "DecisionChain", "Decisions", "EvalResult", "ExternalSet", "Preprocessing",
           "ScoringOptions", "TrainConfig", "evaluate", "load", "train"]  # fmt: skip


def load(source: str | Path, backend: str | None = None, device: str = "cpu") -> Classifier:
    """A run folder or a best.pt (PyTorch), or a model.onnx (ONNX Runtime); ``backend`` picks for a run folder."""
    source = Path(source)
    chosen = backend or ("onnx" if source.suffix == ".onnx" else "torch")
    return Classifier.load(source, chosen, device)


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train the run ``config`` describes, with its recipe's post-hoc steps (``skinlesion train``); its run folder.
    ``resume``: continue ``config.out / config.run_name`` from last.pt (options that differ from the recipe must
    be ones --resume may change)."""
    return _train(config, resume=resume)
