"""Graph edits after PT2E convert: dynamic Q/DQ Linear patterns to real int8 matmuls, unused weights out.

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

EPS = 2.0**-12  # the X86 quantizer's activation eps


def dynamic_int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W.T + b with W int8 [N, K] (per-channel scales) and x quantized to int8 per row, per call.

    Written for few graph nodes: in eager each op costs microseconds and a JSON entry in the .pt2.
    """
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    amax = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True)
    scale = amax.clamp(min=127.0 * EPS) / 127.0
    # |rows / scale| <= 127 by construction, so the int8 cast never wraps
    quantized = torch.ops.aten._to_copy.default(torch.round(rows / scale), dtype=torch.int8)
    acc = torch.ops.aten._to_copy.default(torch._int_mm(quantized, weight.t()), dtype=torch.float32)
    y = acc * (scale * weight_scale) if bias is None else torch.addcmul(bias, acc, scale * weight_scale)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def weight_only_embedding(indices: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                          offset: torch.Tensor) -> torch.Tensor:
    """Embedding rows stored as uint8 with a float scale and offset per row; only looked-up rows are
    dequantized, so a lookup reads a quarter of the bytes and never rebuilds the float table."""
    rows = torch.ops.aten._to_copy.default(torch.nn.functional.embedding(indices, weight), dtype=torch.float32)
    return torch.addcmul(torch.nn.functional.embedding(indices, offset), rows,
                         torch.nn.functional.embedding(indices, scale))


@dataclass
class Lowered:
    module_path: str
    weight: str  # get_attr target of the int8 weight


def _op(node: object, *targets: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def module_path(node: fx.Node) -> tuple[str, str]:
    """(qualified module name, module type name) of the innermost module a node came from."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name, ""
    path, kind = list(stack.values())[-1]
    path = str(path).removeprefix("L['self'].")
    return path or node.name, str(getattr(kind, "__name__", kind)).rsplit(".", 1)[-1]


def lower_dynamic_linears(gm: fx.GraphModule) -> list[Lowered]:
    """Rewrite each PT2E dynamic int8 Linear in place; returns what was rewritten."""
    qd = torch.ops.quantized_decomposed
    lowered = []
    for node in list(gm.graph.nodes):
        if not _op(node, torch.ops.aten.linear.default):
            continue
        x_dq, w_dq = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        if not (_op(x_dq, qd.dequantize_per_tensor.tensor) and _op(x_dq.args[0], qd.quantize_per_tensor.tensor)):
            continue
        weight = w_dq.args[0] if isinstance(w_dq, fx.Node) else None
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            continue
        if _op(w_dq, qd.dequantize_per_channel.default):
            scale_node, zero_node, axis = w_dq.args[1], w_dq.args[2], w_dq.args[3]
            zero = _attr(gm, zero_node)
            if axis != 0 or zero is None or bool(zero.ne(0).any()):
                continue
            scale: object = scale_node
        elif _op(w_dq, qd.dequantize_per_tensor.default):
            scale, zero_point = w_dq.args[1], w_dq.args[2]
            if zero_point != 0:
                continue
        else:
            continue
        if _attr(gm, weight) is None or _attr(gm, weight).dtype != torch.int8:
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
        if not _op(node, torch.ops.aten.embedding.default) or not _op(node.args[0], qd.dequantize_per_channel.default):
            continue
        w_dq = node.args[0]
        weight, scale, zero = (_attr(gm, a) for a in w_dq.args[:3])
        if weight is None or scale is None or zero is None or w_dq.args[3] != 0 or weight.dtype != torch.uint8:
            continue
        index = len(lowered)
        # per-row (V, 1) tables: one embedding lookup each gives the scale and offset of every row read
        gm.register_buffer(f"_embedding_scale_{index}", scale.reshape(-1, 1).clone())
        gm.register_buffer(f"_embedding_offset_{index}", (-zero * scale).reshape(-1, 1).to(torch.float32))
        with gm.graph.inserting_before(node):
            scale_node = gm.graph.get_attr(f"_embedding_scale_{index}")
            offset_node = gm.graph.get_attr(f"_embedding_offset_{index}")
            new = gm.graph.call_function(weight_only_embedding, (node.args[1], w_dq.args[0], scale_node, offset_node))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        lowered.append(Lowered(module_path(new)[0], str(w_dq.args[0].target)))
    return lowered


def _attr(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    value = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def drop_unused(gm: fx.GraphModule) -> int:
    """Dead code out, then every parameter/buffer/tensor attribute no get_attr reads (ENGINE.md:
    convert_pt2e keeps the float weights registered, which made the saved program 1.21x the float one)."""
    gm.graph.eliminate_dead_code()
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = 0
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    names += [n for n, v in vars(gm).items() if isinstance(v, torch.Tensor)]
    for name in names:
        if name in used:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if attr in owner._parameters or attr in owner._buffers or isinstance(getattr(owner, attr, None),
                                                                              torch.Tensor):
            delattr(owner, attr)
            dropped += 1
    gm.delete_all_unused_submodules()
    gm.recompile()
    return dropped
