"""metrics.sensitivity and metrics.target for a format whose candidates are built and run in memory.

sensitivity.py holds the probes and the prefix search; this module is the rest of a job's analysis that does not
depend on the format: the goal (measured against the float model's outputs), the probe and judge bookkeeping on the
samples, the report and target dicts, the target_not_met error, and attach(). A format (torch_export/sensitivity.py,
torchscript/sensitivity.py) supplies how to run a candidate on the samples, the probe order, and the cost figures.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import metrics as m
from worker.engine import sensitivity as s

if TYPE_CHECKING:
    from worker.engine import evaluate
    from worker.engine.context import JobContext
    from worker.engine.types import QuantizeResult

# a candidate (any object the format runs) and the first `upto` samples -> each sample's outputs
Outputs = Callable[[Any, int], list[list[np.ndarray]]]
Perplexity = Callable[[Any, int], "float | None"]  # a candidate and the first `upto` samples -> its perplexity


@dataclass
class Outcome:
    report: dict[str, Any]  # metrics.sensitivity
    target: dict[str, Any] | None = None  # metrics.target, when the config has one
    kept: list[str] = field(default_factory=list)  # layers the target keeps at higher precision, worst first
    error: dict[str, str] | None = None  # {"code": "target_not_met", "message"} when the target failed


def keep_in_memory(_candidate: object) -> None:
    """Candidates live in memory; dropping the last reference frees them (sensitivity.rank's `discard`)."""


def analyse(ctx: JobContext, *, float_model: object, plain: object, build: Callable[[frozenset[str]], object],
            outputs: Outputs, order: Callable[[], list[str]], samples: evaluate.Samples, runs_in: str,
            keep_as: str = "float", span: tuple[float, float] = (0.40, 0.45),
            latency: Callable[[object, object], dict[str, Any]] | None = None,
            plain_bytes: Callable[[object], int] | None = None, perplexity: Perplexity | None = None) -> Outcome:
    """metrics.sensitivity for `plain` (whose quantized layers order() returns, most suspect first), and with
    config.target the fewest most sensitive layers to keep at `keep_as` ("float", or "int8" for int4 weight-only)
    until it holds. build(kept) quantizes with `kept` at higher precision; runs_in says what runs the candidates
    (for the report's method). Returns what to keep; the handler builds and delivers that. latency(plain, chosen)
    gives metrics.target.cost's latency (latency_cost), plain_bytes(plain) the plain candidate's saved size
    (attach() reads the delivered one); plain_bytes may consume `plain`. perplexity(candidate, upto), where the
    format measures it (hf causal LMs on text), adds it to every figure and makes it a metric a target may name."""
    started = time.monotonic()
    batches, labels = samples.batches, samples.labels
    reference = outputs(float_model, len(batches))
    float_perplexity = None if perplexity is None else perplexity(float_model, len(batches))
    goal = s.goal_on(ctx.config.target, reference, labels, float_perplexity=float_perplexity)
    deadline = started + goal.budget_s
    probes = min(len(batches), s.PROBE_SAMPLES)
    probe_labels = None if labels is None else labels[:probes]
    probe_goal = goal
    if goal.metric == "accuracy" and probe_labels is not None:  # the probes' drop is against float on the same samples
        probe_goal = dataclasses.replace(goal, float_value=m.accuracy_top1([r[0] for r in reference[:probes]],
                                                                           probe_labels) or 0.0)
    if goal.metric == "perplexity" and perplexity is not None:  # likewise: the float model's on the probe samples
        probe_goal = dataclasses.replace(goal, float_value=perplexity(float_model, probes) or 0.0)

    def judge(candidate: object, upto: int, labels_: np.ndarray | None) -> s.Figures:
        found = s.figures(reference[:upto], outputs(candidate, upto), labels_)
        return found if perplexity is None else dataclasses.replace(found, perplexity=perplexity(candidate, upto))

    def judge_all(candidate: object) -> s.Figures:
        return judge(candidate, len(batches), labels)

    def judge_probe(candidate: object) -> s.Figures:
        return judge(candidate, probes, probe_labels)

    low, high = span
    before = judge_all(plain)
    ordered = order()
    ranking = s.rank(ordered, build, judge_probe, probe_goal, deadline,
                     lambda f: ctx.progress("quantizing", low + (high - low) * f), discard=keep_in_memory)
    ranked = [r["node"] for r in ranking.layers if r["drop"] > 0 or r["cosine"] < 1.0] + ranking.not_measured
    if keep_as == "float":
        ranked = ranked[: len(ordered) - 1]  # every layer float would be no quantization at all
    search = s.Search(figures=before, met=goal.met(before))
    if not search.met:
        ctx.log("info", f"{goal.metric} drop {goal.drop(before):.4f} > {goal.max_drop}: searching the fewest "
                        f"most sensitive layers to keep {keep_as}")
        search = s.smallest_prefix(ranked, build, judge_all, goal, deadline, before, discard=keep_in_memory)
    kinds = {"float": "float", "int8": "at int8 weights (int4 elsewhere)"}
    report = {
        "method": f"measured: each layer quantized alone (every other quantizable layer kept {keep_as}), ranked by "
                  f"the drop in {probe_goal.metric} on the first {probes} {samples.source} samples, {runs_in}; "
                  f"suggested_exclude checked on all {len(batches)}. Probes run in order of lowest layer SQNR",
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
        outcome.target["cost"] = latency(plain, search.path) if latency is not None else {}
        if plain_bytes is not None:
            outcome.target["cost"]["bytes_before"] = plain_bytes(plain)
    outcome.target["search_s"] = round(time.monotonic() - started, 3)
    outcome.error = target_error(ctx, goal, search, before, keep_as)
    return outcome


def latency_cost(plain_call: Callable[[], object], chosen_call: Callable[[], object], runs: int,
                 runtime: str) -> dict[str, Any]:
    """metrics.target.cost's latency: the plain and the chosen candidate interleaved, batch 1, one thread."""
    with m.one_torch_thread():
        plain_ms, kept_ms = m.interleaved_latency(plain_call, chosen_call, warmup=5, runs=runs)
    return {"ms_p50_before": round(plain_ms, 4), "ms_p50_after": round(kept_ms, 4), "latency": runtime}


def by_lowest_sqnr(ctx: JobContext, candidates: Sequence[str], measure: Callable[[], dict[str, float | None]]
                   ) -> list[str]:
    """Candidates by lowest layer SQNR first (measure() -> name: dB; unmatched last, in the given order), so a
    budget that runs out leaves the least suspect unmeasured; the given order where SQNR cannot be read."""
    try:
        sqnr = measure()
    except Exception as exc:  # only the order of the probes depends on it
        ctx.log("warning", f"per-layer SQNR for the probe order not measured: {type(exc).__name__}: {exc}")
        return list(candidates)
    return sorted(candidates, key=lambda name: float("inf") if sqnr.get(name) is None else sqnr[name])


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
            model = next((a for a in result.artifacts if a.kind == "model"), None)
            suffix = Path(model.filename).suffix if model is not None else ""
            call = (f" and the call by {cost['ms_p50_after'] - cost['ms_p50_before']:+.4f} ms"
                    if "ms_p50_after" in cost else "")
            cost["note"] = (f"keeping {len(kept)} layer(s) at higher precision changed the {suffix or 'file'} by "
                            f"{'?' if before is None else f'{after - before:+d}'} bytes{call}")
    result.error = outcome.error
    return result
