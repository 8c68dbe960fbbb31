"""method auto, format-neutral runner: each candidate through its own method's handler, one shared latency loop.

A format's auto module (onnx/auto.py, torch_export/auto.py, ...) loads and describes the model and its samples and
hands over a Subject: the goal measured on the float model, whether it has weights weight_only can take, and how to
run the float model and a delivered candidate for latency. Everything else is the same for every format: each
candidate is the registry's handler for its method, called with the job's own datasets in a subfolder of its own
(so it quantizes, checks and measures exactly as a job of that method would), a failure is a row with its reason
and leaves no file, the sweep stops starting candidates past budget_s, and float and every delivered candidate are
then timed together in one interleaved loop, so that the table compares figures taken over the same stretch of
time. sweep.py marks the Pareto front and picks the delivered file. A cancel kills the job's sandboxed process
(worker/sandbox.py), so it stops the sweep wherever it is and nothing of it is stored.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import evaluate, sweep
from worker.engine import metrics as m
from worker.engine import sensitivity as s
from worker.engine.errors import EngineError
from worker.engine.registry import SPECS
from worker.engine.types import ArtifactFile, QuantizeResult

if TYPE_CHECKING:
    from worker.engine.config import AutoConfig, TargetConfig
    from worker.engine.context import JobContext
    from worker.engine.types import ProgressFn

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
# progress: 0..START for loading, each candidate an equal slice up to CANDIDATES_END, then the shared latency loop
START, CANDIDATES_END = 0.03, 0.92
LATENCY_RUNS = 200
LATENCY_BUDGET_S = 30.0  # the shared loop runs every model once per round: fewer rounds on big models


@dataclasses.dataclass
class Subject:
    """What a format brings to the sweep; the runners are built only when the latency loop starts, so that no
    model is held in memory while the candidates run."""

    goal: s.Goal
    has_linear_weights: bool
    feed: dict[str, np.ndarray]  # the one batch-1 sample every model is timed on
    float_runner: Callable[[], Runner]  # one thread, as metrics.latency measures
    candidate_runner: Callable[[QuantizeResult], Runner]  # the delivered file(s) of a candidate, loaded back
    report_key: str  # report.<format>_auto
    kinds: tuple[str, ...] = ("model",)  # the artifact kinds a candidate delivers that the sweep keeps
    latency_note: str = ""  # how the format's candidates are timed, beyond the shared loop
    warnings: list[str] = dataclasses.field(default_factory=list)  # for the job's metrics.warnings


@dataclasses.dataclass
class _Slice:
    """A candidate's progress (0..1 of a whole job) mapped into its slice of the sweep, never going back."""

    progress: ProgressFn
    start: float
    width: float
    last: float = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        self.last = max(self.last, self.start + self.width * min(max(fraction, 0.0), 1.0))
        self.progress(stage, self.last)


def measured_goal(target: TargetConfig | None, run: Runner, samples: evaluate.Samples, *,
                  float_perplexity: float | None = None) -> s.Goal:
    """The goal (the target, else the default) read from the float model's outputs on the samples every candidate
    is measured on; the target's own checks (labels for accuracy, class scores for top1_agreement, perplexity
    where the format measured it) fail here, before any candidate runs."""
    reference = [evaluate.unpadded(b, run(b)) for b in samples.batches]
    return s.goal_on(target, reference, samples.labels, float_perplexity=float_perplexity)


