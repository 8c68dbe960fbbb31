"""ONNX sensitivity and targets: sensitivity.py's probes and prefix search, run on re-quantized files in onnxruntime."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import evaluate
from worker.engine import metrics as m
from worker.engine import sensitivity as s
from worker.engine.onnx import common as onnx_common

if TYPE_CHECKING:
    from worker.engine.config import TargetConfig
    from worker.engine.context import JobContext

Requantize = Callable[[frozenset[str], Path], None]  # nodes kept float (beyond the method's own) -> file
LATENCY_RUNS = 50  # the target's latency cost: a quick interleaved comparison, not the report's headline figure


@dataclass
class Outcome:
    report: dict[str, Any]  # metrics.sensitivity
    target: dict[str, Any] | None = None  # metrics.target, when the config has one
    kept: set[str] = field(default_factory=set)  # nodes now float in the delivered file, for the target
    error: dict[str, str] | None = None  # {"code": "target_not_met", "message"} when the target failed


def layer_names(nodes: list[onnx_common.WeightNode]) -> dict[str, str]:
    """node -> the name suggested_exclude uses: its layer name, or the node name where layers share a name."""
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n.layer] = counts.get(n.layer, 0) + 1
    return {n.node: n.layer if counts[n.layer] == 1 else n.node for n in nodes}


def suggested_exclude(kept: list[str], nodes: list[onnx_common.WeightNode], names: dict[str, str]) -> list[str]:
    """config.exclude regexes for exactly `kept`; node names where a layer name would catch more."""
    patterns = s.exclude_patterns([names[k] for k in kept])
    every = {n.node: (n.node, n.layer, *n.weights) for n in nodes}
    if s.round_trips(patterns, every, set(kept)):
        return patterns
    return s.exclude_patterns(kept)


def judge(path: Path, reference: list[list[np.ndarray]], batches: list[dict[str, np.ndarray]],
           labels: np.ndarray | None) -> s.Figures:
    runner = onnx_common.load_runner(path, threads=None, ours=True)
    return s.figures(reference, [evaluate.unpadded(b, runner(b)) for b in batches], labels)


def _latency_ms(first: Path, second: Path, feed: dict[str, np.ndarray]) -> tuple[float, float]:
    a, b = onnx_common.load_runner(first, threads=1), onnx_common.load_runner(second, threads=1)
    return m.interleaved_latency(lambda: a(feed), lambda: b(feed), warmup=5, runs=LATENCY_RUNS)


def float_goal(target: TargetConfig | None, model_path: Path, samples: evaluate.Samples
               ) -> tuple[s.Goal, list[list[np.ndarray]]]:
    """The goal (the target, else the default) on these samples, and the float model's outputs it was read from."""
    float_runner = onnx_common.load_runner(model_path, threads=None)
    reference = [evaluate.unpadded(b, float_runner(b)) for b in samples.batches]
    return s.goal_on(target, reference, samples.labels), reference


