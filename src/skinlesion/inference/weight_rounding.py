"""The INT8 graph's integer convolution weights, rounded to keep each layer's output (not each weight) close to fp32.

ONNX Runtime's quantizer rounds every weight to its nearest step. Errors of neighbouring weights then add up in the
layer's output; GPTQ (Frantar et al. 2023, the convolution form of Optimal Brain Quantization) instead rounds one
input column at a time and moves the error it made onto the columns not yet rounded, weighted by the inverse of
``H = X Xᵀ``, the layer inputs' second moments on the calibration images. The scales and the integer range stay
ONNX Runtime's (per output channel, symmetric), so the file is the same QDQ graph with other integers in it: on a
Lite0 trained on HAM10000 the logits' SQNR against fp32 went from 20.7 to 28.2 dB on held-out training images
(docs/benchmarks/README.md). ORT's own GPTQ (``matmul_nbits_quantizer``) covers 4-bit MatMul weights only, hence
this module.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

ROUNDINGS = ("gptq", "nearest")  # `export --weight-rounding`: this module's, or ONNX Runtime's own
DAMPING = 0.1  # share of H's mean diagonal added to it (GPTQ's "percdamp"); chosen on held-out training images
UNFOLD_ELEMENTS = 1 << 24  # images unfolded at a time are capped at this many float32 elements (64 MiB)


@dataclass
class QuantizedConv:
    node: Any  # the Conv NodeProto
    weight_name: str  # its int8 weight initializer (DequantizeLinear's input)
    scale: np.ndarray  # per output channel
    fp32_weight: np.ndarray  # (Cout, Cin / group, kH, kW), from the graph that was quantized
    group: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # ONNX order: top, left, bottom, right


def quantized_convs(model: Any, fp32_weights: dict[str, np.ndarray]) -> list[QuantizedConv]:
    """The Conv nodes of a QDQ ``model`` whose weight is a DequantizeLinear of an int8 initializer that was quantized
    from ``fp32_weights[<name>]`` (ORT names it ``<name>_quantized``), symmetric (zero point 0) per output channel
    (axis 0); fp32 convolutions and any other layout are left as ORT rounded them."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    found = []
    for node in model.graph.node:
        dq = producer.get(node.input[1]) if node.op_type == "Conv" else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers:
            continue
        source = fp32_weights.get(dq.input[0].removesuffix("_quantized"))
        scale = numpy_helper.to_array(initializers[dq.input[1]])
        zero = dq.input[2] if len(dq.input) > 2 and dq.input[2] else None
        symmetric = zero is None or (zero in initializers and not numpy_helper.to_array(initializers[zero]).any())
        axis = next((helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"), 1)
        if (source is None or initializers[dq.input[0]].data_type != TensorProto.INT8 or not symmetric
                or scale.ndim != 1 or len(scale) != source.shape[0] or axis != 0):  # fmt: skip
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or len(source.shape) != 4:
            continue
        found.append(QuantizedConv(node, dq.input[0], scale.astype(np.float64), source.astype(np.float64),
                                   int(attrs.get("group", 1)), tuple(source.shape[2:]),
                                   tuple(attrs.get("strides", (1, 1))), tuple(attrs.get("dilations", (1, 1))),
                                   tuple(attrs.get("pads", (0, 0, 0, 0)))))  # fmt: skip
    return found


def input_moments(model: Any, convs: list[QuantizedConv], batches: Iterable[np.ndarray], input_name: str) -> list[Any]:
    """``H = X Xᵀ`` per convolution and group, (group, D, D) float64 with D = Cin / group x kH x kW, summed over the
    calibration ``batches``. X is what the INT8 graph feeds the layer (its dequantized input, run without graph
    optimizations so every tensor exists), unfolded into the kernel's receptive fields."""
    import onnx
    import onnxruntime as ort
    import torch

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    names = list(dict.fromkeys(c.node.input[0] for c in convs))
    probe.graph.output.extend([onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                               for n in names if n not in outputs])  # fmt: skip
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    moments: list[Any] = [None] * len(convs)
    total = len(batches) if isinstance(batches, Sized) else None
    for batch in tqdm(batches, total=total, desc="INT8 weight rounding: layer inputs", unit="batch", leave=False,
                      file=sys.stderr):  # fmt: skip
        tensors = dict(zip(names, session.run(names, {input_name: batch}), strict=True))
        for i, conv in enumerate(convs):
            h = _moments(conv, torch.from_numpy(tensors[conv.node.input[0]]))
            moments[i] = h if moments[i] is None else moments[i] + h
    return moments


def _moments(conv: QuantizedConv, x: Any) -> Any:
    import torch
    import torch.nn.functional as F

    n, channels = x.shape[:2]
    per_group = channels // conv.group
    if conv.kernel == (1, 1) and conv.pads == (0, 0, 0, 0):  # pointwise: the receptive field is the pixel itself
        cols = x[:, :, :: conv.strides[0], :: conv.strides[1]].transpose(0, 1).reshape(conv.group, per_group, -1)
        return (cols @ cols.transpose(1, 2)).double()
    top, left, bottom, right = conv.pads
    x = F.pad(x, (left, right, top, bottom))
    total = torch.zeros(conv.group, per_group * conv.kernel[0] * conv.kernel[1],
                        per_group * conv.kernel[0] * conv.kernel[1], dtype=torch.float64)  # fmt: skip
    step = max(1, UNFOLD_ELEMENTS // max(1, x[:1].numel() * conv.kernel[0] * conv.kernel[1]))
    for start in range(0, n, step):
        cols = F.unfold(x[start : start + step], conv.kernel, dilation=conv.dilations, stride=conv.strides)
        cols = cols.reshape(cols.shape[0], conv.group, -1, cols.shape[-1]).permute(1, 2, 0, 3).flatten(2)
        total += (cols @ cols.transpose(1, 2)).double()
    return total


def gptq(weight: Any, moments: Any, scale: Any, qmin: int, qmax: int, damping: float = DAMPING) -> Any:
    """Integers Q (R, D) for ``weight`` (R, D) on the grid ``scale`` (R,) x [qmin, qmax], each column rounded in turn
    and its error moved onto the columns after it. ``moments``: H (D, D) shared by every row, or (R, D, D) one per
    row (a depthwise convolution)."""
    import torch

    w = weight.clone()
    h = moments.clone() if moments.dim() == 3 else moments.unsqueeze(0).clone()
    diagonal = torch.diagonal(h, dim1=1, dim2=2)
    dead = diagonal == 0  # an input that is always zero: its weight does not matter
    diagonal += damping * diagonal.mean(1, keepdim=True) + dead.double() + 1e-12
    # The upper Cholesky factor of H's inverse: row j holds how the error of column j spreads to columns j+1...
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        q[:, j] = torch.clamp(torch.round(w[:, j] / scale), qmin, qmax)
        error = (w[:, j] - q[:, j] * scale) / inverse[:, j, j]
        w[:, j + 1 :] -= error[:, None] * inverse[:, j, j + 1 :]
    return q


def round_weights(model: Any, fp32_weights: dict[str, np.ndarray], batches: Iterable[np.ndarray], input_name: str,
                  qmin: int, qmax: int, damping: float = DAMPING) -> int:  # fmt: skip
    """Replace the int8 weights of ``model`` (a QDQ ModelProto, changed in place) by GPTQ's, with H from the
    calibration ``batches``; returns how many weights were rounded."""
    import torch
    from onnx import numpy_helper

    convs = quantized_convs(model, fp32_weights)
    if not convs:
        return 0
    # A weight read by several convolutions is rounded once, for all their inputs (left as ORT rounded it if they
    # disagree on groups or kernel).
    shared: dict[str, tuple[QuantizedConv, Any]] = {}
    mixed: set[str] = set()
    for conv, moments in zip(convs, input_moments(model, convs, batches, input_name), strict=True):
        first = shared.get(conv.weight_name)
        if first is not None and (first[0].group, first[0].kernel) != (conv.group, conv.kernel):
            mixed.add(conv.weight_name)
        shared[conv.weight_name] = (conv, moments if first is None or conv.weight_name in mixed else first[1] + moments)
    for name in mixed:
        del shared[name]
    initializers = {t.name: t for t in model.graph.initializer}
    for conv, moments in shared.values():
        rows = conv.fp32_weight.shape[0]
        weight = torch.from_numpy(conv.fp32_weight.reshape(rows, -1))
        scale = torch.from_numpy(conv.scale)
        if conv.group == 1:
            q = gptq(weight, moments[0], scale, qmin, qmax, damping)
        elif conv.group == rows:  # depthwise: one row per group
            q = gptq(weight, moments, scale, qmin, qmax, damping)
        else:
            per = rows // conv.group
            q = torch.cat([gptq(weight[g * per : (g + 1) * per], moments[g], scale[g * per : (g + 1) * per], qmin,
                                qmax, damping) for g in range(conv.group)])  # fmt: skip
        old = initializers[conv.weight_name]
        new = q.numpy().reshape(tuple(old.dims)).astype(np.int8)
        old.CopyFrom(numpy_helper.from_array(new, conv.weight_name))
    return len(shared)
