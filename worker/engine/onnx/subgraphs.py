"""Weights inside control flow (If / Loop / Scan bodies), which onnxruntime.quantization leaves float.

quantize_static (QDQ) and quantize_dynamic only walk the main graph (quantize_dynamic's EnableSubgraph
option is off by default and rewrites only ops it finds there, not Constant-node weights its pre-processing
cannot fold). An exporter that wraps the network in a branch on an input (silero-vad's spox export: every
conv and the LSTM inside `If` on the sample rate `sr`) therefore gets nothing quantized: on that model static
left every layer float and dynamic wrote a file 1.43x the upload. Counted here so the job says so, or
refuses before any work when almost every weight is out of reach.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from worker.engine.errors import EngineError

if TYPE_CHECKING:
    import onnx

REACHABLE_SHARE_MIN = 0.10  # below this share of weight elements in the main graph, quantizing is pointless


@dataclass
class Coverage:
    """Float weight tensors (initializers and Constant-node tensors of two or more elements), by where
    they live."""

    weights: int = 0
    elements: int = 0
    nested_weights: int = 0
    nested_elements: int = 0
    control_ops: Counter = field(default_factory=Counter)  # op type -> nodes that carry a weight-holding body

    @property
    def nested_share(self) -> float:
        return self.nested_elements / self.elements if self.elements else 0.0

    def ops(self) -> str:
        return ", ".join(f"{count} {op}" for op, count in sorted(self.control_ops.items()))


def _float_size(tensor: onnx.TensorProto) -> int:
    import onnx

    if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                onnx.TensorProto.BFLOAT16):
        return 0  # int64 shapes, axes and indices are not weights
    size = 1
    for d in tensor.dims:
        size *= d
    return size if size >= 2 else 0


def _graph_weights(graph: onnx.GraphProto) -> list[int]:
    sizes = [_float_size(t) for t in graph.initializer]
    for node in graph.node:
        if node.op_type == "Constant":
            sizes += [_float_size(a.t) for a in node.attribute if a.name == "value"]
    return [s for s in sizes if s]


def _bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    import onnx

    found = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            found.append(attribute.g)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            found.extend(attribute.graphs)
    return found


def _nested(graph: onnx.GraphProto) -> list[int]:
    sizes = _graph_weights(graph)
    for node in graph.node:
        for body in _bodies(node):
            sizes += _nested(body)
    return sizes


def coverage(model: onnx.ModelProto) -> Coverage:
    top = _graph_weights(model.graph)
    result = Coverage(weights=len(top), elements=sum(top))
    for node in model.graph.node:
        nested = [s for body in _bodies(node) for s in _nested(body)]
        if nested:
            result.control_ops[node.op_type] += 1
            result.nested_weights += len(nested)
            result.nested_elements += sum(nested)
    result.weights += result.nested_weights
    result.elements += result.nested_elements
    return result


def check(model: onnx.ModelProto, method: str) -> list[str]:
    """Warnings about weights the quantizer cannot reach; EngineError `unsupported` when nearly all are."""
    found = coverage(model)
    if not found.nested_weights:
        return []
    where = (f"{found.nested_weights} of {found.weights} weight tensors ({found.nested_elements:,} of "
             f"{found.elements:,} values) live inside control-flow subgraphs (the bodies of {found.ops()} "
             "node(s))")
    if found.nested_share > 1 - REACHABLE_SHARE_MIN:
        raise EngineError(
            f"{method} int8 cannot quantize this model: {where}, and onnxruntime's quantizer does not enter "
            "subgraphs, so every layer would stay float and the model would come back no smaller and no "
            "faster. What to do: export the model without control flow around its layers (fix the input "
            "the branch tests, such as a sample rate, at export time) and quantize that export",
            code="unsupported")
    return [f"{where}: onnxruntime's quantizer does not enter subgraphs, so those stay float "
            f"({found.nested_share:.0%} of the weights)"]
