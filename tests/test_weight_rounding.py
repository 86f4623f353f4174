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



def small_qdq_graph(tmp_path):
    """A hand-built graph with a dilated strided depthwise, a grouped convolution with uneven padding, a strided
    pointwise and one weight read by two convolutions, quantized by ONNX Runtime with the product's settings."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    rng = np.random.default_rng(0)
    weights = {"w1": (8, 3, 3, 3), "w2": (8, 1, 3, 3), "w3": (8, 4, 3, 3), "w4": (16, 8, 1, 1),
               "shared": (16, 16, 1, 1)}  # fmt: skip
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n) for n, s in weights.items()]
    conv = helper.make_node
    nodes = [conv("Conv", ["x", "w1"], ["c1"], name="c1", pads=[1, 1, 1, 1]), conv("Relu", ["c1"], ["r1"]),
             conv("Conv", ["r1", "w2"], ["c2"], name="c2", group=8, pads=[2, 2, 2, 2], dilations=[2, 2],
                  strides=[2, 2]), conv("Relu", ["c2"], ["r2"]),
             conv("Conv", ["r2", "w3"], ["c3"], name="c3", group=2, pads=[0, 1, 1, 0]), conv("Relu", ["c3"], ["r3"]),
             conv("Conv", ["r3", "w4"], ["c4"], name="c4", strides=[2, 2]), conv("Relu", ["c4"], ["r4"]),
             conv("Conv", ["r4", "shared"], ["c5"], name="c5"), conv("Sigmoid", ["r4"], ["s4"]),
             conv("Conv", ["s4", "shared"], ["c6"], name="c6"), conv("Add", ["c5", "c6"], ["a"]),
             conv("GlobalAveragePool", ["a"], ["y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 24, 20])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fp32, prepared, int8 = tmp_path / "m.onnx", tmp_path / "prepared.onnx", tmp_path / "int8.onnx"
    onnx.save(model, str(fp32))
    quant_pre_process(str(fp32), str(prepared))
    batches = [rng.standard_normal((8, 3, 24, 20)).astype(np.float32) for _ in range(4)]
    feed = iter(batches)

    class Reader:
        def get_next(self):
            batch = next(feed, None)
            return None if batch is None else {"x": batch}

    quantize_static(str(prepared), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)  # fmt: skip
    fp32_weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(prepared)).graph.initializer}
    return fp32, onnx.load(str(int8)), fp32_weights, batches


def test_round_weights_on_dilated_grouped_and_shared_convolutions(tmp_path):
    """Without moving errors (huge damping) round_weights writes exactly ONNX Runtime's integers (same scales, sign
    and range); with GPTQ a weight read by two convolutions is rounded for both inputs together, and the graph's
    output gets closer to fp32."""
    import copy

    fp32, model, fp32_weights, batches = small_qdq_graph(tmp_path)
    convs = weight_rounding.quantized_convs(model, fp32_weights)
    assert sorted(c.node.name for c in convs) == ["c1", "c2", "c3", "c4", "c5", "c6"]
    ints = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_quantized")}

    unmoved = copy.deepcopy(model)
    assert weight_rounding.round_weights(unmoved, fp32_weights, batches, "x", -64, 64, damping=1e9) == 5  # 5 weights
    for t in unmoved.graph.initializer:
        if t.name in ints:
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), ints[t.name])

    rounded = copy.deepcopy(model)
    weight_rounding.round_weights(rounded, fp32_weights, batches, "x", -64, 64)
    moments = weight_rounding.input_moments(model, convs, batches, "x")
    c5, c6 = (next(i for i, c in enumerate(convs) if c.node.name == n) for n in ("c5", "c6"))
    w = torch.from_numpy(convs[c5].fp32_weight.reshape(16, -1))
    both = weight_rounding.gptq(w, moments[c5][0] + moments[c6][0], torch.from_numpy(convs[c5].scale), -64, 64)
    written = next(t for t in rounded.graph.initializer if t.name == convs[c5].weight_name)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(written).reshape(16, -1), both.numpy().astype(np.int8))

    x = np.random.default_rng(1).standard_normal((32, 3, 24, 20)).astype(np.float32)
    reference = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    def error(m) -> float:
        y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        return float(((reference - y) ** 2).sum())

    assert error(rounded) < error(model)
