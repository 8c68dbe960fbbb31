"""Per-layer SQNR for the TorchScript methods: each quantized layer against its float layer, same float input.

Hand-written: no library measures per-layer error on TorchScript (torch.ao's numeric suite needs module
hooks, which a scripted module does not take), and quantize_jit / quantize_dynamic_jit inline every
submodule into one frozen forward: the layer names are gone and the packed weights sit on the root as
`quantized_forward._jit_pass_packed_weight_<i>`. So layers are matched by order. The passes rewrite each
linear/convolution call where it stands (quantized op, or the float op left for an excluded layer), so the
k-th linear/conv call of the float forward is the k-th of the quantized one. The match is used only if
both graphs have as many such calls, of the same kind at every position, and every quantized one holds a
weight of its float layer's shape; else nothing is measured. A float call is named by the attribute path
of its weight (`fc1.weight` -> fc1); a layer called twice gets None. Only calls at the top level of the
forward are seen (a call inside an if/loop block is left out of both graphs alike).

Isolated, unlike the cumulative .pt2 numbers: copies of both graphs (graph surgery on copies; the
delivered model is never touched) also return each layer's input, and the quantized op is run again on
the float layer's own input, quantized with the scale and zero point its input had in the quantized model
(static) or as is (dynamic: the op quantizes per call). Where convert folded a batch norm into the conv or
fused the ReLU after it (conv2d_relu, linear_relu), the float side is read after the norm / ReLU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from worker.engine import metrics as m
from worker.engine.torch_export.layer_sqnr import record, sample_batches

if TYPE_CHECKING:
    from worker.engine import evaluate
    from worker.engine.context import JobContext
    from worker.engine.types import TensorSpec

_LAYER_FAMILIES = {"aten::linear": "linear", "aten::_convolution": "conv", "aten::conv1d": "conv",
              "aten::conv2d": "conv", "aten::conv3d": "conv", "aten::conv_transpose1d": "conv",
              "aten::conv_transpose2d": "conv", "aten::conv_transpose3d": "conv"}
_RELUS = {"aten::relu", "aten::relu_"}


def _family(kind: str) -> str | None:
    """'linear' or 'conv' for a layer call, float or quantized; None for anything else."""
    if kind in _LAYER_FAMILIES:
        return _LAYER_FAMILIES[kind]
    if kind.startswith("quantized::") and "pack" not in kind:
        op = kind.removeprefix("quantized::")
        return "linear" if op.startswith("linear") else "conv" if op.startswith("conv") else None
    return None


def _layer_calls(graph: torch.Graph) -> list[torch.Node]:
    return [node for node in graph.nodes() if _family(node.kind())]


def _layer_name(weight: torch.Value) -> str | None:
    """`fc1` for a weight read as self.fc1.weight; None for a weight that is not a module attribute."""
    parts = []
    node = weight.node()
    while node.kind() == "prim::GetAttr":
        parts.append(node.s("name"))
        node = node.input().node()
    if node.kind() != "prim::Param" or len(parts) < 2:
        return None
    return ".".join(reversed(parts[1:]))


def _users(value: torch.Value) -> list[torch.Node]:
    return [use.user for use in value.uses()]


def _feeds_batch_norm(value: torch.Value) -> bool:
    """Whether `value` (through a dequantize) reaches a batch norm: then convert did not fold one in."""
    for user in _users(value):
        if "batch_norm" in user.kind() or (user.kind() == "aten::dequantize" and _feeds_batch_norm(user.output())):
            return True
    return False


def _float_reference(call: torch.Node, quantized: torch.Node) -> torch.Value | None:
    """The float value the quantized op's output stands for: after a folded norm and a fused ReLU."""
    value = call.output()
    norms = [u for u in _users(value) if u.kind() == "aten::batch_norm" and u.inputsAt(0) == value]
    if _family(call.kind()) == "conv" and len(norms) == 1 and not _feeds_batch_norm(quantized.output()):
        value = norms[0].output()
    if quantized.kind().endswith("_relu") or "_relu_" in quantized.kind():
        relus = [u for u in _users(value) if u.kind() in _RELUS]
        if len(relus) != 1:
            return None
        value = relus[0].output()
    return value


