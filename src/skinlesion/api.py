"""The public Python API: load a run folder (or its model.onnx) and classify images, with exactly the
probabilities and decisions of ``skinlesion predict``.

    import skinlesion

    model = skinlesion.load("outputs/demo")                 # best.pt; "outputs/demo/model.onnx" for ONNX Runtime
    result = model.predict(["a.jpg", "b.jpg"], tta=True)    # files or PIL images
    result.names                                            # ['nv', 'mel']: the decisions
    result.probabilities                                    # (2, 7) calibrated, in model.classes order

Age, sex and site (``clinical=``, a DataFrame with one row per image) feed the metadata prior and lesion ids
(``lesion_ids=``) lesion pooling, when the run has them; ``model.with_chain(operating_point=None)`` and the like
switch a step off. The chain's settings: ``model.chain``.
"""

from __future__ import annotations

from pathlib import Path

from skinlesion.decision.chain import DecisionChain, Decisions
from skinlesion.inference.classifier import Classifier

__all__ = ["Classifier", "DecisionChain", "Decisions", "load"]


def load(source: str | Path, backend: str | None = None, device: str = "cpu") -> Classifier:
    """A run folder or a best.pt (PyTorch), or a model.onnx (ONNX Runtime); ``backend`` picks for a run folder."""
    source = Path(source)
    chosen = backend or ("onnx" if source.suffix == ".onnx" else "torch")
    return Classifier.load(source, chosen, device)
