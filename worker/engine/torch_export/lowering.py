"""Graph edits after PT2E dynamic convert: Q/DQ Linear patterns to real int8 matmuls, embeddings to uint8 lookups.

Why by hand: convert_pt2e leaves `choose_qparams -> quantize -> dequantize -> float linear`, which
only Inductor with freezing turns into int8 kernels. In eager (how a `.pt2` runs after
torch.export.load) those decomposed ops are Python-level and made a digits MLP ~50x slower than
float. No library op both runs int8 in eager and serializes to a `.pt2` without pickled TorchBind
objects (fbgemm's packed params need them), so the pattern is rewritten to `aten._int_mm`, a core
ATen op every torch build can load. The int8 weights and their per-channel scales are the ones
PT2E computed; only the activation step changes: symmetric int8 per row (per token), so a sample's
result does not depend on what else is in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from worker.engine.torch_export.graph import is_call, module_path, tensor_attr
from worker.engine.torch_export.ops import dynamic_int8_linear, uint8_embedding


@dataclass
class Lowered:
    module_path: str
    weight: str  # get_attr target of the int8 weight


def lower_dynamic_linears(gm: fx.GraphModule) -> list[Lowered]:
    """Rewrite each PT2E dynamic int8 Linear in place; returns what was rewritten."""
    qd = torch.ops.quantized_decomposed
    lowered = []
    for node in list(gm.graph.nodes):
        if not is_call(node, torch.ops.aten.linear.default):
            continue
        x_dq, w_dq = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        if not (is_call(x_dq, qd.dequantize_per_tensor.tensor)
                and is_call(x_dq.args[0], qd.quantize_per_tensor.tensor)):
            continue
        weight = w_dq.args[0] if isinstance(w_dq, fx.Node) else None
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            continue
        if is_call(w_dq, qd.dequantize_per_channel.default):
            scale_node, zero_node, axis = w_dq.args[1], w_dq.args[2], w_dq.args[3]
            zero = tensor_attr(gm, zero_node)
            if axis != 0 or zero is None or bool(zero.ne(0).any()):
                continue
            scale: object = scale_node
        elif is_call(w_dq, qd.dequantize_per_tensor.default):
            scale, zero_point = w_dq.args[1], w_dq.args[2]
            if zero_point != 0:
                continue
        else:
            continue
        if tensor_attr(gm, weight) is None or tensor_attr(gm, weight).dtype != torch.int8:
            continue
        x = x_dq.args[0].args[0]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(dynamic_int8_linear, (x, weight, scale, bias))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        lowered.append(Lowered(module_path(new)[0], str(weight.target)))
    return lowered


def lower_embeddings(gm: fx.GraphModule) -> list[Lowered]:
    """Rewrite `embedding(dequantize_per_channel(uint8 table, float qparams), idx)` (torchao's
    EmbeddingQuantizer after convert) so the table stays uint8 and only gathered rows are dequantized."""
    qd = torch.ops.quantized_decomposed
    lowered = []
    for node in list(gm.graph.nodes):
        if not (is_call(node, torch.ops.aten.embedding.default)
                and is_call(node.args[0], qd.dequantize_per_channel.default)):
            continue
        w_dq = node.args[0]
        weight, scale, zero = (tensor_attr(gm, a) for a in w_dq.args[:3])
        if weight is None or scale is None or zero is None or w_dq.args[3] != 0 or weight.dtype != torch.uint8:
            continue
        index = len(lowered)
        # per-row (V, 1) tables: one embedding lookup each gives the scale and offset of every row read
        gm.register_buffer(f"_embedding_scale_{index}", scale.reshape(-1, 1).clone())
        gm.register_buffer(f"_embedding_offset_{index}", (-zero * scale).reshape(-1, 1).to(torch.float32))
        with gm.graph.inserting_before(node):
            scale_node = gm.graph.get_attr(f"_embedding_scale_{index}")
            offset_node = gm.graph.get_attr(f"_embedding_offset_{index}")
            new = gm.graph.call_function(uint8_embedding, (node.args[1], w_dq.args[0], scale_node, offset_node))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        lowered.append(Lowered(module_path(new)[0], str(w_dq.args[0].target)))
    return lowered


