"""ONNX weight-only: metrics.sensitivity and config.target (issue 14), over sensitivity.py's probes and prefix search.

- The ranking, as dynamic and static rank theirs (onnx/sensitivity.py): each quantizable layer quantized alone at
  the job's bits (every other one float), measured on the probe samples. suggested_exclude is the shortest prefix of
  it that, kept float, brings the job's own quantization (its 8-bit keeps included) within the goal.
- A target escalates as the issue asks, cheapest precision first: int4 layers go to 8 bits, in the order of the
  tuning cosine each gains at 8 bits per weight (weight_only_mixed.measure_gains, what its fixed 0.99 promotion ranks
  by), the shortest prefix that reaches the target (sensitivity.shortest_reaching); when every layer at 8 bits still
  misses, layers go float, most sensitive first by the ranking, the others staying at 8 bits.
Every candidate is a whole re-quantized file measured in onnxruntime. Delivered: the smallest file that meets the
target, else the one with the smallest drop; past budget_s the job fails as target_not_met and delivers that one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import evaluate
from worker.engine import metrics as m
from worker.engine import sensitivity as s
from worker.engine.onnx import common as onnx_common
from worker.engine.onnx import sensitivity as onnx_sensitivity
from worker.engine.onnx import weight_only_budget
from worker.engine.onnx import weight_only_mixed as mixed

if TYPE_CHECKING:
    from worker.engine.config import TargetConfig
    from worker.engine.context import JobContext

Build = Callable[[frozenset[str], frozenset[str]], Path]  # (nodes kept float, nodes at 8 bits) -> the file written
# Without a target the ranking only fills the report: it costs a job at most sensitivity's default budget
RANK_BUDGET_S = s.DEFAULT_BUDGET_S
RANK_SHARE = 0.6  # of that budget for the ranking; the suggestion's prefix search gets the rest


@dataclass
class Measure:
    """The goal, and the float model's outputs it is judged against: all samples for a candidate, the first
    PROBE_SAMPLES for a one-layer probe (whose goal's float figure is read on those same samples)."""

    goal: s.Goal
    probe_goal: s.Goal
    reference: list[list[np.ndarray]]
    batches: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    source: str

    @classmethod
    def of(cls, target: TargetConfig | None, model_path: Path, samples: evaluate.Samples) -> Measure:
        goal, reference = onnx_sensitivity.float_goal(target, model_path, samples)
        count = min(s.PROBE_SAMPLES, len(samples.batches))
        probe_goal = goal
        if goal.metric == "accuracy" and samples.labels is not None:
            probe_goal = dataclasses.replace(goal, float_value=m.accuracy_top1([r[0] for r in reference[:count]],
                                                                               samples.labels[:count]) or 0.0)
        return cls(goal, probe_goal, reference, samples.batches, samples.labels, samples.source)

    @property
    def probe_count(self) -> int:
        return min(s.PROBE_SAMPLES, len(self.batches))

    def full(self, path: Path) -> s.Figures:
        return self._judge(path, len(self.batches))

    def probe(self, path: Path) -> s.Figures:
        return self._judge(path, self.probe_count)

    def _judge(self, path: Path, count: int) -> s.Figures:
        labels = None if self.labels is None else self.labels[:count]
        return onnx_sensitivity.judge(path, self.reference[:count], self.batches[:count], labels)


@dataclass
class Job:
    """What both searches need: how to build a candidate, which layers, how to name them, how to judge."""

    ctx: JobContext
    build: Build
    candidates: dict[str, int]  # node -> weight elements: every layer the plain file quantized
    nodes: list[onnx_common.WeightNode]  # the upload's weight nodes (config.exclude matches these)
    measure: Measure
    bits: int  # the job's own: what a probe quantizes its one layer to

    def upload_node(self, node: str) -> onnx_common.WeightNode:
        """The upload's node behind a candidate: the Gemm -> MatMul rewrite named its MatMul `<gemm>_MatMul`."""
        by_name = {n.node: n for n in self.nodes}
        return by_name.get(node) or by_name[node.removesuffix("_MatMul")]

    def names(self, nodes: Sequence[str]) -> list[str]:
        """The layer name users know, or the node name where several nodes share that layer name."""
        names = onnx_sensitivity.layer_names(self.nodes)
        return [names[self.upload_node(n).node] for n in nodes]

    def suggested(self, kept: Sequence[str]) -> list[str]:
        """config.exclude regexes selecting exactly the upload nodes behind `kept`, as dynamic and static suggest."""
        upload = list(dict.fromkeys(self.upload_node(k).node for k in kept))
        return onnx_sensitivity.suggested_exclude(upload, self.nodes, onnx_sensitivity.layer_names(self.nodes))


@dataclass
class Candidate:
    path: Path
    eight: frozenset[str]  # nodes at 8 bits in an int4 job
    kept: frozenset[str]  # nodes kept float beyond the job's own
    figures: s.Figures
    step: str


@dataclass
class Best:
    """The best candidate so far: the smallest file that meets the goal, else the smallest drop. Only its file
    stays on disk, and never the caller's `plain` one is removed."""

    goal: s.Goal
    current: Candidate
    plain: Path
    tried: list[dict[str, Any]] = field(default_factory=list)

    def met(self) -> bool:
        return self.goal.met(self.current.figures)

    def offer(self, job: Job, candidate: Candidate) -> bool:
        found, goal = candidate.figures, self.goal
        job.ctx.log("info", f"target: {len(candidate.eight - candidate.kept)} layer(s) at 8 bits, "
                            f"{len(candidate.kept)} float: {goal.metric} drop {goal.drop(found):.4f}")
        self.tried.append({"step": candidate.step, "at_8_bits": len(candidate.eight - candidate.kept),
                           "float": len(candidate.kept), "drop": round(goal.drop(found), 6), **found.to_dict()})
        if goal.met(found):
            better = not self.met() or candidate.path.stat().st_size < self.current.path.stat().st_size
        else:
            better = not self.met() and goal.drop(found) < goal.drop(self.current.figures)
        dropped = self.current.path if better else candidate.path
        if better:
            self.current = candidate
        if dropped != self.plain:
            dropped.unlink(missing_ok=True)
        return goal.met(found)


@dataclass
class Outcome:
    report: dict[str, Any]  # metrics.sensitivity
    target: dict[str, Any] | None = None  # metrics.target, with config.target
    path: Path | None = None  # the target's chosen file, when it is not the plain one
    promotion: mixed.Promotion = field(default_factory=mixed.Promotion)  # its 8-bit layers, for the summary
    error: dict[str, str] | None = None  # {"code": "target_not_met", "message"}


def rank(job: Job, order: Sequence[str], deadline: float) -> s.Ranking:
    """sensitivity.rank over `order` (most suspect first): each candidate alone at the job's bits."""
    return s.rank(list(order), lambda kept: job.build(kept, frozenset()), job.measure.probe, job.measure.probe_goal,
                  deadline, lambda f: job.ctx.progress("quantizing", 0.5 + 0.05 * f))


def ranked(ranking: s.Ranking, count: int) -> list[str]:
    """Worst first: the measured layers that lose anything, then those not measured; never all `count` layers
    (every layer float would be no quantization at all)."""
    lossy = [r["node"] for r in ranking.layers if r["drop"] > 0 or r["cosine"] < 1.0]
    return (lossy + ranking.not_measured)[: max(0, count - 1)]


def probe_order(candidates: Mapping[str, int], gains: Mapping[str, float]) -> list[str]:
    """Most suspect first, so a budget that runs out leaves the least suspect unmeasured: the largest measured gain
    at 8 bits, then the largest layers (more weights, more rounding error)."""
    return sorted(candidates, key=lambda n: (-gains.get(n, -1.0), -candidates[n]))


def report(job: Job, ranking: s.Ranking, search: s.Search, before: s.Figures, base: str) -> dict[str, Any]:
    measure = job.measure
    ops = {n: job.upload_node(n).op for n in job.candidates}
    names = dict(zip(job.candidates, job.names(list(job.candidates)), strict=True))
    return {
        "method": f"measured: each layer quantized alone at {job.bits} bits (every other quantizable layer float), "
                  f"ranked by the drop in {measure.probe_goal.metric} on the first {measure.probe_count} "
                  f"{measure.source} samples; suggested_exclude: the shortest prefix of the ranking that, kept "
                  f"float, brings {base} within the goal, checked on all {len(measure.batches)}",
        "bound": f"at most {s.MAX_PROBES} probes on {measure.probe_count} samples within "
                 f"{measure.goal.budget_s if measure.goal.from_target else RANK_BUDGET_S:g} s; probes run largest "
                 "gain at 8 bits first, else largest layer first",
        "source": measure.source, "samples": len(measure.batches), "probe_samples": measure.probe_count,
        "goal": measure.goal.to_dict(), "quantized": before.to_dict(),
        "layers": [{"name": names[r["node"]], "op": ops[r["node"]], **{k: v for k, v in r.items() if k != "node"}}
                   for r in ranking.layers],
        "not_measured": [names[n] for n in ranking.not_measured],
        "stopped_by": ranking.stopped_by or search.stopped_by,
        "suggested_exclude": job.suggested(search.kept), "suggested_reaches_goal": search.met,
        "suggested_fidelity": search.figures.to_dict() if search.figures else None, "tried": search.tried,
    }


def suggest(job: Job, order: list[str], eight: frozenset[str], before: s.Figures, deadline: float) -> s.Search:
    """The shortest prefix of `order` that, kept float (the `eight` layers otherwise at 8 bits), meets the goal."""
    goal = job.measure.goal
    if goal.met(before):
        return s.Search(figures=before, met=True)
    return s.smallest_prefix(order, lambda kept: job.build(kept, eight - kept), job.measure.full, goal, deadline,
                             before)


def sensitivity(job: Job, delivered: Path, eight: frozenset[str], gains: Mapping[str, float]) -> Outcome:
    """metrics.sensitivity for a job without a target, whose `delivered` file has the `eight` layers at 8 bits."""
    started = time.monotonic()
    deadline = started + RANK_BUDGET_S
    before = job.measure.full(delivered)
    # the ranking may not take the whole budget: the suggestion needs some of it (MiniLM: ~2 s per candidate)
    ranking = rank(job, probe_order(job.candidates, gains), started + RANK_SHARE * RANK_BUDGET_S)
    search = suggest(job, ranked(ranking, len(job.candidates)), eight, before, deadline)
    if search.path is not None:
        search.path.unlink(missing_ok=True)
    what = "the job's quantization" + (" with its 8-bit layers" if eight else "")
    return Outcome(report=report(job, ranking, search, before, what))


def target(job: Job, plain: Path, tuning: list[dict[str, np.ndarray]], model_path: Path) -> Outcome:
    """config.target on the `plain` file (every candidate at the job's bits): escalate until the target holds or
    budget_s runs out; the chosen file in Outcome.path when it is not `plain`."""
    started = time.monotonic()
    goal = job.measure.goal
    deadline = started + goal.budget_s

    def late() -> bool:
        return time.monotonic() > deadline

    before = job.measure.full(plain)
    best = Best(goal, Candidate(plain, frozenset(), frozenset(), before, "plain"), plain)
    gains: dict[str, float] = {}
    if not best.met() and job.bits == 4:
        job.ctx.log("info", f"target: {goal.metric} drop {goal.drop(before):.4f} > {goal.max_drop} at 4 bits; "
                            "measuring each layer at 8 bits")
        gains = promote(job, best, plain, tuning, model_path, late)
    ranking = s.Ranking()
    order = probe_order(job.candidates, gains)
    stopped = False
    if not best.met() and not late():
        ranking = rank(job, order, deadline)
        stopped = keep_float(job, best, ranked(ranking, len(job.candidates)), deadline)
    elif not late():  # only the report needs the ranking now
        ranking = rank(job, order, min(deadline, time.monotonic() + RANK_SHARE * RANK_BUDGET_S))
    stopped = stopped or late()
    # the report's suggestion: float layers that bring the plain file (no 8-bit keeps) within the target, a
    # candidate like the others; once the target is met it only fills the report, so its cost is bounded
    until = deadline if not best.met() else min(deadline, time.monotonic() + (1 - RANK_SHARE) * RANK_BUDGET_S)
    search = suggest(job, ranked(ranking, len(job.candidates)), frozenset(), before, until)
    if search.path is not None and search.figures is not None:
        best.offer(job, Candidate(search.path, frozenset(), frozenset(search.kept), search.figures, "suggested"))
    stopped = stopped or late()
    outcome = Outcome(report=report(job, ranking, search, before, "the plain quantization (no 8-bit keeps)"))
    return finish(job, outcome, best, before, gains, started, stopped)


def promote(job: Job, best: Best, plain: Path, tuning: list[dict[str, np.ndarray]], model_path: Path,
            late: Callable[[], bool]) -> dict[str, float]:
    """Stage one: int4 layers to 8 bits, best gain per weight first, the shortest prefix meeting the goal."""
    batches = tuning[: mixed.TUNING_SAMPLES]
    reference = mixed.reference_outputs(model_path, batches)
    gains = mixed.measure_gains(job.ctx, lambda eight: job.build(frozenset(), eight), job.candidates,
                                mixed.tuning_cosine(plain, reference, batches), reference, batches, stop=late)
    order = sorted((n for n in gains if gains[n] > 0), key=lambda n: gains[n] / job.candidates[n], reverse=True)

    def attempt(k: int) -> bool:
        eight = frozenset(order[:k])
        path = job.build(frozenset(), eight)
        return best.offer(job, Candidate(path, eight, frozenset(), job.measure.full(path), "int8"))

    s.shortest_reaching(len(order), attempt, lambda _k: late())
    return gains


def keep_float(job: Job, best: Best, order: list[str], deadline: float) -> bool:
    """Stage two: every layer at 8 bits (an int4 job), then the shortest prefix of `order` kept float. Returns
    whether the budget stopped it."""
    eight = frozenset(job.candidates) if job.bits == 4 else frozenset()
    base = best.current.figures
    if eight:
        path = job.build(frozenset(), eight)
        base = job.measure.full(path)
        if best.offer(job, Candidate(path, eight, frozenset(), base, "int8")) or time.monotonic() > deadline:
            return not best.met()
    search = s.smallest_prefix(order, lambda kept: job.build(kept, eight - kept), job.measure.full, job.measure.goal,
                               deadline, base)
    if search.path is not None and search.figures is not None:
        best.offer(job, Candidate(search.path, eight, frozenset(search.kept), search.figures, "float"))
    return search.stopped_by == "budget"


def finish(job: Job, outcome: Outcome, best: Best, before: s.Figures, gains: dict[str, float], started: float,
           stopped: bool) -> Outcome:
    """metrics.target: what was kept at which bits, what it cost against the plain file, and met or not."""
    goal, chosen = best.goal, best.current
    eight = [n for n in job.candidates if n in chosen.eight - chosen.kept]
    kept = [n for n in job.candidates if n in chosen.kept]
    target: dict[str, Any] = {
        **goal.to_dict(), "met": best.met(), "before": before.to_dict(), "after": chosen.figures.to_dict(),
        "drop": round(goal.drop(chosen.figures), 6), "step": chosen.step,
        "kept": [{"name": name, "bits": 8} for name in job.names(eight)] +
                [{"name": name, "bits": "float"} for name in job.names(kept)],
        "kept_8bit": job.names(eight), "kept_float": job.names(kept),
        "escalation": "int4 -> int8 (largest tuning cosine gain per weight first) -> float (largest measured drop "
                      "first)" if job.bits == 4 else "int8 -> float (largest measured drop first)",
        "tried": best.tried,
    }
    if chosen.path != best.plain:
        plain_bytes, kept_bytes = best.plain.stat().st_size, chosen.path.stat().st_size
        plain_ms, kept_ms = weight_only_budget.latency_ms(best.plain, chosen.path, job.measure.batches[0])
        target["cost"] = {"bytes_before": plain_bytes, "bytes_after": kept_bytes, "ms_p50_before": round(plain_ms, 4),
                          "ms_p50_after": round(kept_ms, 4),
                          "note": f"{len(eight)} layer(s) at 8 bits and {len(kept)} float added "
                                  f"{kept_bytes - plain_bytes} bytes and {kept_ms - plain_ms:+.4f} ms per call "
                                  "(batch 1, one thread)"}
        outcome.path = chosen.path
    target["search_s"] = round(time.monotonic() - started, 3)
    outcome.target = target
    outcome.promotion = mixed.Promotion(promoted=eight, gains=gains)
    what = (f"{goal.metric} drop {goal.drop(chosen.figures):.4f} ({'relative' if goal.relative else 'absolute'}; at "
            f"most {goal.max_drop} asked)")
    if best.met():
        job.ctx.log("info", f"target met: {what}; at 8 bits: {len(eight)}, float: {', '.join(target['kept_float'])}")
        return outcome
    why = "the time budget ran out" if stopped else "every layer at 8 bits, then the measured layers kept float, " \
                                                    "did not reach it"
    outcome.error = {"code": "target_not_met", "message": f"the accuracy target was not met within {goal.budget_s:g} "
                     f"s ({why}): best candidate {what}, with {len(eight)} layer(s) at 8 bits and {len(kept)} kept "
                     "float; it is delivered as the job's artifact"}
    return outcome


def checked(outcome: Outcome, feed: Mapping[str, np.ndarray], full_check: bool, warnings: list[str]) -> Outcome:
    """The target's chosen file validated like every artifact; one that fails is dropped for the plain file, and
    the target then counts as not met."""
    instead = "the plain file is delivered, every layer at the job's dtype, and the target counts as not met"
    if outcome.path is None or mixed.valid_or_warn(outcome.path, feed, full_check, "the target's candidate",
                                                   warnings, instead):
        return outcome
    outcome.path.unlink(missing_ok=True)
    outcome.path, outcome.promotion = None, mixed.Promotion()
    if outcome.target is not None:
        outcome.target.update(met=False, after=outcome.target["before"], kept=[], kept_8bit=[], kept_float=[],
                              step="plain")
        outcome.target.pop("cost", None)
    outcome.error = {"code": "target_not_met", "message": "the accuracy target was not met: the candidate that "
                     "met it did not validate, and the plain quantization is delivered as the job's artifact"}
    return outcome
