"""Per-layer sensitivity and accuracy targets, format-neutral: rank layers by measured loss, find the fewest to keep.

A format supplies two callables: `build(kept)` quantizes with the node names in `kept` left at higher precision and
returns the file it wrote, and `judge(path)` measures that file (Figures). Everything here is bookkeeping around
them: the goal (the user's target, else a default), one probe per layer with only that layer quantized, and a
prefix search over the ranking, bounded by a time budget. The layer SQNR drop (onnx/sensitive.py) did not rank a
real detector's layers well, and weight_only_mixed.py found a measured one-layer ranking good enough for int4, so
ranking here is measured; only the order of the probes (most suspect first, for the budget) comes from SQNR.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine import metrics as m
from worker.engine.config import MethodConfig, TargetConfig
from worker.engine.errors import EngineError

# Without a target: what the report's suggested_exclude aims for (issue 14): 1% relative top-1, else cosine 0.995
DEFAULT_RELATIVE_TOP1 = 0.01
DEFAULT_COSINE = 0.995
DEFAULT_BUDGET_S = 20.0  # sensitivity in every report: at most this much longer than a job without it
MAX_PROBES = 48  # one quantization + one pass over the probe samples per layer
PROBE_SAMPLES = 64


@dataclass(frozen=True)
class Figures:
    """One candidate's fidelity on the measured samples, against the float model."""

    cosine: float  # the worst output's mean per-sample cosine
    top1_agreement: float | None
    accuracy: float | None  # top-1 against labels
    perplexity: float | None = None  # causal LMs on text (hf); higher is worse, unlike the others

    def value(self, metric: str) -> float | None:
        return {"cosine": self.cosine, "top1_agreement": self.top1_agreement, "accuracy": self.accuracy,
                "perplexity": self.perplexity}.get(metric)

    def to_dict(self) -> dict[str, float | None]:
        found = {"cosine": round(self.cosine, 6), "accuracy": _round(self.accuracy),
                 "top1_agreement": _round(self.top1_agreement)}
        if self.perplexity is not None:  # only where measured: other formats' figures keep their shape
            found["perplexity"] = _round(self.perplexity)
        return found


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def figures(reference: Sequence[Sequence[np.ndarray]], outputs: Sequence[Sequence[np.ndarray]],
            labels: np.ndarray | None) -> Figures:
    """Figures of quantized `outputs` against float `reference` (per sample, per output)."""
    first = [o[0] for o in outputs]
    return Figures(cosine=m.worst_cosine(reference, outputs)[0],
                   top1_agreement=m.top1_agreement([r[0] for r in reference], first),
                   accuracy=None if labels is None else m.accuracy_top1(first, labels[: len(first)]))


@dataclass(frozen=True)
class Goal:
    """What counts as faithful: `metric` may lose at most `max_drop` (a share of the float figure when relative)."""

    metric: str
    max_drop: float
    relative: bool
    float_value: float
    budget_s: float
    from_target: bool  # the user's target; False: the default that only shapes suggested_exclude

    def drop(self, found: Figures) -> float:
        value = found.value(self.metric)
        if value is None:
            return float("inf")
        # perplexity rises as the model gets worse: its drop is the rise, so that every metric's drop is a loss
        lost = value - self.float_value if self.metric == "perplexity" else self.float_value - value
        return lost / self.float_value if self.relative and self.float_value else lost

    def met(self, found: Figures) -> bool:
        return self.drop(found) <= self.max_drop + 1e-9  # 1e-9: a figure exactly at the limit meets it

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "max_drop": self.max_drop, "relative": self.relative,
                "float": round(self.float_value, 6), "budget_s": self.budget_s,
                "source": "target" if self.from_target else "default"}


def goal(target: TargetConfig | None, float_accuracy: float | None, has_top1: bool, *,
         float_perplexity: float | None = None) -> Goal:
    """The user's target, else 1% relative top-1 accuracy (labels), 1% top-1 agreement (class scores), cosine 0.995.
    float_perplexity: the float model's, where the format measures it (hf causal LMs on text)."""
    if target is not None and target.metric == "perplexity":
        if float_perplexity is None:
            raise EngineError("config.target.metric 'perplexity' needs a causal language model (a ...ForCausalLM) "
                              "and real text: give an evaluation (or calibration) dataset of texts or input_ids, "
                              "or use top1_agreement or cosine", code="dataset_mismatch")
        return Goal("perplexity", target.max_drop, target.relative, float_perplexity, target.budget_s, True)
    if target is not None:
        if target.metric == "accuracy" and float_accuracy is None:
            raise EngineError("config.target.metric 'accuracy' needs labels: give an evaluation (or calibration) "
                              "dataset with an integer 'labels' array, or use top1_agreement or cosine",
                              code="dataset_mismatch")
        if target.metric == "top1_agreement" and not has_top1:
            raise EngineError("config.target.metric 'top1_agreement' needs a first output of class scores "
                              "[batch, classes]; use cosine for this model", code="unsupported")
        reference = float_accuracy if target.metric == "accuracy" else 1.0
        return Goal(target.metric, target.max_drop, target.relative, float(reference or 0.0), target.budget_s, True)
    if float_accuracy is not None:
        return Goal("accuracy", DEFAULT_RELATIVE_TOP1, True, float_accuracy, DEFAULT_BUDGET_S, False)
    if has_top1:
        return Goal("top1_agreement", DEFAULT_RELATIVE_TOP1, True, 1.0, DEFAULT_BUDGET_S, False)
    return Goal("cosine", 1.0 - DEFAULT_COSINE, False, 1.0, DEFAULT_BUDGET_S, False)


