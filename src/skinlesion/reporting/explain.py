"""Class activation maps (pytorch-grad-cam) of one image, titled with the decision chain's decision.

The target layer is found automatically: for CNNs, the module whose output *is* the tensor that
``forward_features`` returns (the last feature map before global pooling: EfficientNet ``bn2``,
ResNet ``layer4``, ConvNeXt ``stages[-1]``, DenseNet ``features``); for ViTs, the last block's
``norm1`` with its tokens reshaped onto the patch grid (class / register tokens dropped).
The map is shown on the image as the model sees it (the run's preprocessing: resized and centre-cropped).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from skinlesion import fileio
from skinlesion.classes import FULL_NAMES
from skinlesion.errors import SkinLesionError
from skinlesion.inference.classifier import Classifier
from skinlesion.model.ensemble import Ensemble

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}


def vit_reshape(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, prefix + H*W, C) tokens -> (B, C, H, W) feature map, the patch grid taken from the model."""
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]
        n = patches.shape[1]
        h, w = grid if grid is not None and grid[0] * grid[1] == n else (math.isqrt(n), n // math.isqrt(n))
        if h * w != n:
            raise SkinLesionError(f"cannot lay {n} ViT patch tokens on a grid; Grad-CAM needs a square patch grid")
        return patches.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)

    return reshape


# Below this many cells on a side a CNN's last feature map is too coarse to show where in the image it looks.
MIN_CAM_SIDE = 7


def target_layer(model: nn.Module, img_size: int) -> tuple[nn.Module, Callable | None]:
    """The layer to explain and the reshape transform it needs (None for CNN feature maps): the last feature map,
    or for a small input the deepest feature stage at least MIN_CAM_SIDE cells on a side."""
    blocks = getattr(model, "blocks", None)
    if (
        hasattr(model, "patch_embed")
        and isinstance(blocks, nn.Sequential | nn.ModuleList)
        and hasattr(blocks[-1], "norm1")
    ):
        return blocks[-1].norm1, vit_reshape(model)
    outputs: dict[nn.Module, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, _i, out: outputs.setdefault(mod, out)) for m in model.modules()]
    try:
        param = next(model.parameters())
        with torch.no_grad():
            features = model.forward_features(torch.zeros(1, 3, img_size, img_size, device=param.device))
    finally:
        for h in hooks:
            h.remove()
    if features.ndim != 4:
        raise SkinLesionError(f"no 2-D feature map in {type(model).__name__}; Grad-CAM supports timm CNNs and ViTs")
    if min(features.shape[-2:]) < MIN_CAM_SIDE:
        # A small input (128 px: a 4x4 last map, the same centred blob for every image): explain the deepest of
        # timm's feature stages whose map is still at least MIN_CAM_SIDE on a side.
        stages = [model.get_submodule(f["module"]) for f in getattr(model, "feature_info", []) if f.get("module")]
        finer = [m for m in stages if isinstance(outputs.get(m), torch.Tensor) and outputs[m].ndim == 4
                 and min(outputs[m].shape[-2:]) >= MIN_CAM_SIDE]  # fmt: skip
        if finer:
            return finer[-1], None
    # The outermost module producing exactly that tensor (outer modules' hooks fire after inner ones');
    # pass-through Identity modules (e.g. ConvNeXt's norm_pre) are skipped for a layer name that means something.
    producers = [
        m for m, out in outputs.items() if out is features and m is not model and not isinstance(m, nn.Identity)
    ]
    if not producers:
        raise SkinLesionError(f"could not find the last feature layer of {type(model).__name__}")
    return producers[-1], None


@dataclass
class Explanation:
    rgb: np.ndarray  # (H, W, 3) float in [0, 1]: the image as the model sees it
    cam: np.ndarray  # (H, W) in [0, 1]
    probs: np.ndarray  # calibrated class probabilities
    predicted: str
    target: str
    classes: list[str]
    grid: tuple[int, int] = (0, 0)  # cells of the explained feature map (the map's real resolution)
    names: dict[str, str] | None = None  # the classes' full names

    @property
    def coarse(self) -> bool:
        return 0 < min(self.grid) < MIN_CAM_SIDE

    def resolution(self) -> str:
        """'map from a 8x8 feature grid' (+ ', coarse' below MIN_CAM_SIDE), for titles and the web page."""
        h, w = self.grid
        return f"map from a {h}x{w} feature grid" + (" (coarse: blurred over large areas)" if self.coarse else "")


