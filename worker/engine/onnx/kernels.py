"""What onnxruntime really runs in int8: read the optimised graph of a QDQ model, find the float islands.

A QDQ file only suggests int8: onnxruntime fuses `DequantizeLinear -> op -> QuantizeLinear` into an int8
kernel (QLinearConv, QLinearMatMul, ...) where it has one, and otherwise runs the op in float with the
Q/DQ pairs around it as extra work. ENGINE.md measured third-party CNNs at 0.40-0.65x float speed that
way: only 30 of 53 convs became QLinearConv, and Q/DQ stayed around HardSigmoid, Resize, ConvTranspose.
No library reports this, so the optimised graph (SessionOptions.optimized_model_filepath) is read here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

_QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


@dataclass(frozen=True)
class KernelReport:
    int8_ops: dict[str, int]  # op type -> count of integer kernels in the optimised graph
    float_islands: dict[str, str]  # node name -> op type: runs in float between Dequantize and Quantize
    qdq_left: int  # Q/DQ nodes onnxruntime kept: each one is work a float model does not do

    def summary(self) -> dict:
        return {"int8_ops": self.int8_ops, "float_islands": len(self.float_islands),
                "float_island_ops": sorted(set(self.float_islands.values())), "qdq_left": self.qdq_left}


def _is_integer_kernel(node: onnx.NodeProto) -> bool:
    return node.op_type.startswith("QLinear") or node.op_type in (
        "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "MatMulIntegerToFloat",
        "QGemm", "QAttention", "QOrderedMatMul", "MatMulNBits", "GatherBlockQuantized")


def inspect(model_path: Path, scratch: Path) -> KernelReport:
    """Build a session as the measurement does (all optimisations, CPU) and read what it kept."""
    optimized = Path(scratch) / f"{Path(model_path).stem}.optimized.onnx"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized)
    options.intra_op_num_threads = 1
    ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(optimized), load_external_data=False).graph
    optimized.unlink(missing_ok=True)
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    int8_ops: dict[str, int] = {}
    islands: dict[str, str] = {}
    for node in graph.node:
        if node.op_type in _QDQ:
            continue
        if _is_integer_kernel(node):
            int8_ops[node.op_type] = int8_ops.get(node.op_type, 0) + 1
            continue
        dequantized_in = any(getattr(producer.get(i), "op_type", "") == "DequantizeLinear" for i in node.input)
        quantized_out = any(c.op_type == "QuantizeLinear" for o in node.output for c in consumers.get(o, ()))
        if dequantized_in and (quantized_out or node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm")):
            islands[node.name] = node.op_type
    qdq = sum(1 for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    return KernelReport(dict(sorted(int8_ops.items())), islands, qdq)
