"""torch.export sensitivity and targets: sensitivity.py's probes and prefix search on candidates built in memory.

A candidate is the quantized GraphModule a handler builds for a set of layers kept at higher precision, run in
eager torch: the numbers the portable `.pt2` computes, before re-export, saving and AOTInductor. Re-exporting
and saving each probe would cost seconds apiece for no other number (re-export keeps the graph's arithmetic).
Every build is deterministic (the same calibration samples, round to nearest), so the handler delivers the
chosen set by building it once more on its normal path. Probes run most suspect first, by the layer SQNR
layer_sqnr.py measures inside the plain quantized model.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import evaluate
from worker.engine import metrics as m
from worker.engine import sensitivity as s
from worker.engine.torch_export import common as pt2_common
from worker.engine.torch_export import layer_sqnr as pt2_layer_sqnr

if TYPE_CHECKING:
    import torch

    from worker.engine.context import JobContext
    from worker.engine.types import QuantizeResult, TensorSpec

Build = Callable[[frozenset[str]], "torch.nn.Module"]  # layers kept at higher precision -> quantized module
STACK = 32  # samples per call in per_sample()
LATENCY_RUNS = 50  # the target's latency cost: a quick interleaved comparison, not the report's headline figure


@dataclass
class Outcome:
    report: dict[str, Any]  # metrics.sensitivity
    target: dict[str, Any] | None = None  # metrics.target, when the config has one
    kept: list[str] = field(default_factory=list)  # layers the target keeps at higher precision, worst first
    error: dict[str, str] | None = None  # {"code": "target_not_met", "message"} when the target failed


def _discard(_candidate: object) -> None:
    """Candidates live in memory; dropping the last reference frees them."""


def saved_bytes(gm: torch.fx.GraphModule, float_program: torch.export.ExportedProgram, specs: list[TensorSpec],
                artifact: Path, prepare: Callable[[torch.fx.GraphModule], object] | None = None) -> int:
    """The size of `gm` saved the way the handler saves its artifact (`prepare` first: static's per-channel
    rewrite) under the artifact's file name (every archive member's path starts with it), for the target's cost
    in bytes; `gm` is re-exported in place and unusable afterwards."""
    from worker.engine.torch_export.graph import reexport

    if prepare is not None:
        prepare(gm)
    program, _ = reexport(gm, float_program, specs)
    with tempfile.TemporaryDirectory(dir=artifact.parent) as tmp:
        return pt2_common.save_program(program, Path(tmp) / artifact.name).stat().st_size


def per_sample(run: pt2_common.Runner, batches: list[dict[str, np.ndarray]],
               specs: list[TensorSpec]) -> list[list[np.ndarray]]:
    """Each batch-1 sample's outputs, run STACK samples at a time where that gives the same numbers: every input's
    batch dimension is symbolic, the samples have batch 1 and equal shapes, and every output comes back with the
    stacked batch first. One sample per call took ~8 ms of Python around a digits CNN's Q/DQ graph, and the
    probes run the samples once per layer. Static int8 has fixed scales and dynamic int8 scales each row, so a
    sample's outputs do not depend on what else is in its batch."""
    stackable = all(spec.shape and isinstance(spec.shape[0], str) for spec in specs)
    result: list[list[np.ndarray]] = []
    start = 0
    while start < len(batches):
        first = batches[start]
        end = start + 1
        if stackable and all(a.ndim and a.shape[0] == 1 for a in first.values()):
            shapes = {k: a.shape for k, a in first.items()}
            while end < min(len(batches), start + STACK) and {k: a.shape for k, a in batches[end].items()} == shapes:
                end += 1
        if end - start == 1:
            result.append(run(first))
            start = end
            continue
        chunk = batches[start:end]
        outs = run({k: np.concatenate([b[k] for b in chunk]) for k in first})
        if not all(o.ndim and o.shape[0] == len(chunk) for o in outs):
            result += [run(b) for b in chunk]  # an output without the batch first: one sample at a time
        else:
            result += [[o[i : i + 1] for o in outs] for i in range(len(chunk))]
        start = end
    return result


