"""weight_only `bits: auto`, format-neutral: each layer's HAWQ figures, and int4/int8 per layer under max_size_ratio.

HAWQ-V2/V3 rank layers by the second-order loss a weight perturbation causes: 0.5 * dW^T H dW, which for rounding
noise spread evenly over a layer's n weights is about 0.5 * (Tr(H_l) / n) * ||Q(W) - W||^2. The loss is the squared
distance of the model's outputs to the float model's own, so at the float point its Hessian is the Gauss-Newton
J^T J. A format supplies each layer's trace (torch_export: a double-backward Hessian-vector product;
gauss_newton_traces here for models where that is too costly or not implemented), its exact rounding errors and its
bytes at 4 and 8 bits; layer_row() turns them into the loss an int8 copy saves, and allocate() picks the layers to
raise to int8 with the 0/1 knapsack ONNX bits auto uses, within the bytes the budget leaves above all-int4. The built
artifact's size is measured against the budget, never assumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from worker.engine.errors import EngineError

if TYPE_CHECKING:
    import torch

    from worker.engine.context import JobContext

REFITS = 3  # a built artifact over budget (headers, alignment, scales) is re-planned with a tighter budget
# batch -> (the model's outputs, computed with autograd on, and how many samples the batch holds)
Outputs = Callable[[Any], "tuple[list[torch.Tensor], int]"]


def gauss_newton_traces(outputs: Outputs, weights: Mapping[str, torch.Tensor], batches: Sequence[Any],
                        probes: int, seed: int = 0) -> dict[str, float]:
    """Hutchinson's estimate of Tr(J_l^T J_l) per layer l, averaged per sample: E_u ||J_l^T u||^2 over Rademacher
    vectors u in output space, one backward (a vector-Jacobian product) per probe for every layer at once.

    At the float point this is the Hessian trace of 0.5 * ||f(W) - f(W0)||^2 exactly (the residual is zero), as the
    double-backward estimator of torch_export/weight_only_auto.py computes it, at the cost of one backward instead
    of a backward through a backward; and it runs through kernels that have no double backward (torch 2.13's CPU
    scaled_dot_product_attention: 'derivative ... not implemented'). `weights` must require grad."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    names = list(weights)
    traces = dict.fromkeys(names, 0.0)
    count = 0
    for batch in batches:
        found, size = outputs(batch)
        count += size
        for probe in range(probes):
            vs = [(torch.randint(0, 2, o.shape, generator=generator) * 2 - 1).to(o.device, o.dtype) for o in found]
            grads = torch.autograd.grad(found, [weights[n] for n in names], grad_outputs=vs,
                                        retain_graph=probe < probes - 1, allow_unused=True)
            for name, grad in zip(names, grads, strict=True):
                if grad is not None:  # None: the layer does not reach these outputs (its trace is 0)
                    traces[name] += float(grad.float().pow(2).sum()) / probes
    return {name: value / max(count, 1) for name, value in traces.items()}


def layer_row(trace: float, numel: int, error4: float, error8: float, bytes4: int, bytes8: int,
              source: str) -> dict[str, Any]:
    """One layer's HAWQ figures: the loss its 4-bit rounding costs less the 8-bit one's is what an int8 copy saves."""
    per_weight = trace / max(numel, 1)
    return {"hessian_trace": trace, "trace_per_weight": per_weight, "error_4bit": error4, "error_8bit": error8,
            "bytes_4bit": bytes4, "bytes_8bit": bytes8, "gain": 0.5 * per_weight * (error4 - error8),
            "extra_bytes": bytes8 - bytes4, "source": source}


def check_floor(max_size_ratio: float, *, original_bytes: int, bytes4: int, artifact: str, floor_note: str) -> None:
    """budget_not_met when every quantizable layer at 4 bits is already over max_size_ratio: the floor of this model."""
    if bytes4 > max_size_ratio * original_bytes:
        raise EngineError(f"the budget cannot be met: with every quantizable layer at 4 bits the {artifact} is already "
                          f"{bytes4 / original_bytes:.3f} of the float file > max_size_ratio {max_size_ratio}. "
                          f"{floor_note}; raise the budget, or use bits 4", code="budget_not_met")


def allocate(ctx: JobContext, rows: dict[str, dict[str, Any]], *, original_bytes: int, bytes4: int,
             size_of: Callable[[frozenset[str]], int], method: str, probes: int, artifact: str,
             floor_note: str) -> tuple[set[str], dict[str, Any]]:
    """The layers to raise to int8 within max_size_ratio, and the report's bits_auto. size_of(at_int8) builds and
    saves that mix and returns its bytes. Raises budget_not_met when all-int4 is already over the budget."""
    from worker.engine.onnx.weight_only_budget import knapsack  # format-free; onnx itself is imported lazily there

    config = ctx.config
    max_bytes = config.max_size_ratio * original_bytes
    check_floor(config.max_size_ratio, original_bytes=original_bytes, bytes4=bytes4, artifact=artifact,
                floor_note=floor_note)
    all8 = bytes4 + sum(r["extra_bytes"] for r in rows.values())
    gains = {p: r["gain"] for p, r in rows.items()}
    room, chosen, size = max_bytes - bytes4, set(), bytes4
    for _ in range(REFITS):
        chosen = knapsack(gains, {p: r["extra_bytes"] for p, r in rows.items()}, room) if room > 0 else set()
        if not chosen:
            size = bytes4
            break
        size = size_of(frozenset(chosen))
        if size <= max_bytes:
            break
        ctx.log("info", f"bits auto: {len(chosen)} layers at 8 bits came out at {size} bytes, over {max_bytes:.0f}; "
                        "planning tighter")
        room *= 0.98 * (max_bytes - bytes4) / (size - bytes4)
        chosen, size = set(), bytes4
    ranked = sorted(rows, key=lambda p: rows[p]["gain"] / max(rows[p]["extra_bytes"], 1), reverse=True)
    layers = []
    for rank, path in enumerate(ranked, 1):
        row = rows[path]
        why = (f"int8: rank {rank} by loss saved per extra byte, within the budget" if path in chosen else
               "int4: the budget left no room for it" if row["gain"] > 0 else "int4: int8 saves no loss here")
        layers.append({"name": path, "bits": 8 if path in chosen else 4, "rank": rank, "why": why,
                       **{k: (round(v, 9) if isinstance(v, float) else v) for k, v in row.items() if k != "source"}})
    report = {"method": method, "probes": probes, "source": next(iter(rows.values()))["source"] if rows else None,
              "max_size_ratio": config.max_size_ratio, "size_ratio": round(size / original_bytes, 4),
              "all_4bit": {"size_ratio": round(bytes4 / original_bytes, 4)},
              "all_8bit": {"size_ratio_estimated": round(all8 / original_bytes, 4)},
              "predicted_loss": {"all_4bit": round(sum(0.5 * r["trace_per_weight"] * r["error_4bit"]
                                                       for r in rows.values()), 9),
                                 "chosen": round(sum(0.5 * r["trace_per_weight"] * r[
                                     "error_8bit" if p in chosen else "error_4bit"] for p, r in rows.items()), 9)},
              "layers": layers}
    if not math.isfinite(report["predicted_loss"]["chosen"]):
        report["predicted_loss"]["chosen"] = None
    return chosen, report
