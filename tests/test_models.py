"""models.py: local ImageNet weights in both key formats, shape checks, normalisation."""

from __future__ import annotations

import pytest
import timm
import torch
from matplotlib import cbook
from PIL import Image

from skinlesion.data.preprocessing import Preprocessing
from skinlesion.errors import SkinLesionError
from skinlesion.model.factory import (
    create_model,
    lite0_weights_path,
    normalisation,
    packaged_backbone,
    packaged_weights_path,
    read_state_dict,
)

# Grace Hopper in uniform (the photo bundled with matplotlib). ImageNet classes seen in the top 5 of genuine
# Lite0 weights: 400 academic gown, 457 bow tie, 652 military uniform, 667 mortarboard, 834 suit, 906 Windsor tie.
UNIFORM_LIKE = {400, 457, 652, 667, 834, 887, 906}


@pytest.fixture(scope="module")
def lite0_state():
    return read_state_dict(lite0_weights_path())


@pytest.mark.parametrize("name", ["lite0", "lite1", "lite2"])
def test_packaged_lite_weights_are_imagenet(name):
    """Each EfficientNet-PyTorch file maps onto timm tf_efficientnet_liteN and recognises a photo."""
    path = packaged_weights_path(name)
    state = read_state_dict(path)
    assert len(state) == {"lite0": 296, "lite1": 386, "lite2": 386}[name]  # backbone + the ImageNet classifier
    model = create_model(packaged_backbone(name), num_classes=1000, weights=path).eval()
    model.classifier.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    mean, std = normalisation(model)
    assert mean == std == (0.5, 0.5, 0.5)  # the TF-ported Lite models' normalisation
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        image = Image.open(f).convert("RGB")
    with torch.inference_mode():
        prep = Preprocessing(224, 257, mean, std)
        top5 = model(prep.normalizer()(prep.batch([image]))).topk(5).indices[0].tolist()
    assert 652 in top5  # military uniform
    assert top5[0] in UNIFORM_LIKE


def test_efficientnet_pytorch_shape_mismatch_names_the_first_bad_key(lite0_state, tmp_path):
    state = dict(lite0_state)
    state["_blocks.3._project_conv.weight"] = state["_blocks.3._project_conv.weight"][:-1]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(SkinLesionError, match=r"first mismatching key _blocks\.3\._project_conv\.weight"):
        create_model("tf_efficientnet_lite0", weights=tmp_path / "bad.pth")
    with pytest.raises(SkinLesionError, match="tf_efficientnet_lite0"):  # wrong architecture altogether
        create_model("efficientnet_b0", weights=lite0_weights_path())


def test_timm_format_weights_load_without_their_head_and_mismatches_fail(tmp_path):
    donor = timm.create_model("test_efficientnet", num_classes=1000)
    torch.save({"state_dict": {f"module.{k}": v for k, v in donor.state_dict().items()}}, tmp_path / "w.pth")
    model = create_model("test_efficientnet", weights=tmp_path / "w.pth")
    torch.testing.assert_close(model.conv_stem.weight, donor.conv_stem.weight)
    assert model.get_classifier().out_features == 7
    with pytest.raises(SkinLesionError, match="conv_stem.weight"):
        create_model("efficientnet_b0", weights=tmp_path / "w.pth")
    with pytest.raises(SkinLesionError, match="not found"):
        create_model("test_efficientnet", weights=tmp_path / "missing.pth")


def test_weights_lite_alone_picks_its_backbone():
    from skinlesion.cli import build_parser
    from skinlesion.commands.train import train_options
    from skinlesion.training.builders import weights_path

    def resolve_config(args):
        return train_options(args)[0].resolved()

    for name in ("lite1", "lite2"):
        cfg = resolve_config(build_parser().parse_args(["train", "--weights", name]))
        assert cfg.backbone == f"tf_efficientnet_{name}"
        assert weights_path(name) == str(packaged_weights_path(name))
    cfg = resolve_config(build_parser().parse_args(["train", "--weights", "lite1", "--backbone", "efficientnet_b0"]))
    assert cfg.backbone == "efficientnet_b0"  # an explicit --backbone wins (and fails loudly if it does not fit)