def sweep_all(ctx: JobContext, subject: Subject, started: float) -> QuantizeResult:
    """Every candidate the model and data allow, one after another; the fastest meeting the goal is the model."""
    config: AutoConfig = ctx.config
    planned = sweep.plan(ctx.format, config, device=ctx.device, has_calibration=ctx.calibration_path is not None,
                         has_linear_weights=subject.has_linear_weights)
    runnable = [p for p in planned if p.skip is None]
    ctx.log("info", f"method auto: {len(runnable)} candidate(s) to run ({', '.join(p.name for p in runnable)}); "
                    f"judged by {sweep.describe(subject.goal)}")
    width = (CANDIDATES_END - START) / max(1, len(runnable))
    rows: list[dict[str, Any]] = []
    delivered: dict[str, QuantizeResult] = {}
    for candidate in planned:
        if candidate.skip is not None:
            rows.append(sweep.failed_row(candidate, candidate.skip))
            continue
        slot = START + width * runnable.index(candidate)
        if time.monotonic() - started > config.budget_s:
            late = f"the sweep's budget_s ({config.budget_s:g} s) ran out before this candidate"
            rows.append(sweep.failed_row(candidate, sweep.skipped("budget_exceeded", late)))
            ctx.progress("quantizing", slot + width)
            continue
        row, result = _run_candidate(ctx, candidate, _Slice(ctx.progress, slot, width))
        rows.append(row)
        if result is not None:
            delivered[candidate.name] = result
    if not delivered:
        reasons = "; ".join(f"{r['name']}: {r['error']['message']}" for r in rows)
        codes = {r["error"]["code"] for r in rows} - set(sweep.SWEEP_CODES)  # the sweep's own are no job codes
        raise EngineError(f"method auto: no candidate could quantize this model ({reasons})",
                          code=codes.pop() if len(codes) == 1 else "unsupported")

    ctx.progress("benchmarking", CANDIDATES_END)
    runners = _load_back(ctx, subject, rows, delivered)
    float_ms, runs = _shared_latency(subject, rows, runners)
    choice = sweep.choose(rows, subject.goal)
    ctx.progress("packaging", 0.96)
    return _result(ctx, subject, rows, delivered, choice, float_ms, runs, time.monotonic() - started)


def _run_candidate(ctx: JobContext, candidate: sweep.Planned,
                   progress: _Slice) -> tuple[dict[str, Any], QuantizeResult | None]:
    """One candidate through its method's handler, in its own folder. A candidate the method refuses, or that
    fails, is a row with its reason and leaves no file behind; running out of memory or disk ends the job."""
    spec = SPECS[(ctx.format, candidate.method)]
    folder = ctx.work_dir.resolve() / "candidates" / candidate.name
    folder.mkdir(parents=True)
    sub = dataclasses.replace(ctx, method=candidate.method, config=spec.config_model.model_validate(candidate.config),
                              work_dir=folder, progress=progress,
                              log=lambda level, message: ctx.log(level, f"[{candidate.name}] {message}"))
    ctx.log("info", f"candidate {candidate.name}: {candidate.method} {candidate.config}")
    began = time.monotonic()
    try:
        result = spec.load_handler()(sub)
    except (MemoryError, OSError):
        shutil.rmtree(folder, ignore_errors=True)
        raise
    except EngineError as exc:
        error = {"code": exc.code, "message": str(exc)}
    except Exception as exc:  # a library failing on one candidate: the others may still hold
        error = {"code": "engine_error", "message": f"{type(exc).__name__}: {str(exc)[:500]}"}
    else:
        row = sweep.measured_row(candidate, result.metrics, time.monotonic() - began)
        if result.error is not None:  # its own target search fell short: it still delivered its best
            row["warnings"].append(f"{result.error['code']}: {result.error['message']}")
        ctx.log("info", f"candidate {candidate.name}: size {row['size_ratio']}x, fidelity {row['fidelity']}")
        return row, result
    shutil.rmtree(folder, ignore_errors=True)
    ctx.log("warning", f"candidate {candidate.name} did not deliver ({error['code']}): {error['message']}")
    return sweep.failed_row(candidate, error, time.monotonic() - began), None


def model_file(result: QuantizeResult, kind: str = "model") -> Path | None:
    """The path of a delivered result's artifact of this kind (None when it delivered none)."""
    return next((a.path for a in result.artifacts if a.kind == kind), None)


def _load_back(ctx: JobContext, subject: Subject, rows: list[dict[str, Any]],
               delivered: dict[str, QuantizeResult]) -> dict[str, Runner]:
    """Each delivered candidate's files loaded back and run once on the timing sample. One that fails is no longer
    delivered: its row says why and its files go; running out of memory or disk ends the job."""
    runners: dict[str, Runner] = {}
    for name in list(delivered):
        try:
            runner = subject.candidate_runner(delivered[name])
            runner(subject.feed)
        except (MemoryError, OSError):
            raise
        except Exception as exc:  # a runtime's own error types: this candidate cannot be timed or served
            message = f"its delivered file did not load back and run: {type(exc).__name__}: {str(exc)[:500]}"
            row = next(r for r in rows if r["name"] == name)
            row["error"] = {"code": "engine_error", "message": message}
            del delivered[name]
            shutil.rmtree(ctx.work_dir.resolve() / "candidates" / name, ignore_errors=True)
            ctx.log("warning", f"candidate {name} dropped: {message}")
            continue
        runners[name] = runner
    if not runners:
        raise EngineError("method auto: no delivered candidate loaded back to be timed ("
                          + "; ".join(f"{r['name']}: {r['error']['message']}" for r in rows if r["error"]) + ")",
                          code="engine_error")
    return runners


