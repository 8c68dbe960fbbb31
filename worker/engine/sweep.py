"""method auto, format-neutral: which candidates a sweep runs, each one's row, the Pareto front and the pick.

auto_runner.py runs the planned candidates through their own registry handlers and measures them alike (each
format's auto.py brings the model, its samples and runners); everything here is bookkeeping on the figures it
brings back, kept free of any runtime so that the choice can be tested on plain numbers. The goal is
sensitivity.py's: the user's target, else the default that suggested_exclude aims for (1% relative top-1, 1% top-1
agreement, or cosine 0.995).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.engine.config import AutoConfig
from worker.engine.registry import SPECS
from worker.engine.sensitivity import Figures, Goal
from worker.engine.types import Device, Method, ModelFormat

# Each candidate: the registry's method and the options that make it this candidate (the user's exclude and
# target are added to them). Two calibration algorithms for static, as issue 14 asks: minmax is the cheap one,
# entropy the one that clips long tails (ENGINE.md: equal on the digits CNN, ~2x the calibration time); the torch
# formats have no entropy observer (registry._torch_static_limits), so theirs is histogram, the observer that
# searches the clipping range minimising the L2 error.
CANDIDATES: dict[str, tuple[Method, dict[str, Any]]] = {
    "dynamic": (Method.dynamic, {}),
    "static_minmax": (Method.static, {"calibration": {"algorithm": "minmax"}}),
    "static_entropy": (Method.static, {"calibration": {"algorithm": "entropy"}}),
    "static_histogram": (Method.static, {"calibration": {"algorithm": "histogram"}}),
    "weight_only_int8": (Method.weight_only, {"dtype": "int8"}),
    "weight_only_int4": (Method.weight_only, {"dtype": "int4"}),
}
# Latencies this close to the fastest are a tie (this shared 2-core machine moves a p50 by a few percent between
# runs): the smaller file wins it, then the more faithful one.
LATENCY_TIE = 0.05
# Why a candidate did not run that is the sweep's own (the others are the job error codes its method raised)
SWEEP_CODES = ("needs_calibration", "budget_exceeded")
# What weight_only quantizes in each format, for the row of a model that has none
LINEAR_WEIGHTS = {ModelFormat.onnx: "MatMul/Gemm", ModelFormat.torch_export: "Linear/Embedding",
                  ModelFormat.hf: "Linear"}


@dataclass(frozen=True)
class Planned:
    name: str
    method: Method
    config: dict[str, Any]  # the candidate's effective config, as the API would echo it
    skip: dict[str, str] | None = None  # {"code", "message"}: why it does not run here


def plan(fmt: ModelFormat, config: AutoConfig, *, device: Device, has_calibration: bool,
         has_linear_weights: bool) -> list[Planned]:
    """The candidates of this sweep, in order; each that cannot run here carries its reason instead."""
    spec = SPECS[(fmt, Method.auto)]
    planned = []
    for name in config.candidates or spec.sweep_candidates:
        method, options = CANDIDATES[name]
        inner = SPECS.get((fmt, method))
        if inner is None:
            planned.append(Planned(name, method, options, skipped("unsupported", f"{fmt}/{method} is not offered")))
            continue
        options = {**options, "exclude": list(config.exclude)}
        if config.target is not None and inner.supports_target and config.target.metric in inner.target_metrics:
            # a method that can keep layers float to reach the target gets the chance to; the others are judged
            options["target"] = config.target.model_dump(mode="json")
        effective = inner.config_model.model_validate(options)
        dumped = effective.model_dump(mode="json")
        problems = inner.config_problems(effective, device)
        if problems:
            skip = skipped("unsupported", "; ".join(f"config.{f}: {why}" for f, why in problems))
        elif inner.needs_calibration and not has_calibration:
            skip = skipped("needs_calibration", f"{method} needs calibration_dataset_id; give one to try it")
        elif method == Method.weight_only and not has_linear_weights:
            what = LINEAR_WEIGHTS.get(fmt, "Linear")
            skip = skipped("nothing_to_quantize", f"weight_only quantizes {what} weights and this model has none")
        else:
            skip = None
        planned.append(Planned(name, method, dumped, skip))
    return planned


def skipped(code: str, message: str) -> dict[str, str]:
    """A row's `error`: {"code", "message"}."""
    return {"code": code, "message": message}


