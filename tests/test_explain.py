"""Grad-CAM: automatic target layers (CNNs, ViTs with prefix tokens), the map lies on the lesion,
EXIF orientation and any image size handled, the CLI figure is written."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from scipy.ndimage import binary_dilation

from skinlesion.classes import CLASSES
from skinlesion.cli import main
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.data.synth import draw_lesion
from skinlesion.decision.chain import DecisionChain
from skinlesion.inference.classifier import Classifier
from skinlesion.inference.torch_backend import TorchBackend
from skinlesion.model import checkpoint
from skinlesion.reporting.explain import explain, target_layer, title

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SIZE = 64


def _predictor(model: torch.nn.Module, img_size: int, backbone: str = "x") -> Classifier:
    meta = {
        "backbone": backbone,
        "img_size": img_size,
        "resize_size": img_size,
        "mean": MEAN,
        "std": STD,
        "classes": list(CLASSES),
        "temperature": 1.0,
    }
    return Classifier(TorchBackend(checkpoint.Loaded(model.eval(), meta)), DecisionChain.from_meta(meta))


def _name(model, layer) -> str:
    return next(n for n, m in model.named_modules() if m is layer)


@pytest.mark.parametrize(
    ("backbone", "size", "expected"),
    [("efficientnet_b0", 224, "bn2"), ("resnet18", 224, "layer4"), ("test_convnext", 224, "stages"),
     # Small inputs: the last map would be 2x2, so the deepest stage with at least 7x7 cells is explained.
     ("efficientnet_b0", 64, "blocks.2"), ("resnet18", 64, "layer2"), ("test_convnext", 64, "stages.1")],
)  # fmt: skip
def test_cnn_target_layer_is_the_last_map_fine_enough_to_show_something(backbone, size, expected):
    model = timm.create_model(backbone, pretrained=False, num_classes=7).eval()
    layer, reshape = target_layer(model, size)
    assert _name(model, layer) == expected and reshape is None


def test_maps_of_two_different_images_differ_and_say_their_resolution(tiny_run):
    """tiny_run works at 64 px: its last feature map is 2x2 (one blob for every image); the explained stage is 8x8."""
    classifier = Classifier.load(tiny_run)
    rng = np.random.default_rng(3)
    images = [draw_lesion(c, (96, 72), rng, center=centre)[0] for c, centre in (("mel", (25, 20)), ("nv", (70, 50)))]
    first, second = (explain(classifier, im, target_class="mel") for im in images)
    assert first.grid == second.grid == (8, 8) and not first.coarse
    assert np.abs(first.cam - second.cam).mean() > 0.05
    assert "8x8 feature grid" in title(first)


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_vit_target_layer_and_reshape(reg_tokens):
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=7, reg_tokens=reg_tokens
    )
    layer, reshape = target_layer(model, 64)
    assert layer is model.blocks[-1].norm1
    tokens = torch.randn(2, model.num_prefix_tokens + 16, 32)
    fmap = reshape(tokens)
    assert fmap.shape == (2, 32, 4, 4)
    # Patch token i lands at grid cell (i // 4, i % 4); prefix tokens are dropped.
    assert torch.equal(fmap[1, :, 2, 3], tokens[1, model.num_prefix_tokens + 11])
    exp = explain(_predictor(model, 64), Image.new("RGB", (90, 70), (200, 150, 120)), method="gradcam")
    assert exp.cam.shape == (64, 64) and exp.rgb.shape == (64, 64, 3)
    assert exp.cam.min() >= 0 and exp.cam.max() <= 1


@pytest.fixture(scope="module")
def lesion_model():
    """A small CNN trained for a few steps on synthetic lesions at random positions. Output stride 8
    (dilated last stages) gives an 8x8 map at 64 px, fine enough to tell lesion from background."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=7, output_stride=8)
    images = [(draw_lesion(c, (SIZE, SIZE), rng)[0], i) for i, c in enumerate(CLASSES) for _ in range(16)]
    prep = Preprocessing(SIZE, SIZE, tuple(MEAN), tuple(STD))
    augment, normalize = prep.train_transform("reference"), prep.normalizer()
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    model.train()
    for _ in range(4):
        order = rng.permutation(len(images))
        for b in range(0, len(order), 16):
            batch = [images[i] for i in order[b : b + 16]]
            x = normalize(torch.stack([augment(prep.pixels(im)) for im, _ in batch]))
            loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([y for _, y in batch]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return _predictor(model, SIZE, "resnet10t")


@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
def test_cam_lies_on_the_lesion(lesion_model, method):
    rng = np.random.default_rng(7)
    inside, outside, peaks = [], [], []
    for k in range(7):
        # Off-centre lesions, so a map that ignores the image (or swaps x and y) cannot pass by luck.
        centre = tuple(rng.uniform(0.25, 0.75, 2) * SIZE)
        image, mask = draw_lesion(CLASSES[k], (SIZE, SIZE), rng, center=centre)
        exp = explain(lesion_model, image, method=method)
        shown = lesion_model.preprocessing.model_view(Image.fromarray(mask.astype(np.uint8) * 255))
        m = shown[..., 0] > 127
        dilated = binary_dilation(m, iterations=4)
        inside.append(exp.cam[m].mean())
        outside.append(exp.cam[~m].mean())
        peaks.append(dilated.flat[exp.cam.argmax()])
    assert np.mean(inside) > 1.5 * np.mean(outside)
    assert np.mean(peaks) >= 5 / 7


def test_exif_orientation_and_any_size(tiny_run, tmp_path, capsys):
    predictor = Classifier.load(tiny_run)
    rng = np.random.default_rng(3)
    upright, _ = draw_lesion("mel", (150, 100), rng, center=(40.0, 30.0))
    # Stored sideways with an EXIF tag saying "rotate 90° clockwise to display".
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.png"
    stored.save(path, exif=exif)
    from skinlesion.data.images import open_rgb

    shown = open_rgb(path)
    assert shown.size == upright.size
    np.testing.assert_allclose(explain(predictor, shown).probs, explain(predictor, upright).probs, atol=1e-5)

    out = tmp_path / "cam.png"
    args = [
        "gradcam",
        "--run-dir",
        str(tiny_run),
        "--image",
        str(path),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--method",
        "gradcam++",
        "--target-class",
        "df",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    exp = explain(predictor, upright, target_class="df")
    assert title(exp).split("\n")[0] in printed and "Dermatofibroma" in printed
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 2 * im.height  # image | heatmap | overlay side by side

    assert main(["gradcam", "--run-dir", str(tiny_run), "--image", str(path), "--target-class", "xyz"]) == 2
