"""torch.fx helpers every torch.export method shares: layer names, weight ops, tensors, re-export."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import fx

from worker.engine.types import TensorSpec

EXAMPLE_BATCH = 2  # 0/1 would specialize the batch dimension on re-export
_QD = torch.ops.quantized_decomposed
# conv/linear ops that PT2E static quantizes, by the module type users know them by
WEIGHT_OPS = {torch.ops.aten.conv1d.default: "Conv1d", torch.ops.aten.conv2d.default: "Conv2d",
              torch.ops.aten.conv3d.default: "Conv3d", torch.ops.aten.linear.default: "Linear",
              torch.ops.aten.conv_transpose1d.default: "ConvTranspose1d",
              torch.ops.aten.conv_transpose2d.input: "ConvTranspose2d"}
# every aten op (by schema base name) that carries a layer's weights, by the module type users know
LAYER_KINDS = {"linear": "Linear", "lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN",
               "embedding": "Embedding", "embedding_bag": "EmbeddingBag", "_embedding_bag": "EmbeddingBag",
               "conv1d": "Conv1d", "conv2d": "Conv2d", "conv3d": "Conv3d", "convolution": "Conv",
               "conv_transpose1d": "ConvTranspose1d", "conv_transpose2d": "ConvTranspose2d"}


def is_call(node: object, *targets: object) -> bool:
    """Whether node is an fx call_function to one of targets."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def module_path(node: fx.Node) -> tuple[str, str]:
    """(qualified module name, module type name) of the innermost module a node came from."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name, ""
    path, kind = list(stack.values())[-1]
    path = str(path).removeprefix("L['self'].")
    return path or node.name, str(getattr(kind, "__name__", kind)).rsplit(".", 1)[-1]


def tensor_attr(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The tensor a get_attr node reads, else None."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def weight_layers(gm: fx.GraphModule) -> list[tuple[str, str, fx.Node]]:
    """(module path, layer kind, node) for each op in LAYER_KINDS, graph order."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not hasattr(node.target, "_schema"):
            continue
        base = node.target._schema.name.split("::")[-1]
        if base in LAYER_KINDS:
            found.append((module_path(node)[0], LAYER_KINDS[base], node))
    return found


def weight_layer_names(gm: fx.GraphModule) -> list[str]:
    """Module paths of the conv/linear layers (WEIGHT_OPS), graph order."""
    names = [module_path(n)[0] for n in gm.graph.nodes if n.op == "call_function" and n.target in WEIGHT_OPS]
    return list(dict.fromkeys(names))


def batched(samples: list[dict[str, np.ndarray]], specs: list[TensorSpec], size: int) -> Iterator[tuple]:
    """Stack batch-1 samples into batches of `size` when every input's batch dim is symbolic."""
    if not all(s.shape and isinstance(s.shape[0], str) for s in specs):
        size = 1  # a fixed batch dimension: feed samples as they come
    for start in range(0, len(samples), size):
        chunk = samples[start : start + size]
        # one sample as it is: a stacked one (a 0-d scalar, a state with its batch axis inside) has no axis to join on
        yield tuple(torch.from_numpy(np.array(chunk[0][s.name]) if len(chunk) == 1
                                     else np.concatenate([c[s.name] for c in chunk])) for s in specs)


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


def example_args(program: torch.export.ExportedProgram, specs: list[TensorSpec]) -> tuple[tuple, tuple]:
    """Small, fresh (cloned, never a view) example inputs and matching dynamic_shapes for re-export, on the
    device the program's inputs are on (cuda after torch.export.passes.move_to_device_pass)."""
    from torch.export import Dim

    user_inputs = set(map(str, program.graph_signature.user_inputs))
    devices = [n.meta["val"].device for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs
               and isinstance(n.meta.get("val"), torch.Tensor)]
    device = devices[0] if devices else torch.device("cpu")
    dims: dict[str, Any] = {}
    args, shapes = [], []
    ranges = {str(sym): rng for sym, rng in program.range_constraints.items()}
    for spec in specs:
        sizes, dynamic = [], {}
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                sizes.append(dim)
                continue
            rng = ranges.get(dim)
            lower = int(rng.lower) if rng is not None and rng.lower.is_finite else 1
            upper = int(rng.upper) if rng is not None and rng.upper.is_finite else None
            if dim not in dims:
                # the original's own range, so the program still takes what the upload took (batch 1 too);
                # a derived dimension (e.g. 2*s0) has no range of its own: export works it out
                dims[dim] = Dim(dim, min=max(lower, 1), max=upper) if rng is not None else Dim.AUTO
            size = EXAMPLE_BATCH if upper is None else min(max(EXAMPLE_BATCH, lower), upper)
            sizes.append(max(size, lower))
            dynamic[axis] = dims[dim]
        dtype = getattr(torch, spec.dtype)
        tensor = (torch.randn(sizes, device=device).to(dtype) if dtype.is_floating_point
                  else torch.zeros(sizes, dtype=dtype, device=device))
        args.append(tensor.clone())
        shapes.append(dynamic or None)
    return tuple(args), tuple(shapes)


def strip_metadata(program: torch.export.ExportedProgram) -> None:
    """Drop per-node provenance (stack traces, pass history): on a small model its JSON outweighed the
    int8 weights. The module path stays on the int8 matmuls, so the artifact still names its layers."""
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.target is torch.ops.aten._int_mm.default else None
        for key in ("stack_trace", "from_node", "torch_fn", "source_fn_stack", "nn_module_stack"):
            node.meta.pop(key, None)
        if stack:
            node.meta["nn_module_stack"] = stack


def reexport(gm: fx.GraphModule, float_program: torch.export.ExportedProgram,
             specs: list[TensorSpec]) -> tuple[torch.export.ExportedProgram, tuple]:
    """Export a rewritten module again, with only the tensors its graph reads and small cloned example
    inputs (ENGINE.md: 536 KB -> 158 KB), in the upload's dynamic shapes. Returns the program (example
    inputs cleared, so nothing is pickled into the artifact) and the example args."""
    for node in list(gm.graph.nodes):  # a QAT graph keeps the guards of its batch>=2 training export
        if node.op == "call_module" and str(node.target).startswith("_guards_fn") and not node.users:
            gm.graph.erase_node(node)
    drop_unused(gm)
    args, dynamic_shapes = example_args(float_program, specs)
    with torch.no_grad():
        program = torch.export.export(gm, args, dynamic_shapes=dynamic_shapes)
    program.example_inputs = None
    strip_metadata(program)
    return program, args