def _order(ctx: JobContext, float_module: torch.fx.GraphModule, plain: torch.fx.GraphModule,
           candidates: Sequence[str], specs: list[TensorSpec], samples: evaluate.Samples) -> list[str]:
    """Candidates by lowest layer SQNR first (unmatched last, in graph order), so a budget that runs out leaves
    the least suspect unmeasured; graph order where SQNR cannot be read."""
    try:
        sqnr = pt2_layer_sqnr.layer_sqnr(float_module, plain, pt2_layer_sqnr.sample_batches(ctx, specs, samples),
                                         list(candidates))
    except Exception as exc:  # only the order of the probes depends on it
        ctx.log("warning", f"per-layer SQNR for the probe order not measured: {type(exc).__name__}: {exc}")
        return list(candidates)
    return sorted(candidates, key=lambda name: float("inf") if sqnr.get(name) is None else sqnr[name])


def analyse(ctx: JobContext, *, float_module: torch.fx.GraphModule, plain: torch.fx.GraphModule, build: Build,
            candidates: Sequence[str], specs: list[TensorSpec], samples: evaluate.Samples, keep_as: str = "float",
            device: str = "cpu", span: tuple[float, float] = (0.40, 0.45),
            plain_bytes: Callable[[torch.fx.GraphModule], int] | None = None) -> Outcome:
    """metrics.sensitivity for `plain` (whose quantized layers are `candidates`), and with config.target the
    fewest most sensitive layers to keep at `keep_as` ("float", or "int8" for int4 weight-only) until it holds.
    Returns what to keep; the handler builds and delivers that. plain_bytes(plain) saves the plain candidate
    for the cost in bytes (attach() reads the delivered size); it may consume `plain`."""
    started = time.monotonic()
    names = [spec.name for spec in specs]
    batches, labels = samples.batches, samples.labels

    def outputs(module: torch.nn.Module, upto: int) -> list[list[np.ndarray]]:
        run = pt2_common.runner_for_module(module, names, threads=None, device=device)
        return [evaluate.unpadded(b, o) for b, o in zip(batches[:upto], per_sample(run, batches[:upto], specs),
                                                         strict=True)]

    reference = outputs(float_module, len(batches))
    float_accuracy = None if labels is None else m.accuracy_top1([r[0] for r in reference], labels)
    has_top1 = m.top1_agreement([r[0] for r in reference], [r[0] for r in reference]) is not None
    goal = s.goal(ctx.config.target, float_accuracy, has_top1)
    deadline = started + goal.budget_s
    probes = min(len(batches), s.PROBE_SAMPLES)
    probe_labels = None if labels is None else labels[:probes]
    probe_goal = goal
    if goal.metric == "accuracy" and probe_labels is not None:  # the probes' drop is against float on the same samples
        probe_goal = dataclasses.replace(goal, float_value=m.accuracy_top1([r[0] for r in reference[:probes]],
                                                                           probe_labels) or 0.0)

    def judge_all(module: torch.nn.Module) -> s.Figures:
        return s.figures(reference, outputs(module, len(batches)), labels)

    def judge_probe(module: torch.nn.Module) -> s.Figures:
        return s.figures(reference[:probes], outputs(module, probes), probe_labels)

    low, high = span
    before = judge_all(plain)
    ordered = _order(ctx, float_module, plain, candidates, specs, samples)
    ranking = s.rank(ordered, build, judge_probe, probe_goal, deadline,
                     lambda f: ctx.progress("quantizing", low + (high - low) * f), discard=_discard)
    ranked = [r["node"] for r in ranking.layers if r["drop"] > 0 or r["cosine"] < 1.0] + ranking.not_measured
    if keep_as == "float":
        ranked = ranked[: len(ordered) - 1]  # every layer float would be no quantization at all
    search = s.Search(figures=before, met=goal.met(before))
    if not search.met:
        ctx.log("info", f"{goal.metric} drop {goal.drop(before):.4f} > {goal.max_drop}: searching the fewest "
                        f"most sensitive layers to keep {keep_as}")
        search = s.smallest_prefix(ranked, build, judge_all, goal, deadline, before, discard=_discard)
    kinds = {"float": "float", "int8": "at int8 weights (int4 elsewhere)"}
    report = {
        "method": f"measured: each layer quantized alone (every other quantizable layer kept {keep_as}), ranked by "
                  f"the drop in {probe_goal.metric} on the first {probes} {samples.source} samples, in eager "
                  f"torch (the portable .pt2's arithmetic); suggested_exclude checked on all {len(batches)}. Probes "
                  "run in order of lowest layer SQNR",
        "source": samples.source, "samples": len(batches), "probe_samples": probes, "goal": goal.to_dict(),
        "kept_as": kinds.get(keep_as, keep_as), "quantized": before.to_dict(),
        "layers": [{"name": r["node"], **{k: v for k, v in r.items() if k != "node"}} for r in ranking.layers],
        "not_measured": list(ranking.not_measured), "stopped_by": ranking.stopped_by or search.stopped_by,
        "suggested_exclude": s.exclude_patterns(search.kept), "suggested_reaches_goal": search.met,
        "suggested_fidelity": search.figures.to_dict() if search.figures else None, "tried": search.tried,
    }
    if keep_as != "float":
        report["suggested_exclude_note"] = (f"the search kept these layers {keep_as}; as config.exclude they stay "
                                            "float, which is at least as faithful")
    outcome = Outcome(report=report)
    if ctx.config.target is None:
        return outcome
    outcome.kept = list(search.kept)
    chosen = search.figures or before
    outcome.target = {**goal.to_dict(), "met": search.met, "before": before.to_dict(), "after": chosen.to_dict(),
                      "drop": round(goal.drop(chosen), 6), f"kept_{keep_as}": list(search.kept)}
    if search.kept and search.path is not None:
        outcome.target["cost"] = _cost(plain, search.path, batches[0], names, device)
        if plain_bytes is not None:
            outcome.target["cost"]["bytes_before"] = plain_bytes(plain)
    outcome.target["search_s"] = round(time.monotonic() - started, 3)
    outcome.error = target_error(ctx, goal, search, before, keep_as)
    return outcome


