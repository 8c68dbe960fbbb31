"""Per-layer SQNR for the torch.export methods: each quantized layer's output against the float layer's.

Both graphs run under a torch.fx Interpreter that keeps the output of one node per layer: in the float
program the layer's aten linear/conv/embedding; in the quantized graph (the in-memory one the artifact
was exported from, whose nodes still carry their module paths) that op again (PT2E static/QAT: float
kernel on dequantized int8 weights and activations) or the single call our lowering put in its place
(dynamic int8 matmul, weight-only dequantize + linear/embedding). A layer is found by its module path,
else by a weight named `<layer>.weight`. Where the float layer feeds a batch norm that convert folded
into the quantized conv, the float side is read after the norm. A layer called more than once, or found
in one graph only, gets None. The numbers are cumulative: a layer's input already carries the error of
the layers before.

Why not torchao's PT2E numeric debugger (`torchao.quantization.pt2e._numeric_debugger`): it pairs nodes by
debug handles that must be stamped on the float program before prepare_pt2e and survive convert. Our
dynamic and weight-only graphs replace those nodes with our own calls (ops.py), and weight-only never goes
through prepare/convert at all, so most layers would come back unpaired; matching by module path works for
all four methods, and the debugger is a private module whose interface has changed between releases.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx

from worker.engine import evaluate
from worker.engine import metrics as m
from worker.engine.torch_export import ops
from worker.engine.torch_export.graph import batched, module_path

if TYPE_CHECKING:
    from worker.engine.context import JobContext
    from worker.engine.types import TensorSpec

MAX_SAMPLES = 16
BATCH = 16
_ATEN = torch.ops.aten
# op -> index of its weight argument: the float layers, and the calls our lowerings put in their place
LAYER_CALLS = {_ATEN.linear.default: 1, _ATEN.conv1d.default: 1, _ATEN.conv2d.default: 1, _ATEN.conv3d.default: 1,
              _ATEN.conv_transpose1d.default: 1, _ATEN.conv_transpose2d.input: 1, _ATEN.embedding.default: 0,
               ops.dynamic_int8_linear: 1, ops.uint8_embedding: 1, ops.weight_only_linear: 1,
               ops.weight_only_embedding: 1, ops.int4_tinygemm_linear: 1}


_BATCH_NORMS = {_ATEN.batch_norm.default, _ATEN._native_batch_norm_legit_no_training.default,
                _ATEN._native_batch_norm_legit.default, _ATEN.native_batch_norm.default}


def _batch_norm_after(node: fx.Node) -> fx.Node | None:
    """The tensor a batch norm right after `node` (its only user) produces, else None."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_function" or users[0].target not in _BATCH_NORMS:
        return None
    norm = users[0]
    if norm.target is _ATEN.batch_norm.default:
        return norm
    first = [u for u in norm.users if u.target is operator.getitem and u.args[1] == 0]
    return first[0] if len(first) == 1 else None


def layer_nodes(gm: fx.GraphModule, layer_names: list[str]) -> dict[str, fx.Node]:
    """The one node per layer whose output is the layer's output; layers seen twice or never are left out."""
    wanted = set(layer_names)
    found: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LAYER_CALLS:
            continue
        name = module_path(node)[0]
        if name not in wanted:
            slot = LAYER_CALLS[node.target]
            weight = node.args[slot] if len(node.args) > slot else None
            target = str(weight.target) if isinstance(weight, fx.Node) and weight.op == "get_attr" else ""
            name = target.removesuffix(".weight") if target.endswith(".weight") else ""
        if name in wanted:
            found.setdefault(name, []).append(node)
    return {name: nodes[0] for name, nodes in found.items() if len(nodes) == 1}


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: dict[fx.Node, str]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[str, list[np.ndarray]] = {name: [] for name in wanted.values()}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        name = self.wanted.get(n)
        if name is not None and isinstance(out, torch.Tensor):
            self.values[name].append(out.detach().to(torch.float64).cpu().numpy())
        return out


def _record(gm: fx.GraphModule, nodes: dict[str, fx.Node], batches: list[tuple]) -> dict[str, list[np.ndarray]]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(len(batch) != len(placeholders) for batch in batches):
        raise ValueError(f"the graph takes {len(placeholders)} flat inputs, the samples give another count")
    recorder = _Recorder(gm, {node: name for name, node in nodes.items()})
    tensors = [*gm.parameters(), *gm.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")  # a graph moved to cuda runs there
    with torch.no_grad():
        for batch in batches:
            recorder.run(*(value.to(device) for value in batch))
    return recorder.values


def layer_sqnr(float_module: fx.GraphModule, quant_module: fx.GraphModule, batches: list[tuple],
               layer_names: list[str]) -> dict[str, float | None]:
    """SQNR (dB) of each layer's output, quantized vs float, over all batches; None where not matched."""
    float_nodes, quant_nodes = layer_nodes(float_module, layer_names), layer_nodes(quant_module, layer_names)
    common = {name: None for name in layer_names if name in float_nodes and name in quant_nodes}
    for name in common:
        # convert_pt2e folds a batch norm into the conv before it: compare with the float norm's output
        folded = _batch_norm_after(float_nodes[name])
        if folded is not None and _batch_norm_after(quant_nodes[name]) is None:
            float_nodes[name] = folded
    result: dict[str, float | None] = dict.fromkeys(layer_names)
    if not common or not batches:
        return result
    f_values = _record(float_module, {n: float_nodes[n] for n in common}, batches)
    q_values = _record(quant_module, {n: quant_nodes[n] for n in common}, batches)
    for name in common:
        f, q = f_values[name], q_values[name]
        if len(f) == len(batches) and [v.shape for v in f] == [v.shape for v in q]:
            result[name] = m.sqnr_db(f, q)
    return result


def sample_batches(ctx: JobContext, specs: list[TensorSpec], samples: evaluate.Samples) -> list[tuple]:
    """A few calibration samples if the job has them, else the ones measure() uses, as torch input tuples."""
    chosen = samples.batches[:MAX_SAMPLES]
    if ctx.calibration_path is not None and samples.source != "calibration":
        chosen = evaluate.load_npz(Path(ctx.calibration_path), specs, MAX_SAMPLES, "calibration").batches
    return list(batched(chosen, specs, BATCH))


def fill(ctx: JobContext, layers: list[dict], float_module: fx.GraphModule, quant_module: fx.GraphModule,
         specs: list[TensorSpec], samples: evaluate.Samples) -> None:
    """Set sqnr_db on each layer with integer weights; any failure is only a warning and leaves None."""
    record(ctx, layers, lambda names: layer_sqnr(float_module, quant_module, sample_batches(ctx, specs, samples),
                                                 names))


def record(ctx: JobContext, layers: list[dict], compute: Callable[[list[str]], dict[str, float | None]]) -> None:
    """Run compute(names of layers with integer weights) and write its dB values into the layer rows.

    Shared by the torch.export and TorchScript measurements."""
    quantized = [layer["name"] for layer in layers if layer.get("weight_dtype") != "float32"]
    if not quantized:
        return
    try:
        values = compute(quantized)
    except Exception as exc:  # only a diagnostic: the job goes on without per-layer numbers
        ctx.log("warning", f"per-layer SQNR not measured: {type(exc).__name__}: {str(exc)[:300]}")
        return
    for layer in layers:
        value = values.get(layer["name"])
        if value is not None:
            layer["sqnr_db"] = round(value, 2)