def _probe(module: torch.jit.ScriptModule, graph: torch.Graph, values: list[torch.Value]):  # noqa: ANN202
    """A function running `graph` (a copy of module's forward) that returns `values` instead."""
    for value in values:
        graph.registerOutput(value)
    graph.eraseOutput(0)
    graph.makeMultiOutputIntoTuple()
    function = torch._C._create_function_from_graph("layer_sqnr_probe", graph)
    return lambda *inputs: function(module._c, *inputs)


def _rerun(op: torch.Node, float_input: torch.Tensor, quant_args: tuple) -> np.ndarray:
    """The quantized op on the float layer's input, quantized as its input was in the quantized model."""
    x, rest = quant_args[0], quant_args[1:]
    if isinstance(x, torch.Tensor) and x.is_quantized:
        float_input = torch.quantize_per_tensor(float_input, x.q_scale(), x.q_zero_point(), x.dtype)
    namespace, name = op.kind().split("::")
    out = getattr(getattr(torch.ops, namespace), name)(float_input, *rest)
    return (out.dequantize() if out.is_quantized else out).to(torch.float64).numpy()


def layer_sqnr(float_module: torch.jit.ScriptModule, quant_module: torch.jit.ScriptModule, batches: list[tuple],
               layer_names: list[str]) -> dict[str, float | None]:
    """SQNR (dB) of each quantized layer on the float layer's input, over all batches; None where not matched."""
    result: dict[str, float | None] = dict.fromkeys(layer_names)
    float_graph, quant_graph = float_module.inlined_graph, quant_module.inlined_graph  # copies
    torch._C._jit_pass_constant_propagation(float_graph)  # folds `if` on constants (scripted conv padding)
    torch._C._jit_pass_remove_mutation(float_graph)  # an in-place relu_ would rewrite a captured output
    float_calls, quant_calls = _layer_calls(float_graph), _layer_calls(quant_graph)
    if [_family(n.kind()) for n in float_calls] != [_family(n.kind()) for n in quant_calls]:
        raise ValueError(f"cannot pair the layers: the float forward calls linear/conv "
                         f"{[_family(n.kind()) for n in float_calls]}, the quantized one "
                         f"{[_family(n.kind()) for n in quant_calls]}")
    names = [_layer_name(call.inputsAt(1)) for call in float_calls]
    pairs = []  # (name, float call, float reference value, quantized call)
    for name, call, op in zip(names, float_calls, quant_calls, strict=True):
        if name in result and names.count(name) == 1 and op.kind().startswith("quantized::"):
            reference = _float_reference(call, op)
            if reference is not None:
                pairs.append((name, call, reference, op))
    if not pairs or not batches:
        return result

    float_probe = _probe(float_module, float_graph,
                         [v for _, call, ref, _ in pairs for v in (call.inputsAt(0), call.inputsAt(1), ref)])
    quant_probe = _probe(quant_module, quant_graph, [v for *_, op in pairs for v in op.inputs()])
    f_outs: dict[str, list[np.ndarray]] = {name: [] for name, *_ in pairs}
    q_outs: dict[str, list[np.ndarray]] = {name: [] for name, *_ in pairs}
    with torch.no_grad():
        for batch in batches:
            float_values, quant_values = float_probe(*batch), quant_probe(*batch)
            for i, (name, _, _, op) in enumerate(pairs):
                float_input, weight, reference = float_values[3 * i : 3 * i + 3]
                quant_args = quant_values[:op.inputsSize()]
                quant_values = quant_values[op.inputsSize():]
                if tuple(quant_args[1].unpack()[0].shape) != tuple(weight.shape):
                    raise ValueError(f"layer {name!r} was paired with a quantized op of another weight shape "
                                     f"({tuple(quant_args[1].unpack()[0].shape)} vs {tuple(weight.shape)})")
                f_outs[name].append(reference.to(torch.float64).numpy())
                q_outs[name].append(_rerun(op, float_input, quant_args))
    for name in f_outs:
        result[name] = m.sqnr_db(f_outs[name], q_outs[name])
    return result


def fill(ctx: JobContext, layers: list[dict], float_module: torch.jit.ScriptModule,
         quant_module: torch.jit.ScriptModule, specs: list[TensorSpec], samples: evaluate.Samples) -> None:
    """Set sqnr_db on each layer with integer weights; any failure is only a warning and leaves None."""
    record(ctx, layers, lambda names: layer_sqnr(float_module, quant_module, sample_batches(ctx, specs, samples),
                                                 names))
