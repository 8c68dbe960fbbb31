"""Small ONNX graph edits that onnxruntime's weight-only quantizer needs but does not do itself."""

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
