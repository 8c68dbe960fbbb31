"""ONNX weight-only `bits: auto`: each layer int4 or int8, the most faithful mix within max_size_ratio/max_latency_ms.

HAWQ-V3 chooses bit widths with an integer program over per-layer sensitivity and cost; with no gradients in an ONNX
file, a layer's sensitivity here is measured (weight_only_mixed.measure_gains: the tuning cosine it gains alone at 8
bits), its cost is the bytes (and, estimated from all-4 vs all-8 timings, the milliseconds) it adds, and a 0/1
knapsack picks the set with the largest summed gain that fits. The built file is then measured, never assumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.engine import metrics as m
from worker.engine.errors import EngineError
from worker.engine.onnx import common as onnx_common
from worker.engine.onnx import weight_only_mixed as mixed

if TYPE_CHECKING:
    import onnx

    from worker.engine.context import JobContext
    from worker.engine.onnx.deliver import Delivered

UNITS = 2000  # knapsack resolution: costs round up to 1/2000 of the budget, so a choice never exceeds it
LATENCY_RUNS = 40  # per model, interleaved; budgets are checked again on the built file
REFITS = 3  # a built file over budget (the per-layer costs are estimates) is re-planned with a tighter budget


def knapsack(gains: Mapping[str, float], costs: Mapping[str, float], capacity: float) -> set[str]:
    """The nodes whose summed gain is largest with summed cost within `capacity` (gains <= 0 never chosen)."""
    items = [n for n in gains if gains[n] > 0]
    free = {n for n in items if costs[n] <= 0}
    paid = [n for n in items if costs[n] > 0]
    if capacity <= 0 or not paid:
        return free
    weight = [math.ceil(costs[n] / capacity * UNITS) for n in paid]
    best: list[tuple[float, int]] = [(0.0, 0)] * (UNITS + 1)  # per used capacity: (summed gain, bitmask of items)
    for i, n in enumerate(paid):
        for c in range(UNITS, weight[i] - 1, -1):
            gain, mask = best[c - weight[i]]
            if gain + gains[n] > best[c][0]:
                best[c] = (gain + gains[n], mask | (1 << i))
    chosen = best[UNITS][1]
    return free | {n for i, n in enumerate(paid) if chosen >> i & 1}


def latency_ms(a: Path, b: Path, feed: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """p50 ms of two files, batch 1, one thread, interleaved: how metrics.latency measures the delivered one."""
    run_a = onnx_common.load_runner(a, threads=1, ours=True)
    run_b = onnx_common.load_runner(b, threads=1, ours=True)
    return m.interleaved_latency(lambda: run_a(dict(feed)), lambda: run_b(dict(feed)), warmup=5, runs=LATENCY_RUNS)


def allocate(ctx: JobContext, build: mixed.Build, first: Path, candidates: Mapping[str, int], *, original_bytes: int,
             reference: list[list[np.ndarray]], batches: list[dict[str, np.ndarray]], feed: Mapping[str, np.ndarray],
             layer_names: Mapping[str, str]) -> mixed.Promotion:
    """Bits per node of `candidates` (node -> weight elements, all int4 in `first`) under the config's budgets.
    Raises budget_not_met when even all-int4 is over a budget."""
    config = ctx.config
    max_bytes = config.max_size_ratio * original_bytes if config.max_size_ratio is not None else math.inf
    max_ms = config.max_latency_ms if config.max_latency_ms is not None else math.inf
    result = mixed.Promotion(measured=True, before=mixed.tuning_cosine(first, reference, batches))
    result.after = result.before
    all8 = build(frozenset(candidates))
    bytes4, bytes8 = first.stat().st_size, all8.stat().st_size
    ms4 = ms8 = 0.0  # not timed without a latency budget: then every budget test on ms passes
    if config.max_latency_ms is not None:
        ms4, ms8 = latency_ms(first, all8, feed)
    ends = {"all_4bit": {"size_ratio": round(bytes4 / original_bytes, 4), "tuning_cosine": round(result.before, 5)},
            "all_8bit": {"size_ratio": round(bytes8 / original_bytes, 4)}}
    if config.max_latency_ms is not None:
        ends["all_4bit"]["latency_ms"], ends["all_8bit"]["latency_ms"] = round(ms4, 3), round(ms8, 3)
    over = ([f"size {bytes4 / original_bytes:.3f} of the float file > max_size_ratio {config.max_size_ratio}"]
            if bytes4 > max_bytes else []) + ([f"p50 latency {ms4:.2f} ms > max_latency_ms {max_ms}"]
                                               if ms4 > max_ms else [])
    if over:
        all8.unlink(missing_ok=True)
        raise EngineError(f"the budget cannot be met: with every quantizable layer at 4 bits the model is already "
                          f"over it ({'; '.join(over)}). Layers that stay float (excluded, or not MatMul/Gather) and "
                          "the graph's other tensors are not counted down; raise the budget, or use bits 4",
                          code="budget_not_met")
    budget = result.budget = {"max_size_ratio": config.max_size_ratio, "max_latency_ms": config.max_latency_ms,
                              **ends}
    if bytes8 <= max_bytes and ms8 <= max_ms:
        # every layer fits at 8 bits: nothing to trade, and no per-layer probes to pay for
        result.promoted, result.path = list(candidates), all8
        result.after = mixed.tuning_cosine(all8, reference, batches)
        budget["layers"] = [{"name": layer_names.get(n, n), "bits": 8, "why": "all layers at 8 bits fit the budget"}
                            for n in candidates]
        return _delivered(result, budget, all8, original_bytes, ms8)
    ctx.log("info", f"bits auto: all-4-bit {bytes4 / original_bytes:.3f}x, all-8-bit {bytes8 / original_bytes:.3f}x; "
                    f"measuring each of {len(candidates)} layers at 8 bits")
    all8.unlink(missing_ok=True)
    result.gains = mixed.measure_gains(ctx, build, candidates, result.before, reference, batches)
    total = sum(candidates.values())
    # a layer's extra bytes and ms, spread over the measured all-4 -> all-8 difference by its share of the weights
    extra_bytes = {n: (bytes8 - bytes4) * e / total for n, e in candidates.items()}
    extra_ms = {n: max(ms8 - ms4, 0.0) * e / total if config.max_latency_ms is not None else 0.0
                for n, e in candidates.items()}
    room_bytes, room_ms = max_bytes - bytes4, max_ms - ms4
    chosen: set[str] = set()
    path, ms = first, ms4
    for _ in range(REFITS):
        # one capacity for both budgets: each layer costs its larger share of either room
        costs = {n: max(extra_bytes[n] / room_bytes if room_bytes < math.inf else 0.0,
                        extra_ms[n] / room_ms if room_ms < math.inf else 0.0) for n in candidates}
        chosen = knapsack(result.gains, costs, 1.0) if room_bytes > 0 and room_ms > 0 else set()
        if not chosen:
            break
        path = build(frozenset(chosen))
        ms = latency_ms(first, path, feed)[1] if config.max_latency_ms is not None else 0.0
        size = path.stat().st_size
        if size <= max_bytes and ms <= max_ms:
            break
        ctx.log("info", f"bits auto: {len(chosen)} layers at 8 bits came out over budget; planning tighter")
        if size > max_bytes:  # shrink the room by how far the estimate overshot it
            room_bytes *= 0.98 * (max_bytes - bytes4) / (size - bytes4)
        if ms > max_ms:
            room_ms *= 0.98 * (max_ms - ms4) / (ms - ms4)
        path.unlink(missing_ok=True)
        chosen, path, ms = set(), first, ms4
    after = mixed.tuning_cosine(path, reference, batches) if chosen else result.before
    if chosen and after < result.before:  # the gains did not add up: all-4-bit is smaller and more faithful
        path.unlink(missing_ok=True)
        chosen, path, ms, after = set(), first, ms4, result.before
    ranked = sorted(candidates, key=lambda n: result.gains[n] / max(extra_bytes[n], 1.0), reverse=True)
    result.promoted = [n for n in ranked if n in chosen]
    result.path, result.after = (path if chosen else None), after
    budget["layers"] = [_why(layer_names.get(n, n), n in chosen, result.gains[n], extra_bytes[n],
                             extra_ms[n] if config.max_latency_ms is not None else None, rank)
                        for rank, n in enumerate(ranked, 1)]
    return _delivered(result, budget, path, original_bytes, ms)


def _why(name: str, at8: bool, gain: float, extra_bytes: float, extra_ms: float | None, rank: int) -> dict:
    row = {"name": name, "bits": 8 if at8 else 4, "tuning_cosine_gain": round(gain, 5),
           "extra_bytes": int(extra_bytes), "gain_per_mb": round(gain / max(extra_bytes, 1.0) * 1e6, 5),
           "rank_by_gain_per_byte": rank}
    if extra_ms is not None:
        row["extra_ms"] = round(extra_ms, 4)
    row["why"] = ("8 bits: among the largest summed gains that fit the budget" if at8 else
                  "4 bits: no fidelity gained at 8 bits" if gain <= 0 else
                  "4 bits: the budget was spent on layers gaining more per byte")
    return row


def _delivered(result: mixed.Promotion, budget: dict, path: Path, original_bytes: int, ms: float) -> mixed.Promotion:
    budget["delivered"] = {"size_ratio": round(path.stat().st_size / original_bytes, 4),
                           "tuning_cosine": round(result.after, 5), "layers_at_8_bits": len(result.promoted)}
    if budget["max_latency_ms"] is not None:
        budget["delivered"]["latency_ms"] = round(ms, 3)
    return result


def apply(ctx: JobContext, chosen: Delivered, build: Callable[..., Path], model: onnx.ModelProto, excluded: set[str], *,
          model_path: Path, batches: list[dict[str, np.ndarray]], feed: Mapping[str, np.ndarray], full_check: bool,
          layer_names: Mapping[str, str], warnings: list[str]) -> mixed.Promotion:
    """weight_only_mixed.apply's counterpart under bits auto: allocate() on the int4 RTN artifact `chosen`, its
    winner validated like every artifact, and what was chosen in plain words in `warnings`."""
    candidates = mixed.candidates(model, excluded | chosen.kept_float, gather=chosen.variant.options["gather"])
    batches = batches[:mixed.TUNING_SAMPLES]
    result = allocate(ctx, lambda promoted: build(chosen.variant, chosen.kept_float, promoted), chosen.path,
                      candidates, original_bytes=model_path.stat().st_size,
                      reference=mixed.reference_outputs(model_path, batches), batches=batches, feed=feed,
                      layer_names=layer_names)
    if result.path is not None and not mixed.valid_or_warn(result.path, feed, full_check,
                                                            "bits auto: the int4/int8 mix", warnings):
        return mixed.Promotion(measured=True, before=result.before, after=result.before, budget=result.budget)
    delivered = result.budget["delivered"] if result.budget else {}
    warnings.append(f"bits auto: {len(result.promoted)} of {len(candidates)} layers at 8 bits, the rest at 4, "
                    f"{delivered.get('size_ratio')}x the float file; tuning cosine {result.before:.4f} all-4-bit -> "
                    f"{result.after:.4f} (report.onnx_weight_only.bits_auto lists each layer's bits and why)")
    return result