def _shared_latency(subject: Subject, rows: list[dict[str, Any]], candidates: dict[str, Runner]) -> tuple[float, int]:
    """Float and every delivered candidate in one interleaved loop (batch 1, one thread); fills each row's latency.
    Returns the float model's ms p50 and the rounds run."""
    names = list(candidates)
    runners = [subject.float_runner(), *candidates.values()]
    feed = subject.feed
    calls = [lambda r=r: r(feed) for r in runners]
    with m.one_torch_thread():  # a torch format's models: one thread, as metrics.latency
        begin = time.perf_counter()
        for call in calls:
            call()
        per_round = max(time.perf_counter() - begin, 1e-6)
        runs = max(20, min(LATENCY_RUNS, int(LATENCY_BUDGET_S / per_round)))
        float_ms, *candidate_ms = m.interleaved_latencies(calls, warmup=min(10, runs), runs=runs)
    by_name = dict(zip(names, candidate_ms, strict=True))
    for row in rows:
        if row["name"] in by_name:
            ms = by_name[row["name"]]
            row["latency"] = {"ms_p50": round(ms, 4), "speedup": round(float_ms / ms if ms > 0 else 0.0, 3)}
    return float_ms, runs


def artifact_name(model_name: str, candidate: str, filename: str) -> str:
    """A candidate's file named after the candidate: `<model>.<what the method wrote>.<rest>` (model.int8.onnx,
    model.int8.aoti.pt2) becomes `<model>.<candidate>.<rest>`, so that every candidate's files differ."""
    written = filename.removeprefix(f"{model_name}.")
    rest = written.partition(".")[2] if written != filename else Path(filename).suffix.lstrip(".")
    return f"{model_name}.{candidate}.{rest}"


def _result(ctx: JobContext, subject: Subject, rows: list[dict[str, Any]], delivered: dict[str, QuantizeResult],
            choice: sweep.Choice, float_ms: float, runs: int, seconds: float) -> QuantizeResult:
    """The recommended candidate's files as the job's (model, and e.g. compiled_model) and its metrics as the
    job's, every other delivered candidate's files as `candidate` artifacts, and the table as metrics.sweep."""
    work = ctx.work_dir.resolve()
    artifacts = []
    for name, result in delivered.items():
        for artifact in result.artifacts:
            if artifact.kind not in subject.kinds:
                continue
            kind = artifact.kind if name == choice.recommended else "candidate"
            target = work / artifact_name(ctx.model_name, name, artifact.filename)
            shutil.move(artifact.path, target)
            artifacts.append(ArtifactFile(kind=kind, path=target, filename=target.name, format=artifact.format))
    shutil.rmtree(work / "candidates", ignore_errors=True)  # the moved files were all that was left in them
    artifacts.sort(key=lambda a: a.kind == "candidate")  # the model first, as every other method lists it
    chosen = delivered[choice.recommended]
    metrics = {**chosen.metrics,
               "warnings": [*chosen.metrics.get("warnings", []), *subject.warnings, *choice.warnings]}
    goal = subject.goal
    # the default goal's budget_s is sensitivity's, which means nothing here; a target's bounds each candidate's search
    judged_by = {k: round(v, 6) if isinstance(v, float) else v for k, v in goal.to_dict().items()
                 if goal.from_target or k != "budget_s"}
    how = (f"float and the {len(delivered)} delivered candidate(s) called in turn in one loop; "
           "metrics.latency is the recommended candidate's own measurement")
    metrics["sweep"] = {
        "candidates": rows, "target": judged_by, "recommended": choice.recommended, "why": choice.why,
        "latency": {"float_ms_p50": round(float_ms, 4), "runs": runs, "batch_size": 1, "threads": 1,
                    "how": f"{how}; {subject.latency_note}" if subject.latency_note else how},
        "duration_s": round(seconds, 3),
    }
    ctx.log("info", f"method auto: {choice.why}")
    error = None
    if goal.from_target and not choice.met:
        error = {"code": "target_not_met", "message": f"no candidate of the sweep met the target: {choice.why}; "
                                                      "it is delivered as the job's artifact"}
    return QuantizeResult(artifacts=artifacts, metrics=metrics,
                          report={**chosen.report, subject.report_key: {"recommended": choice.recommended,
                                                                        "candidates": [r["name"] for r in rows]}},
                          error=error)
