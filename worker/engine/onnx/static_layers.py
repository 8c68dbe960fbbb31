"""What a statically quantized ONNX graph did to each weight-bearing layer: dtypes, error, and what stayed float."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from worker.engine import metrics as m
from worker.engine.errors import EngineError
from worker.engine.onnx import common as onnx_common

if TYPE_CHECKING:
    from pathlib import Path

    import onnx

    from worker.engine.context import JobContext

SQNR_NOTE = ("cumulative: each quantized layer's output in the int8 model (after its QuantizeLinear/"
             "DequantizeLinear pair) against the same tensor in the float model, on calibration samples")
# onnxruntime renames what it rewrites: a dynamically quantized LSTM gets "_quant", a Gemm split into
# MatMul + Add gets "_MatMul" (ENGINE.md: check the output graph for the ops you expect).
_RENAMES = ("", "_quant", "_MatMul")
_INTEGER = {2: "uint8", 3: "int8"}  # onnx.TensorProto.UINT8, INT8


class _Graph:
    """Producers, consumers and integer initializers of a quantized graph, for following Q/DQ chains."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes = {n.name: n for n in model.graph.node}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.integer = {t.name: _INTEGER[t.data_type] for t in model.graph.initializer if t.data_type in _INTEGER}

    def counterpart(self, name: str) -> onnx.NodeProto | None:
        return next((self.nodes[name + s] for s in _RENAMES if name + s in self.nodes), None)

    def weight_dtype(self, tensor: str) -> str | None:
        """int8/uint8 when the tensor is an integer initializer or the DequantizeLinear of one."""
        if tensor in self.integer:
            return self.integer[tensor]
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "DequantizeLinear":
            return self.integer.get(node.input[0])
        return None

    def dequantized(self, tensor: str) -> str | None:
        """The DequantizeLinear output that follows a QuantizeLinear of this tensor, if any."""
        for q in self.consumers.get(tensor, []):
            if q.op_type == "QuantizeLinear":
                for dq in self.consumers.get(q.output[0], []):
                    if dq.op_type == "DequantizeLinear":
                        return dq.output[0]
        return None

    def activation_dtype(self, node: onnx.NodeProto, weight_slots: tuple[int, ...]) -> str:
        if node.op_type.startswith("Dynamic"):
            return "uint8"  # DynamicQuantizeLSTM quantizes its input per call
        inputs = [node.input[i] for i in range(len(node.input)) if i not in weight_slots and node.input[i]]
        for tensor in inputs[:1]:
            dq = self.producer.get(tensor)
            if dq is not None and dq.op_type == "DequantizeLinear":
                return self.integer.get(dq.input[2], "uint8") if len(dq.input) > 2 else "uint8"
        # a quantized Gather reads int indices: what the next layer gets is its requantized output
        dq = self.dequantized(node.output[0])
        return "uint8" if dq and node.op_type == "Gather" else "float32"


def layer_table(nodes: list[onnx_common.WeightNode], quantized: onnx.ModelProto,
                sqnr: dict[str, float]) -> list[dict]:
    graph = _Graph(quantized)
    table = []
    for n in nodes:
        node = graph.counterpart(n.node)
        slots = onnx_common.WEIGHT_INPUTS.get(n.op, ())
        dtype = None
        if node is not None:
            dtype = next((d for i in slots if i < len(node.input) and (d := graph.weight_dtype(node.input[i]))),
                         None)
        table.append({
            "name": n.layer, "op": n.op, "weight_dtype": dtype or "float32",
            "activation_dtype": graph.activation_dtype(node, slots) if dtype else "float32",
            "sqnr_db": round(sqnr[n.node], 2) if dtype and n.node in sqnr else None,
        })
    return table


def layer_sqnr(ctx: JobContext, float_model: onnx.ModelProto, quantized: onnx.ModelProto,
               nodes: list[onnx_common.WeightNode], batches: list[dict[str, np.ndarray]],
               scratch: Path) -> dict[str, float]:
    """SQNR of each quantized layer's (dequantized) output against the float model's, on a few samples.

    The tensor read in the int8 model is the DequantizeLinear output after the layer, so the layer's own
    QuantizeLinear stays in its fused int8 kernel, saturation included.
    """
    graph = _Graph(quantized)
    float_tensors = {o for n in float_model.graph.node for o in n.output}
    pairs: dict[str, tuple[str, str]] = {}
    for n in nodes:
        node = graph.counterpart(n.node)
        if node is None or not node.output:
            continue
        raw = node.output[0]
        dq = graph.dequantized(raw)
        # a folded Relu gives the layer the Relu's output name; a graph output keeps its name on the DQ
        float_name = next((t for t in (raw, dq) if t and t in float_tensors), None)
        if float_name is not None:
            pairs[n.node] = (float_name, dq or raw)
    if not pairs:
        return {}
    try:
        f_values = onnx_common.capture(float_model, [f for f, _ in pairs.values()], batches, scratch / "f.onnx")
        q_values = onnx_common.capture(quantized, [q for _, q in pairs.values()], batches, scratch / "q.onnx")
    except Exception as exc:  # only a diagnostic: the job goes on without per-layer numbers
        ctx.log("warning", f"per-layer error not measured: {exc}")
        return {}
    return {node: m.sqnr_db(f_values[f], q_values[q]) for node, (f, q) in pairs.items()
            if [np.shape(v) for v in f_values[f]] == [np.shape(v) for v in q_values[q]]}


def coverage_warnings(model: onnx.ModelProto, quantized: onnx.ModelProto, layers: list[dict],
                      excluded: set[str]) -> list[str]:
    """Plain words for what stayed float, and an error when nothing at all was quantized."""
    warnings = []
    lstms = sum(1 for n in model.graph.node if n.op_type == "LSTM")
    done = sum(1 for n in quantized.graph.node if n.op_type == "DynamicQuantizeLSTM")
    if done:
        warnings.append(f"{done} LSTM layer(s) were quantized dynamically (int8 weights, DynamicQuantizeLSTM): "
                        "static QDQ has no int8 LSTM")
    if lstms > done:
        warnings.append(f"{lstms - done} of {lstms} LSTM layer(s) stayed float")
    if not excluded and not any(layer["weight_dtype"] != "float32" for layer in layers):
        raise EngineError("static quantization left every weight-bearing layer float: nothing was quantized",
                          code="nothing_to_quantize")
    return warnings