def target_layers(model: nn.Module, img_size: int) -> tuple[list[nn.Module], Callable | None]:
    """``target_layer`` of a network, or of every member of an ensemble (pytorch-grad-cam averages the maps of
    several layers, each resized to the input: the ensemble's map is its members' mean)."""
    if not isinstance(model, Ensemble):
        layer, reshape = target_layer(model, img_size)
        return [layer], reshape
    found = [target_layer(member, size) for member, size in zip(model.members, model.sizes, strict=True)]
    if any(reshape is not None for _, reshape in found):
        raise SkinLesionError("Grad-CAM of an ensemble needs CNN members (ViT tokens need their own reshape)")
    return [layer for layer, _ in found], None


# Finding the layer costs a forward pass; it is kept per model (e.g. the server's, asked many times).
_TARGETS: weakref.WeakKeyDictionary[nn.Module, tuple[list[nn.Module], Callable | None]] = weakref.WeakKeyDictionary()


def explain(
    classifier: Classifier,
    image: Image.Image,
    target_class: str | None = None,
    method: str = "gradcam",
    clinical: pd.DataFrame | None = None,
) -> Explanation:
    """Grad-CAM of one image with a torch-backend classifier. The predicted class and the shown probabilities are
    the decision chain's (``clinical``, one row of age / sex / site, for the metadata prior: a per-image constant,
    it does not change the map of a given class)."""
    if method not in METHODS:
        raise SkinLesionError(f"unknown --method {method!r}; choose from {', '.join(METHODS)}")
    if target_class is not None and target_class not in classifier.classes:
        raise SkinLesionError(f"unknown --target-class {target_class!r}; choose from {', '.join(classifier.classes)}")
    backend, chain, preprocessing = classifier.backend, classifier.chain, classifier.preprocessing
    model = backend.model
    view = preprocessing.batch([image])  # uint8: what the network sees, and what the map is shown on
    decided = chain(backend.view_logits(view, 1), chain.offsets(clinical))
    x = backend.normalize(view)
    probs, predicted = decided.probabilities[0], decided.names[0]
    target = target_class or predicted
    if model not in _TARGETS:
        _TARGETS[model] = target_layers(model, preprocessing.img_size)
    layers, reshape = _TARGETS[model]
    grids = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: grids.append(tuple(out.shape[-2:]))) for layer in layers]
    try:
        with torch.inference_mode(False), torch.enable_grad(), METHODS[method](model, layers, reshape) as cam:
            grey = cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(chain.classes.index(target))])[0]
    finally:
        for hook in hooks:
            hook.remove()
    grid = min(grids) if grids and reshape is None else (0, 0)
    rgb = view[0].permute(1, 2, 0).numpy().astype(np.float32) / 255.0
    return Explanation(rgb, grey, probs, predicted, target, list(chain.classes), grid, classifier.class_names)


def title(exp: Explanation) -> str:
    top = np.argsort(exp.probs)[::-1][:3]
    top3 = ", ".join(f"{exp.classes[i]} {exp.probs[i]:.2f}" for i in top)
    names = exp.names or FULL_NAMES
    text = f"Predicted: {names.get(exp.predicted, exp.predicted)} ({exp.predicted})   top-3: {top3}"
    if exp.target != exp.predicted:
        text += f"\nmap for: {names.get(exp.target, exp.target)} ({exp.target})"
    if min(exp.grid):
        text += f"\n{exp.resolution()}"
    return text


def figure(exp: Explanation, path: str | Path, method: str = "gradcam") -> Path:
    """image | heatmap | overlay, titled with the prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overlay = show_cam_on_image(exp.rgb, exp.cam, use_rgb=True)
    fig, axes = plt.subplots(1, 3, figsize=(10, 4.4))
    for ax, img, name in zip(axes, (exp.rgb, exp.cam, overlay), ("image", f"{method} heatmap", "overlay"), strict=True):
        ax.imshow(img, cmap="jet" if img.ndim == 2 else None, vmin=0, vmax=1 if img.ndim == 2 else None)
        ax.set_title(name, fontsize=12)
        ax.axis("off")
    fig.suptitle(title(exp), fontsize=11)
    fig.tight_layout()
    fileio.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return Path(path)
