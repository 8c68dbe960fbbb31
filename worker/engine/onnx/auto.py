"""ONNX method auto: run each candidate method through its own handler, measure them alike, deliver the pick.

Each candidate is the registry's handler for its method (dynamic, static, weight_only), called with the job's own
datasets in a subfolder of its own, so it quantizes, checks and measures exactly as a job of that method would:
the same evaluation (else calibration, else generated) samples, the same fidelity figures. Latency is then measured
once more for all of them together, float and every candidate interleaved in one loop, so that the table compares
figures taken over the same stretch of time. sweep.py marks the Pareto front and picks the delivered file.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.engine import evaluate, sweep
from worker.engine import metrics as m
from worker.engine.errors import EngineError
from worker.engine.onnx import common as onnx_common
from worker.engine.onnx import sensitivity as onnx_sensitivity
from worker.engine.registry import SPECS
from worker.engine.types import ArtifactFile, QuantizeResult

if TYPE_CHECKING:
    from worker.engine.config import AutoConfig
    from worker.engine.context import JobContext
    from worker.engine.sensitivity import Goal
    from worker.engine.types import ProgressFn

# progress: 0..START for loading, each candidate an equal slice up to CANDIDATES_END, then the shared latency loop
START, CANDIDATES_END = 0.03, 0.92
LATENCY_RUNS = 200
LATENCY_BUDGET_S = 30.0  # the shared loop runs every model once per round: fewer rounds on big models


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


def run(ctx: JobContext) -> QuantizeResult:
    """Every candidate the model and data allow, one after another; the fastest meeting the goal is the model."""
    config: AutoConfig = ctx.config
    started = time.monotonic()
    ctx.progress("loading", 0.01)
    original = onnx_common.load(ctx.model_path)
    info = onnx_common.describe(original)
    samples = evaluate.load_samples(ctx, info.inputs)  # a bad dataset fails the job once, not every candidate
    model_path = ctx.model_path.resolve()
    # the target's own checks (labels for accuracy, class scores for top1_agreement) fail here, before any work
    goal, _ = onnx_sensitivity.float_goal(config.target, model_path, samples)
    planned = sweep.plan(ctx.format, config, device=ctx.device, has_calibration=ctx.calibration_path is not None,
                         has_linear_weights=any(n.op_type in ("MatMul", "Gemm") for n in original.graph.node))
    del original
    runnable = [p for p in planned if p.skip is None]
    ctx.log("info", f"method auto: {len(runnable)} candidate(s) to run ({', '.join(p.name for p in runnable)}); "
                    f"judged by {sweep.describe(goal)}")
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
    float_ms, runs = _shared_latency(model_path, rows, delivered, samples.batches[0])
    choice = sweep.choose(rows, goal)
    ctx.progress("packaging", 0.96)
    return _result(ctx, rows, delivered, choice, goal, float_ms, runs, time.monotonic() - started)


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


def _model_file(result: QuantizeResult) -> Path:
    return next(a.path for a in result.artifacts if a.kind == "model")


def _shared_latency(model_path: Path, rows: list[dict[str, Any]], delivered: dict[str, QuantizeResult],
                    feed: dict[str, Any]) -> tuple[float, int]:
    """Float and every delivered candidate in one interleaved loop (batch 1, one thread); fills each row's latency.
    Returns the float model's ms p50 and the rounds run."""
    names = list(delivered)
    runners = [onnx_common.load_runner(model_path, threads=1)]
    runners += [onnx_common.load_runner(_model_file(delivered[n]), threads=1, ours=True) for n in names]
    calls = [lambda r=r: r(feed) for r in runners]
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


def _result(ctx: JobContext, rows: list[dict[str, Any]], delivered: dict[str, QuantizeResult], choice: sweep.Choice,
            goal: Goal, float_ms: float, runs: int, seconds: float) -> QuantizeResult:
    """The recommended candidate's file as the model and its metrics as the job's, every other delivered candidate
    as a `candidate` artifact, and the table as metrics.sweep."""
    work = ctx.work_dir.resolve()
    artifacts = []
    for name, result in delivered.items():
        kind = "model" if name == choice.recommended else "candidate"
        target = work / f"{ctx.model_name}.{name}.onnx"
        shutil.move(_model_file(result), target)
        artifacts.append(ArtifactFile(kind=kind, path=target, filename=target.name, format="onnx"))
    shutil.rmtree(work / "candidates", ignore_errors=True)  # the moved files were all that was left in them
    artifacts.sort(key=lambda a: a.kind != "model")  # the model first, as every other method lists it
    chosen = delivered[choice.recommended]
    metrics = {**chosen.metrics, "warnings": [*chosen.metrics.get("warnings", []), *choice.warnings]}
    # the default goal's budget_s is sensitivity's, which means nothing here; a target's bounds each candidate's search
    judged_by = {k: round(v, 6) if isinstance(v, float) else v for k, v in goal.to_dict().items()
                 if goal.from_target or k != "budget_s"}
    metrics["sweep"] = {
        "candidates": rows, "target": judged_by, "recommended": choice.recommended, "why": choice.why,
        "latency": {"float_ms_p50": round(float_ms, 4), "runs": runs, "batch_size": 1, "threads": 1,
                    "how": f"float and the {len(delivered)} delivered candidate(s) called in turn in one loop; "
                           "metrics.latency is the recommended candidate's own measurement"},
        "duration_s": round(seconds, 3),
    }
    ctx.log("info", f"method auto: {choice.why}")
    error = None
    if goal.from_target and not choice.met:
        error = {"code": "target_not_met", "message": f"no candidate of the sweep met the target: {choice.why}; "
                                                      "it is delivered as the job's artifact"}
    return QuantizeResult(artifacts=artifacts, metrics=metrics,
                          report={**chosen.report, "onnx_auto": {"recommended": choice.recommended,
                                                                 "candidates": [r["name"] for r in rows]}},
                          error=error)