def analyse(ctx: JobContext, *, output: Path, model_path: Path, nodes: list[onnx_common.WeightNode],
            quantized: set[str], requantize: Requantize, samples: evaluate.Samples, sqnr: dict[str, float],
            scratch: Path) -> Outcome:
    """metrics.sensitivity for the file at `output` (whose `quantized` nodes are candidates), and with
    config.target the search that keeps the most sensitive of them float until the target holds; the chosen
    file then replaces `output`."""
    started = time.monotonic()
    batches, labels = samples.batches, samples.labels
    goal, reference = float_goal(ctx.config.target, model_path, samples)
    deadline = started + goal.budget_s
    probes = batches[: s.PROBE_SAMPLES]
    probe_labels = None if labels is None else labels[: len(probes)]
    probe_goal = goal
    if goal.metric == "accuracy" and probe_labels is not None:  # the probes' drop is against float on the same samples
        probe_goal = dataclasses.replace(goal, float_value=m.accuracy_top1([r[0] for r in reference[: len(probes)]],
                                                                           probe_labels) or 0.0)
    counter = iter(range(10**6))

    def build(kept: frozenset[str]) -> Path:
        path = scratch / f"sensitivity_{next(counter)}.onnx"
        requantize(kept, path)
        return path

    def judge_all(path: Path) -> s.Figures:
        return judge(path, reference, batches, labels)

    before = judge_all(output)
    # most suspect first (lowest layer SQNR), so a budget that runs out leaves the least suspect unmeasured
    candidates = sorted((n.node for n in nodes if n.node in quantized), key=lambda n: sqnr.get(n, float("inf")))
    ranking = s.rank(candidates, build, lambda p: judge(p, reference[: len(probes)], probes, probe_labels),
                     probe_goal, deadline, lambda f: ctx.progress("quantizing", 0.62 + 0.05 * f))
    names, ops = layer_names(nodes), {n.node: n.op for n in nodes}
    ranked = [r["node"] for r in ranking.layers if r["drop"] > 0 or r["cosine"] < 1.0] + ranking.not_measured
    ranked = ranked[: len(candidates) - 1]  # every layer float would be no quantization at all
    search = s.Search(figures=before, met=goal.met(before))
    if not search.met:
        ctx.log("info", f"{goal.metric} drop {goal.drop(before):.4f} > {goal.max_drop}: searching the fewest "
                        "most sensitive layers to keep float")
        search = s.smallest_prefix(ranked, build, judge_all, goal, deadline, before)
    report = {
        "method": "measured: each layer quantized alone (every other quantizable layer float), ranked by the drop "
                  f"in {probe_goal.metric} on the first {len(probes)} {samples.source} samples; suggested_exclude "
                  f"checked on all {len(batches)}. Probes run in order of lowest layer SQNR",
        "source": samples.source, "samples": len(batches), "probe_samples": len(probes), "goal": goal.to_dict(),
        "quantized": before.to_dict(),
        "layers": [{"name": names[r["node"]], "op": ops[r["node"]], **{k: v for k, v in r.items() if k != "node"}}
                   for r in ranking.layers],
        "not_measured": [names[n] for n in ranking.not_measured], "stopped_by": ranking.stopped_by or search.stopped_by,
        "suggested_exclude": suggested_exclude(search.kept, nodes, names), "suggested_reaches_goal": search.met,
        "suggested_fidelity": search.figures.to_dict() if search.figures else None, "tried": search.tried,
    }
    outcome = Outcome(report=report)
    if ctx.config.target is None:
        if search.path is not None:
            search.path.unlink(missing_ok=True)
        return outcome
    return _apply_target(ctx, outcome, output, search, goal, before, names, batches[0], started)


def _apply_target(ctx: JobContext, outcome: Outcome, output: Path, search: s.Search, goal: s.Goal,
                  before: s.Figures, names: dict[str, str], feed: dict[str, np.ndarray], started: float) -> Outcome:
    """The target's figures, and the chosen candidate in place of `output` when layers were kept float."""
    chosen = search.figures or before
    target: dict[str, Any] = {**goal.to_dict(), "met": search.met, "before": before.to_dict(),
                              "after": chosen.to_dict(), "drop": round(goal.drop(chosen), 6),
                              "kept_float": [names[k] for k in search.kept]}
    if search.path is not None and search.kept:
        plain_bytes, kept_bytes = output.stat().st_size, search.path.stat().st_size
        plain_ms, kept_ms = _latency_ms(output, search.path, feed)
        shutil.move(search.path, output)
        outcome.kept = set(search.kept)
        target["cost"] = {"bytes_before": plain_bytes, "bytes_after": kept_bytes,
                          "ms_p50_before": round(plain_ms, 4), "ms_p50_after": round(kept_ms, 4),
                          "note": f"keeping {len(search.kept)} layer(s) float added {kept_bytes - plain_bytes} "
                                  f"bytes and {kept_ms - plain_ms:+.4f} ms per call (batch 1, one thread)"}
    target["search_s"] = round(time.monotonic() - started, 3)
    outcome.target = target
    what = f"{goal.metric} drop {goal.drop(chosen):.4f} ({'relative' if goal.relative else 'absolute'}; at most " \
           f"{goal.max_drop} asked)"
    if search.met:
        kept = ", ".join(target["kept_float"]) or "none"
        ctx.log("info", f"target met: {what}; kept float: {kept}")
    else:
        why = "the time budget ran out" if search.stopped_by == "budget" else "keeping every measured layer " \
              "float did not reach it"
        outcome.error = {"code": "target_not_met", "message": f"the accuracy target was not met within "
                         f"{goal.budget_s:g} s ({why}): best candidate {what}, with "
                         f"{len(search.kept)} layer(s) kept float; it is delivered as the job's artifact"}
    return outcome