def measured_row(candidate: Planned, metrics: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The table row of a candidate that delivered, from its own metrics (latency filled in by the caller)."""
    fidelity, accuracy = metrics.get("fidelity") or {}, metrics.get("accuracy") or {}
    found = {"cosine": fidelity.get("cosine"), "top1_agreement": fidelity.get("top1_agreement"),
             "accuracy": accuracy.get("quantized")}
    perplexity = (metrics.get("perplexity") or {}).get("quantized")
    if perplexity is not None:  # hf causal LMs on text; the other formats' rows keep their shape
        found["perplexity"] = perplexity
    return {**_base(candidate), "size_ratio": metrics["size"]["ratio"],
            "quantized_bytes": metrics["size"]["quantized_bytes"], "fidelity": found,
            "latency": None, "seconds": round(seconds, 3), "warnings": list(metrics.get("warnings") or [])}


def failed_row(candidate: Planned, error: dict[str, str], seconds: float = 0.0) -> dict[str, Any]:
    return {**_base(candidate), "size_ratio": None, "quantized_bytes": None, "fidelity": None, "latency": None,
            "seconds": round(seconds, 3), "warnings": [], "error": error}


def _base(candidate: Planned) -> dict[str, Any]:
    return {"name": candidate.name, "method": candidate.method.value, "config": candidate.config,
            "meets_target": None, "drop": None, "pareto": False, "recommended": False, "error": None}


def figures(row: dict[str, Any]) -> Figures:
    f = row["fidelity"]
    return Figures(cosine=f["cosine"], top1_agreement=f["top1_agreement"], accuracy=f["accuracy"],
                   perplexity=f.get("perplexity"))


@dataclass
class Choice:
    recommended: str
    met: bool  # the recommended candidate meets the goal
    why: str
    warnings: list[str] = field(default_factory=list)


def pareto(points: Sequence[tuple[float, ...]]) -> list[bool]:
    """For each point (lower is better on every axis): whether no other point is at least as good everywhere and
    better somewhere. Equal points are all on the front."""
    def dominated(p: tuple[float, ...]) -> bool:
        return any(all(a <= b for a, b in zip(q, p, strict=True)) and q != p for q in points)

    return [not dominated(p) for p in points]


def choose(rows: list[dict[str, Any]], goal: Goal) -> Choice:
    """Mark every measured row (meets_target, drop, pareto) and pick one: the fastest that meets the goal (a tie
    within LATENCY_TIE goes to the smaller file), else the most faithful. Rows need their latency filled in."""
    measured = [r for r in rows if r["error"] is None]
    if not measured:
        raise ValueError("no candidate was measured")
    for r in measured:
        drop = goal.drop(figures(r))
        r["drop"], r["meets_target"] = round(drop, 6), goal.met(figures(r))
    axes = [(r["size_ratio"], goal.drop(figures(r)), r["latency"]["ms_p50"]) for r in measured]
    for r, on_front in zip(measured, pareto(axes), strict=True):
        r["pareto"] = on_front
    what = describe(goal)
    meeting = [r for r in measured if r["meets_target"]]
    if meeting:
        fastest = min(r["latency"]["ms_p50"] for r in meeting)
        tied = [r for r in meeting if r["latency"]["ms_p50"] <= fastest * (1 + LATENCY_TIE)]
        pick = min(tied, key=lambda r: (r["size_ratio"], r["drop"], r["latency"]["ms_p50"]))
        tie = (f"; {len(tied)} were within {LATENCY_TIE:.0%} of the fastest, and the smallest of them is taken"
               if len(tied) > 1 else "")
        why = (f"{pick['name']} is the fastest of the {len(meeting)} candidate(s) meeting {what}: "
               f"{_figures(pick, goal)}{tie}")
        choice = Choice(pick["name"], True, why)
    else:
        pick = min(measured, key=lambda r: (r["drop"], r["latency"]["ms_p50"]))
        why = (f"no candidate meets {what}; {pick['name']} is the most faithful of the {len(measured)} measured: "
               f"{_figures(pick, goal)}")
        warning = f"method auto: {why}"
        if not goal.from_target:
            warning += "; give config.target to make this a failure, or exclude the layers metrics.sensitivity names"
        choice = Choice(pick["name"], False, why, [warning])
    pick["recommended"] = True
    return choice


def describe(goal: Goal) -> str:
    how = f"{goal.max_drop:.0%} relative" if goal.relative else f"{goal.max_drop:g}"
    source = "the target" if goal.from_target else "the default goal"
    return f"{source} ({goal.metric} drop at most {how})"


def _figures(row: dict[str, Any], goal: Goal) -> str:
    latency = row["latency"]
    return (f"{latency['ms_p50']:.4g} ms p50 ({latency['speedup']:.2f}x float), size {row['size_ratio']:.3f}x, "
            f"{goal.metric} drop {row['drop']:.4g}")
