"""An ensemble is a model like any other: one nn.Module whose logits are the mean of its members' logits.

Members may differ in backbone, image size and normalisation. The ensemble's input is the eval crop at the
largest member's size; a smaller member gets that crop resized (antialiased) to its own size. Every size
uses resize = round(size * 257 / 224) before its centre crop, so the field of view is the same. Inputs are
normalised again for members with another mean / std. All of it sits inside the graph, so the torch and ONNX
backends, TTA views, Grad-CAM and export treat an ensemble exactly like one network; the decision chain
(temperature, prior, operating point, pooling) comes after the average, as for any run.

In a checkpoint: ``backbone`` is ``"ensemble"``, ``members`` lists each member's architecture and
preprocessing (``MEMBER_KEYS``) and ``model`` is this module's state dict (``members.<i>.<key>``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ENSEMBLE = "ensemble"
MEMBER_KEYS = ("backbone", "num_classes", "model_kwargs", "img_size", "resize_size", "mean", "std")


class Ensemble(nn.Module):
    def __init__(
        self,
        members: Sequence[nn.Module],
        specs: Sequence[Mapping[str, Any]],
        mean: Sequence[float],
        std: Sequence[float],
    ):
        super().__init__()
        if not members or len(members) != len(specs):
            raise ValueError("an ensemble needs one spec per member, and at least one member")
        self.members = nn.ModuleList(members)
        self.sizes = [int(s["img_size"]) for s in specs]
        self.img_size = max(self.sizes)
        mean_in, std_in = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.renormalise = []
        # x_member = (x * std_in + mean_in - mean_m) / std_m = x * scale + shift
        for i, s in enumerate(specs):
            mean_m, std_m = torch.tensor(s["mean"]).view(1, 3, 1, 1), torch.tensor(s["std"]).view(1, 3, 1, 1)
            self.register_buffer(f"scale_{i}", std_in / std_m, persistent=False)
            self.register_buffer(f"shift_{i}", (mean_in - mean_m) / std_m, persistent=False)
            self.renormalise.append(not (torch.equal(mean_in, mean_m) and torch.equal(std_in, std_m)))

    def member_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        size = self.sizes[i]
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if self.renormalise[i]:
            x = x * getattr(self, f"scale_{i}") + getattr(self, f"shift_{i}")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = [member(self.member_input(i, x)) for i, member in enumerate(self.members)]
        return torch.stack(logits).mean(0)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's pooled features (before its classifier), side by side."""
        return torch.cat([pooled_features(m, self.member_input(i, x)) for i, m in enumerate(self.members)], dim=1)


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled features a timm network's classifier reads (``forward_head(pre_logits=True)``), or an ensemble's
    members' side by side."""
    if isinstance(model, Ensemble):
        return model.pooled_features(x)
    return model.forward_head(model.forward_features(x), pre_logits=True)


def member_spec(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """What the ensemble keeps of a member's checkpoint to rebuild and feed it."""
    spec = {k: ckpt[k] for k in MEMBER_KEYS if k in ckpt}
    spec.setdefault("model_kwargs", {})
    spec["num_classes"] = int(ckpt.get("num_classes", len(ckpt["classes"])))
    return spec


def build(
    specs: Sequence[Mapping[str, Any]], mean: Sequence[float], std: Sequence[float], architecture: Callable
) -> Ensemble:
    """The ensemble (without weights) from member specs; ``architecture`` builds one member from its spec."""
    return Ensemble([architecture(s) for s in specs], specs, mean, std)


def input_normalisation(specs: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """The ensemble's input mean / std: the largest member's (it is fed as is)."""
    largest = max(specs, key=lambda s: int(s["img_size"]))
    return list(largest["mean"]), list(largest["std"])


def combined_state(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Members' state dicts as the ensemble's (``members.<i>.<key>``)."""
    return {f"members.{i}.{k}": v for i, state in enumerate(states) for k, v in state.items()}
