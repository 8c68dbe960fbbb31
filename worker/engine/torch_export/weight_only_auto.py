"""torch.export weight-only `bits: auto`: each layer int4 or int8 by its Hessian trace per byte (HAWQ), under
max_size_ratio.

HAWQ-V2/V3 rank layers by the second-order loss a weight perturbation causes: 0.5 * dW^T H dW, which for rounding
noise spread evenly over a layer's n weights is about 0.5 * (Tr(H_l) / n) * ||Q(W) - W||^2. Here the loss is the
squared distance of the model's outputs to the float model's own, on calibration (else evaluation) samples: no
labels needed, and at the float point its Hessian is the Gauss-Newton J^T J, positive semi-definite, so every
trace is a true sensitivity. Tr(H_l) comes from Hutchinson's estimator, E[v^T H v] over Rademacher vectors v, with
one Hessian-vector product per probe for all layers at once (torch.autograd, double backward through the float
program's module()); the cross-layer terms of v_l . (Hv)_l average to zero. ||Q(W) - W||^2 is exact: torchao's
own int4 and int8 rounding of each weight, dequantized. A 0/1 knapsack (bits_auto.allocate, shared) then picks
the layers to raise to int8 whose summed loss reduction is largest within the bytes the budget leaves above
all-int4; the built program is saved and measured against the budget, never assumed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.engine import bits_auto, evaluate
from worker.engine.torch_export.graph import batched, tensor_attr

if TYPE_CHECKING:
    import torch
    from torch import fx

    from worker.engine.config import WeightOnlyConfig
    from worker.engine.context import JobContext
    from worker.engine.types import TensorSpec

PROBES = 4  # Rademacher vectors: HAWQ's traces settle within a few; each costs one Hessian-vector product
SAMPLES = 32  # calibration samples the loss is taken over
BATCH = 16
Quantize = Callable[[Any, str, Any, int], tuple]  # weight_only._quantize_weight


def _weights(gm: fx.GraphModule, targets: list[tuple[str, str, Any]]) -> dict[str, str]:
    """{module path: the get_attr name of its weight} for the target Linear/Embedding ops."""
    found = {}
    for path, kind, node in targets:
        weight = node.args[1] if kind == "Linear" else node.args[0]
        found[path] = str(weight.target)
    return found


def hessian_traces(gm: fx.GraphModule, weights: dict[str, str], batches: list[tuple],
                   probes: int = PROBES, seed: int = 0) -> dict[str, float]:
    """Hutchinson's estimate of Tr(H_l) per layer, H the Hessian of 0.5 * ||f(W) - f(W0)||^2 / batch over
    the weights of each layer (summed over batches, averaged over probes)."""
    import torch
    from torch.func import functional_call
    from torch.utils import _pytree as pytree

    names = list(weights.values())
    params = {}
    for name in names:
        owner, _, attr = name.rpartition(".")
        tensor = getattr(gm.get_submodule(owner) if owner else gm, attr)  # a parameter, buffer or plain attribute
        params[name] = tensor.detach().clone().requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    traces = dict.fromkeys(weights, 0.0)
    for batch in batches:
        with torch.no_grad():
            reference = [leaf.detach() for leaf in pytree.tree_leaves(gm(*batch)) if torch.is_tensor(leaf)
                         and leaf.is_floating_point()]
        outputs = [leaf for leaf in pytree.tree_leaves(functional_call(gm, params, batch))
                   if torch.is_tensor(leaf) and leaf.is_floating_point()]
        loss = sum(0.5 * ((o - r) ** 2).sum() for o, r in zip(outputs, reference, strict=True)) / batch[0].shape[0]
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        for _ in range(probes):
            vs = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1
                  for p in (params[n] for n in names)]
            hvs = torch.autograd.grad(grads, [params[n] for n in names], grad_outputs=vs, retain_graph=True)
            for path, v, hv in zip(weights, vs, hvs, strict=True):
                traces[path] += float((v * hv).sum()) / probes
    return traces


def _rounding_error(weight: torch.Tensor, kind: str, config: WeightOnlyConfig, group: int,
                    quantize: Quantize) -> tuple[float, int]:
    """||Q(W) - W||^2 of torchao's rounding at config's dtype, and the bytes its tensors take."""
    import torch

    from worker.engine.torch_export import ops

    weight = weight.detach()
    qweight, scale, zero, packed = quantize(weight, kind, config, group)
    # Linear and Embedding weights are stored alike ([rows, cols], groups along a row): looking every row up
    # dequantizes the whole table exactly as the delivered program does
    restored = ops.weight_only_embedding(torch.arange(weight.shape[0]), qweight, scale, zero, packed)
    size = sum(t.nbytes for t in (qweight, scale, zero) if t is not None)
    return float(((restored - weight.float()) ** 2).sum()), size


def plan(ctx: JobContext, float_module: fx.GraphModule, targets: list[tuple[str, str, Any]],
         config: WeightOnlyConfig, specs: list[TensorSpec], samples: evaluate.Samples, quantize: Quantize,
         group_for: Callable[[WeightOnlyConfig, int], int | None]) -> dict[str, dict[str, Any]]:
    """Per layer: Hessian trace, rounding error at 4 and 8 bits, their bytes, and the loss an int8 copy saves."""
    chosen = samples.batches[:SAMPLES]
    source = samples.source
    if ctx.calibration_path is not None and samples.source != "calibration":
        chosen = evaluate.load_npz(Path(ctx.calibration_path), specs, SAMPLES, "calibration").batches
        source = "calibration"
    weights = _weights(float_module, targets)
    traces = hessian_traces(float_module, weights, list(batched(chosen, specs, BATCH)))
    eight = config.model_copy(update={"dtype": "int8"})
    rows = {}
    for path, kind, node in targets:
        weight = tensor_attr(float_module, node.args[1] if kind == "Linear" else node.args[0])
        group = group_for(config, weight.shape[1])
        if group is None:
            continue  # _lower leaves it float and says so
        error4, bytes4 = _rounding_error(weight, kind, config, group, quantize)
        error8, bytes8 = _rounding_error(weight, kind, eight, group, quantize)
        rows[path] = bits_auto.layer_row(traces[path], weight.numel(), error4, error8, bytes4, bytes8, source)
    ctx.log("info", f"bits auto: Hessian traces of {len(rows)} layers from {PROBES} Rademacher probes on "
                    f"{len(chosen)} {source} samples")
    return rows


METHOD = ("HAWQ: Hessian trace (Hutchinson, Rademacher probes, Gauss-Newton of the output distance to float) x "
          "rounding error per layer, 0/1 knapsack on loss saved per byte")
FLOOR_NOTE = "Layers that stay float (excluded, or not Linear/Embedding) and the graph are not counted down"


def allocate(ctx: JobContext, rows: dict[str, dict[str, Any]], *, original_bytes: int, bytes4: int,
             size_of: Callable[[frozenset[str]], int]) -> tuple[set[str], dict[str, Any]]:
    """bits_auto.allocate for a .pt2: the layers to raise to int8 within max_size_ratio, and the report's bits_auto."""
    return bits_auto.allocate(ctx, rows, original_bytes=original_bytes, bytes4=bytes4, size_of=size_of,
                              method=METHOD, probes=PROBES, artifact="program", floor_note=FLOOR_NOTE)