def _cost(plain: torch.fx.GraphModule, chosen: torch.fx.GraphModule, feed: dict[str, np.ndarray],
          names: list[str], device: str) -> dict[str, Any]:
    """Latency of the plain and the chosen candidate, interleaved; their sizes come from the saved files."""
    import torch

    a = pt2_common.runner_for_module(plain, names, threads=None, device=device)
    b = pt2_common.runner_for_module(chosen, names, threads=None, device=device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as metrics.latency: batch 1, one thread
    try:
        plain_ms, kept_ms = m.interleaved_latency(lambda: a(feed), lambda: b(feed), warmup=5, runs=LATENCY_RUNS)
    finally:
        torch.set_num_threads(threads)
    return {"ms_p50_before": round(plain_ms, 4), "ms_p50_after": round(kept_ms, 4),
            "latency": "batch 1, one thread, eager torch (the portable .pt2); a compiled package differs"}


def target_error(ctx: JobContext, goal: s.Goal, search: s.Search, before: s.Figures,
                   keep_as: str) -> dict[str, str] | None:
    """Log a met target; the target_not_met error otherwise."""
    chosen = search.figures or before
    what = f"{goal.metric} drop {goal.drop(chosen):.4f} ({'relative' if goal.relative else 'absolute'}; at most " \
           f"{goal.max_drop} asked)"
    if search.met:
        ctx.log("info", f"target met: {what}; kept {keep_as}: {', '.join(search.kept) or 'none'}")
        return None
    why = "the time budget ran out" if search.stopped_by == "budget" else \
        f"keeping every measured layer {keep_as} did not reach it"
    return {"code": "target_not_met", "message": f"the accuracy target was not met within {goal.budget_s:g} s "
            f"({why}): best candidate {what}, with {len(search.kept)} layer(s) kept {keep_as}; it is delivered as "
            "the job's artifact"}


def attach(result: QuantizeResult, outcome: Outcome) -> QuantizeResult:
    """metrics.sensitivity (and metrics.target, and target_not_met) on a delivered result."""
    result.metrics["sensitivity"] = outcome.report
    if outcome.target is not None:
        result.metrics["target"] = outcome.target
        cost = outcome.target.get("cost")
        if cost is not None:
            after, before = result.metrics["size"]["quantized_bytes"], cost.get("bytes_before")
            cost["bytes_after"] = after
            kept = outcome.target.get("kept_float", outcome.target.get("kept_int8", []))
            cost["note"] = (f"keeping {len(kept)} layer(s) at higher precision changed the .pt2 by "
                            f"{'?' if before is None else f'{after - before:+d}'} bytes and the eager call by "
                            f"{cost['ms_p50_after'] - cost['ms_p50_before']:+.4f} ms")
    result.error = outcome.error
    return result
