"""SmoothQuant for dynamic int8 on ONNX MatMuls: capture each MatMul's float input, measure its int8 error,
and move activation outliers into the weights where that raises the layer's SQNR.

Written by hand because onnxruntime offers SmoothQuant only for static quantization (see smooth()).
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.engine import metrics as m
from worker.engine.onnx import common as onnx_common

if TYPE_CHECKING:
    import onnx

    from worker.engine.config import DynamicConfig
    from worker.engine.context import JobContext

# SmoothQuant migration strengths. MiniLM's layers scored best at 0.8-0.9 sample by sample, but served in a
# batch of 64 those scales lost (cosine 0.992 against 0.996 with at most 0.7): one per-tensor scale then covers
# sentences whose outlier channels the tuning samples did not show.
SMOOTHING_ALPHAS = (0.5, 0.6, 0.7)
SQNR_SAMPLES = 8  # per-layer error on this many tuning samples; channel maxima use all of them
MIN_SMOOTHING_GAIN_DB = 1.0  # each smoothed input costs a Mul: only for a real gain in the layer's SQNR


@dataclasses.dataclass
class MatMulInput:
    """A MatMul/Gemm with a constant weight, seen as x @ weight, and its float input x on a few samples."""

    op: str
    x: str  # the input tensor's name
    weight_name: str
    weight: np.ndarray  # [K, N]
    inputs: list[np.ndarray]


def capture_matmuls(ctx: JobContext, model: onnx.ModelProto, nodes: list[onnx_common.WeightNode],
                     batches: list[dict[str, np.ndarray]], scratch: Path) -> dict[str, MatMulInput]:
    """Each MatMul/Gemm's weight and float input, by node name; empty when the inputs cannot be captured."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    targets = [n for n in nodes if n.op in ("MatMul", "Gemm")]
    if not targets:
        return {}
    try:
        # every tuning sample: channel maxima from 8 of them made smoothing scales that lost in batches
        values = onnx_common.capture(model, [by_name[n.node].input[0] for n in targets], batches,
                                     scratch / "capture.onnx")
    except Exception as exc:  # only a diagnostic: the job goes on without per-layer numbers
        ctx.log("warning", f"per-layer error not measured: {exc}")
        return {}
    found = {}
    for n in targets:
        node = by_name[n.node]
        attrs = {a.name: a.i for a in node.attribute}
        w = numpy_helper.to_array(inits[n.weights[0]])
        if node.op_type == "Gemm" and attrs.get("transB", 0):
            w = w.T
        xs = values[node.input[0]]
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            xs = [x.T for x in xs]
        found[n.node] = MatMulInput(node.op_type, node.input[0], n.weights[0], w, xs)
    return found


ESTIMATE_NOTE = ("estimated, isolated: each MatMul's float input from the model, run through a numpy copy of "
                 "onnxruntime's dynamic int8 arithmetic (weights as stored, 7-bit when reduce_range; activations "
                 "uint8 per call); not read from the artifact, whose int16 accumulation can saturate on CPUs "
                 "without VNNI")


def layer_sqnr(matmuls: dict[str, MatMulInput], config: DynamicConfig, *, reduce_range: bool) -> dict[str, float]:
    """Each MatMul/Gemm's own SQNR under dynamic int8, from its float inputs (ESTIMATE_NOTE)."""
    per_channel = config.granularity == "per_channel"
    return {name: m.dynamic_matmul_sqnr(mm.inputs[:SQNR_SAMPLES], mm.weight, per_channel=per_channel,
                                        symmetric=config.symmetric, reduce_range=reduce_range)
            for name, mm in matmuls.items()}


def smooth(model: onnx.ModelProto, matmuls: dict[str, MatMulInput], excluded: set[str], config: DynamicConfig,
           path: Path, *, reduce_range: bool) -> dict[str, MatMulInput]:
    """Save the model with SmoothQuant scales where they raise the MatMuls' int8 SQNR; the MatMuls changed.

    Written by hand because onnxruntime offers SmoothQuant only for static quantization. Transformers
    carry a few activation channels 10-20x larger than the rest (MiniLM: 28 against a median of 1.6
    into each FFN), and dynamic int8 quantizes each activation with one scale; x @ W == (x / s) @ (s W),
    so a Mul by 1/s before the MatMul and s folded into its weight make the activation even.
    """
    import onnx
    from onnx import helper, numpy_helper

    readers = collections.Counter(i for n in model.graph.node for i in n.input)
    groups: dict[str, list[str]] = {}
    for name, mm in matmuls.items():
        # a weight is rescaled in place, so only one that no other node reads
        if mm.op == "MatMul" and name and name not in excluded and readers[mm.weight_name] == 1:
            groups.setdefault(mm.x, []).append(name)
    plan = {}
    for x, names in groups.items():
        inputs = matmuls[names[0]].inputs
        x_max = np.max([np.abs(x.reshape(-1, x.shape[-1])).max(0) for x in inputs], axis=0)
        scale, plain, smoothed = m.smoothing_scales(
            x_max, inputs[:SQNR_SAMPLES], [matmuls[n].weight for n in names],
            per_channel=config.granularity == "per_channel", symmetric=config.symmetric, alphas=SMOOTHING_ALPHAS,
            reduce_range=reduce_range)
        if scale is not None and smoothed - plain >= MIN_SMOOTHING_GAIN_DB:
            plan[x] = (scale, names)
    if not plan:
        return {}

    scaled = onnx.ModelProto()
    scaled.CopyFrom(model)
    inits = {t.name: t for t in scaled.graph.initializer}
    changed = {}
    for x, (scale, names) in plan.items():
        dtype = matmuls[names[0]].weight.dtype
        scaled.graph.initializer.append(numpy_helper.from_array((1 / scale).astype(dtype), f"{x}_smooth_scale"))
        for name in names:
            mm = matmuls[name]
            weight = (mm.weight * scale[:, None]).astype(dtype)
            inits[mm.weight_name].CopyFrom(numpy_helper.from_array(weight, mm.weight_name))
            changed[name] = dataclasses.replace(mm, weight=weight, inputs=[v / scale for v in mm.inputs])
    ordered = []
    for node in scaled.graph.node:
        x = node.input[0] if node.name in changed else None
        if x in plan:  # the Mul goes right before the first MatMul reading x, which keeps the graph sorted
            ordered.append(helper.make_node("Mul", [x, f"{x}_smooth_scale"], [f"{x}_smoothed"],
                                            name=f"{x}_smooth"))
            plan.pop(x)
        if node.name in changed:
            node.input[0] = f"{node.input[0]}_smoothed"
        ordered.append(node)
    del scaled.graph.node[:]
    scaled.graph.node.extend(ordered)
    onnx.save_model(scaled, str(path))
    return changed
