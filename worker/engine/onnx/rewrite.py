"""Small ONNX graph edits that onnxruntime's quantizers need but do not do themselves."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx


def gemm_to_matmul(model: onnx.ModelProto) -> tuple[int, int]:
    """Rewrite, in place, each Gemm with a constant B (transB folded, alpha = beta = 1, no transA) into
    MatMul + Add; returns (rewritten, left as Gemm).

    MatMulNBitsQuantizer looks only at MatMul and skips Gemm without a word: a model whose Linear layers
    exported as Gemm came out at 1.0000004x its size with no MatMulNBits (ENGINE.md). onnxruntime ships
    this rewrite but runs it only inside its dynamic quantizer, so it is called here by hand. The new
    MatMul is named <gemm>_MatMul and the Add <gemm>_Add; the Add keeps the Gemm's output name.
    """
    from onnxruntime.quantization.onnx_model import ONNXModel

    before = sum(1 for n in model.graph.node if n.op_type == "Gemm")
    if not before:
        return 0, 0
    wrapped = ONNXModel(model)
    wrapped.replace_gemm_with_matmul()
    wrapped.clean_initializers()  # a transposed copy replaces B; drop B when nothing else reads it
    after = sum(1 for n in model.graph.node if n.op_type == "Gemm")
    return before - after, after


def flatten_gemm_biases(model: onnx.ModelProto) -> int:
    """Give each Gemm whose bias C is a constant [1, N] a [N] bias instead, in place; returns how many.

    The two broadcast identically over Gemm's 2-D output, but onnxruntime 1.32's QDQ quantizer, adjusting
    per-channel weight scales for an int32 bias, reads C[i] as a scalar and raises on a 2-D C ("The truth
    value of an array ... is ambiguous"). tf2onnx writes such biases (magika's Dense layers).
    """
    from onnx import numpy_helper

    inputs = {i.name for i in model.graph.input}  # old exports list weights as inputs: leave those alone
    initializers = {t.name: t for t in model.graph.initializer if t.name not in inputs}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    flats: dict[str, str] = {}  # a shared bias -> its flat copy's name
    flattened = 0
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        bias = initializers[node.input[2]]
        if len(bias.dims) != 2 or bias.dims[0] != 1:
            continue
        readers[bias.name] -= 1
        flat = numpy_helper.to_array(bias).reshape(-1)
        if not readers[bias.name] and bias.name not in flats:  # ours alone: replace it under its own name
            model.graph.initializer.remove(bias)
            model.graph.initializer.append(numpy_helper.from_array(flat, bias.name))
        else:  # shared: one flat copy for every Gemm, and the original goes with its last reader
            if bias.name not in flats:
                flats[bias.name] = f"{bias.name}_flat"
                model.graph.initializer.append(numpy_helper.from_array(flat, flats[bias.name]))
            node.input[2] = flats[bias.name]
            if not readers[bias.name]:
                model.graph.initializer.remove(bias)
        flattened += 1
    return flattened