def goal_on(target: TargetConfig | None, reference: Sequence[Sequence[np.ndarray]], labels: np.ndarray | None, *,
            float_perplexity: float | None = None) -> Goal:
    """goal() read from the float model's outputs on the measured samples (reference: per sample, per output):
    its top-1 accuracy where there are labels, and whether its first output is class scores."""
    firsts = [r[0] for r in reference]
    float_accuracy = None if labels is None else m.accuracy_top1(firsts, labels)
    return goal(target, float_accuracy, m.top1_agreement(firsts, firsts) is not None,
                float_perplexity=float_perplexity)


def exclude_patterns(names: Sequence[str]) -> list[str]:
    """Anchored, escaped regexes that match exactly these layer names: ready for config.exclude."""
    return [f"^{re.escape(name)}$" for name in names]


def round_trips(patterns: Sequence[str], layer_names: dict[str, tuple[str, ...]], expected: set[str]) -> bool:
    """Whether `patterns` as config.exclude select exactly `expected` among nodes (node -> its names)."""
    config = MethodConfig(exclude=tuple(patterns))
    return {node for node, names in layer_names.items() if config.excludes(*names)} == expected


def prefix_steps(count: int) -> list[int]:
    """Prefix lengths to try, growing by half each time: 1, 2, 3, 4, 6, 9, 13, 19, 28, ..., count."""
    steps, k = [], 1
    while k < count:
        steps.append(k)
        k = max(k + 1, round(k * 1.5))
    return [*steps, count] if count else []


def shortest_reaching(count: int, attempt: Callable[[int], bool], stop: Callable[[int], bool]) -> str | None:
    """Try prefix lengths growing by half (prefix_steps) until attempt(k) reaches the goal, then bisect back to
    the shortest that still does; attempt keeps what it wants. stop(k), asked before each try, ends the search
    early. Returns "stopped" when stop ended it, "reached" or None (no prefix reached the goal)."""
    short = 0  # the longest prefix known to fall short
    for k in prefix_steps(count):
        if stop(k):
            return "stopped"
        if attempt(k):
            while k - short > 1:
                middle = (k + short) // 2
                if stop(middle):
                    return "reached"
                if attempt(middle):
                    k = middle
                else:
                    short = middle
            return "reached"
        short = k
    return None


Build = Callable[[frozenset[str]], Path]  # node names kept at higher precision -> the file written
Judge = Callable[[Path], Figures]


def unlink(path: Path) -> None:
    """The default way to drop a candidate: each is a whole model file. A format that builds candidates in
    memory (torch_export/sensitivity.py) passes its own `discard` and may build any object, not a Path."""
    path.unlink(missing_ok=True)


@dataclass
class Ranking:
    layers: list[dict[str, Any]] = field(default_factory=list)  # measured, worst first
    not_measured: list[str] = field(default_factory=list)  # nodes the cap or the budget left out
    stopped_by: str | None = None  # "cap" | "budget" | None


def rank(candidates: Sequence[str], build: Build, judge: Judge, the_goal: Goal, deadline: float,
         progress: Callable[[float], None], discard: Callable[[Any], None] = unlink) -> Ranking:
    """Quantize each candidate alone (every other candidate kept) and measure; worst first. `candidates` come
    most-suspect first, so a budget that runs out leaves the least suspect unmeasured."""
    ranking = Ranking()
    if len(candidates) > MAX_PROBES:
        ranking.not_measured, ranking.stopped_by = list(candidates[MAX_PROBES:]), "cap"
        candidates = candidates[:MAX_PROBES]
    everyone = frozenset(candidates)
    for i, node in enumerate(candidates):
        if time.monotonic() > deadline:
            ranking.not_measured[:0], ranking.stopped_by = list(candidates[i:]), "budget"
            break
        progress(i / max(1, len(candidates)))
        path = build(everyone - {node})
        found = judge(path)
        discard(path)  # each probe is a whole model
        ranking.layers.append({"node": node, "drop": round(the_goal.drop(found), 6), **found.to_dict()})
    ranking.layers.sort(key=lambda r: (-r["drop"], r["cosine"]))
    return ranking


@dataclass
class Search:
    kept: list[str] = field(default_factory=list)  # the chosen prefix (worst first)
    figures: Figures | None = None
    path: Path | None = None  # the chosen candidate's file, when one was built
    met: bool = False
    tried: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str | None = None


def smallest_prefix(ranked: Sequence[str], build: Build, judge: Judge, the_goal: Goal, deadline: float,
                    before: Figures, discard: Callable[[Any], None] = unlink) -> Search:
    """The shortest prefix of `ranked` whose candidate meets the goal: prefixes grow by half, then bisect back.
    Short of the goal, the candidate with the smallest drop. Only the chosen candidate's file stays on disk."""
    result = Search(figures=before)

    def attempt(k: int) -> bool:
        path = build(frozenset(ranked[:k]))
        found = judge(path)
        result.tried.append({"kept": k, "drop": round(the_goal.drop(found), 6), **found.to_dict()})
        reached = the_goal.met(found)
        better = (reached and (not result.met or k < len(result.kept))) or \
            (not result.met and the_goal.drop(found) < the_goal.drop(result.figures or before))
        dropped: Path | None = path
        if better:
            dropped, result.path = result.path, path
            result.kept, result.figures, result.met = list(ranked[:k]), found, reached
        if dropped is not None:
            discard(dropped)
        return reached

    ended = shortest_reaching(len(ranked), attempt, lambda _k: time.monotonic() > deadline)
    if ended == "stopped":
        result.stopped_by = "budget"
    return result
