"""GPTQ rounding of the INT8 graph's convolution weights (inference/weight_rounding.py): the input moments it uses
are the convolution's own, it lowers the layer's output error against nearest rounding, and `export --int8` writes
files whose logits are closer to fp32 than ONNX Runtime's nearest rounding."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from skinlesion.inference import quantize, weight_rounding
from skinlesion.model import checkpoint


def conv_spec(shape: tuple[int, ...], group: int, stride: int, pads: tuple[int, int, int, int]):
    return weight_rounding.QuantizedConv(None, "w", np.ones(shape[0]), np.zeros(shape), group, shape[2:],
                                         (stride, stride), (1, 1), pads)  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "group", "stride", "pads"),
    [
        ((6, 4, 1, 1), 1, 1, (0, 0, 0, 0)),  # pointwise
        ((6, 4, 1, 1), 1, 2, (0, 0, 0, 0)),  # pointwise, strided
        ((4, 1, 3, 3), 4, 1, (1, 1, 1, 1)),  # depthwise
        ((4, 1, 5, 5), 4, 2, (1, 2, 2, 1)),  # depthwise, strided, TF-"same" style uneven padding
        ((6, 2, 3, 3), 2, 1, (0, 1, 1, 0)),  # grouped
    ],
)
def test_input_moments_give_each_output_channels_energy(shape, group, stride, pads):
    """wᵀ H w equals the squared output of the convolution, per output channel: H is built from the receptive fields
    the layer really sees (padding, stride, groups in ONNX order)."""
    torch.manual_seed(0)
    x = torch.randn(3, shape[1] * group, 11, 9)
    w = torch.randn(shape, dtype=torch.float64)
    moments = weight_rounding._moments(conv_spec(shape, group, stride, pads), x)
    top, left, bottom, right = pads
    y = F.conv2d(F.pad(x.double(), (left, right, top, bottom)), w, stride=stride, groups=group)
    per_group = shape[0] // group
    for row in range(shape[0]):
        flat = w[row].reshape(-1)
        assert float(flat @ moments[row // per_group] @ flat) == pytest.approx(float((y[:, row] ** 2).sum()), rel=1e-5)


def test_gptq_lowers_the_layer_output_error_and_stays_on_the_grid():
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((48, 48)) * (rng.random(48) ** 3)  # correlated inputs of unequal size
    x = torch.from_numpy(mixing @ rng.standard_normal((48, 4000)))
    w = torch.from_numpy(rng.standard_normal((16, 48)))
    scale = w.abs().amax(1) / 64
    h = x @ x.T
    nearest = torch.clamp(torch.round(w / scale[:, None]), -64, 64)
    q = weight_rounding.gptq(w, h, scale, -64, 64)
    assert torch.equal(q, torch.round(q)) and q.abs().max() <= 64

    def error(ints):
        return float((((w - ints * scale[:, None]) @ x) ** 2).sum())

    assert error(q) < 0.6 * error(nearest)
    # one H per row (a depthwise layer) gives each row what the shared H gives it
    assert torch.equal(weight_rounding.gptq(w, h.expand(16, 48, 48), scale, -64, 64), q)


@pytest.fixture(scope="module")
def calibration(onnx_run):
    files = quantize.calibration_table(onnx_run, 64, seed=3)["path"].tolist()
    preprocessing = checkpoint.load(onnx_run).preprocessing
    return files, preprocessing


def test_gptq_file_is_closer_to_fp32_than_nearest(onnx_run, calibration):
    """On the real efficientnet_b0 graph: the same scales and QDQ layout, other integers, logits closer to fp32 on
    the calibration images (what GPTQ minimises layer by layer)."""
    files, preprocessing = calibration

    images = quantize.CalibrationImages(files, preprocessing)
    fp32 = onnx_run / "model.onnx"
    graphs = {how: quantize.quantize_file(fp32, images, rounding=how) for how in weight_rounding.ROUNDINGS}
    x = np.concatenate(list(images))
    reference = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]

    def sqnr(graph: bytes) -> float:
        y = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        return float(10 * np.log10((reference**2).sum() / ((reference - y) ** 2).sum()))

    gained = sqnr(graphs["gptq"]) - sqnr(graphs["nearest"])
    print(f"GPTQ over nearest: {gained:+.1f} dB")
    assert gained > 1.0
    models = {how: onnx.load_from_string(g) for how, g in graphs.items()}
    weights = {how: {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
               for how, m in models.items()}  # fmt: skip
    assert weights["gptq"].keys() == weights["nearest"].keys()
    assert [n.op_type for n in models["gptq"].graph.node] == [n.op_type for n in models["nearest"].graph.node]
    int8 = [k for k, v in weights["gptq"].items() if v.dtype == np.int8 and v.ndim == 4]
    assert sum(not np.array_equal(weights["gptq"][k], weights["nearest"][k]) for k in int8) > 0.8 * len(int8)
    for k in int8:
        assert np.abs(weights["gptq"][k].astype(int)).max() <= 64  # reduce_range: 7-bit weights stay 7-bit
        scale = k.removesuffix("_quantized") + "_scale"
        np.testing.assert_array_equal(weights["gptq"][scale], weights["nearest"][scale])

