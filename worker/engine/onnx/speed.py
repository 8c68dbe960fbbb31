"""Pick, among faithful static int8 candidates, the one that really runs fastest in onnxruntime.

A QDQ model is only faster where onnxruntime fuses its Q/DQ pairs into int8 kernels; elsewhere the pairs are
extra work (kernels.py). So static builds candidates (as quantized; with the float islands kept float) and
this module times them against the float model, interleaved in one process, batch 1, one thread, as the
report's latency is measured. The fastest candidate within a small fidelity tolerance of the most faithful
one wins; a choice slower than float is said plainly, with the fastest alternative measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.engine import metrics as m
from worker.engine.onnx import common as onnx_common
from worker.engine.onnx import kernels, validate

if TYPE_CHECKING:
    from worker.engine.context import JobContext

FIDELITY_TOLERANCE = 0.003  # worst-output cosine a faster candidate may give up against the most faithful
TIMED_RUNS = 60  # per model, interleaved: enough to rank candidates whose speed differs by 10 % or more
BUDGET_S = 6.0  # the whole timing, however large the model: fewer runs rather than a slow job


@dataclass(frozen=True)
class Timed:
    label: str
    path: Path
    ms: float  # p50, batch 1, one thread
    cosine: float  # worst output's mean cosine on the check samples
    speedup: float  # float ms / this ms


def _time(runners: Mapping[str, onnx_common.Runner], feed: Mapping[str, np.ndarray]) -> dict[str, float]:
    """p50 ms of each runner, all interleaved round by round so drift on a shared machine hits all alike."""
    for run in runners.values():
        run(dict(feed))  # warm-up: first calls allocate
    start = time.perf_counter()
    for run in runners.values():
        run(dict(feed))
    per_round = max(time.perf_counter() - start, 1e-6)
    rounds = max(10, min(TIMED_RUNS, int(BUDGET_S / per_round)))
    samples: dict[str, list[float]] = {name: [] for name in runners}
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for name, run in runners.items():
            t0 = clock()
            run(dict(feed))
            samples[name].append((clock() - t0) / 1e6)
    return {name: float(np.median(values)) for name, values in samples.items()}


def rank(ctx: JobContext, float_path: Path, candidates: Mapping[str, Path], checks: Sequence[dict[str, np.ndarray]],
         reference: Sequence[list[np.ndarray]]) -> tuple[Timed, list[Timed], float]:
    """(the chosen candidate, every candidate timed, float ms). Fidelity on `checks` against `reference`."""
    runners = {"float": onnx_common.load_runner(float_path, threads=1)}
    runners.update({label: onnx_common.load_runner(path, threads=1, ours=True) for label, path in candidates.items()})
    timings = _time(runners, checks[0])
    float_ms = timings["float"]
    timed = []
    for label, path in candidates.items():
        outs = [runners[label](b) for b in checks]
        cosine = m.worst_cosine(list(reference), outs)[0]
        ms = timings[label]
        timed.append(Timed(label, path, round(ms, 4), round(cosine, 6), round(float_ms / ms, 3) if ms else 0.0))
        ctx.log("info", f"static candidate '{label}': {ms:.3f} ms ({float_ms / ms:.2f}x float), cosine {cosine:.4f}")
    best_fidelity = max(t.cosine for t in timed)
    faithful = [t for t in timed if t.cosine >= best_fidelity - FIDELITY_TOLERANCE]
    return min(faithful, key=lambda t: t.ms), timed, round(float_ms, 4)


def without_float_islands(ctx: JobContext, requantize: Callable[[set[str], Path], None], built: Path,
                          scratch: Path, feed: Mapping[str, np.ndarray], *, full_check: bool,
                          rounds: int = 3) -> tuple[kernels.KernelReport, Path | None, set[str]]:
    """Re-quantize with every float island kept float, again while new ones appear (keeping a node float can
    strand its neighbour). Returns (the first file's kernel report, the valid island-free file or None, the
    nodes kept float)."""
    first = report = kernels.inspect(built, scratch)
    kept: set[str] = set()
    path = None
    for round_ in range(rounds):
        if not report.float_islands:
            break
        kept |= set(report.float_islands)
        path = scratch / f"islands_float_{round_}.onnx"
        requantize(kept, path)
        report = kernels.inspect(path, scratch)
    if path is None:
        return first, None, kept
    try:
        validate.check_artifact(path, feed, full_check=full_check)
    except validate.ArtifactInvalidError as failure:
        ctx.log("warning", f"the candidate with float islands kept float is invalid ({failure.stage}); dropped")
        return first, None, set()
    ctx.log("info", f"{len(first.float_islands)} float island(s) in onnxruntime's optimised graph "
                    f"({', '.join(sorted(set(first.float_islands.values())))}); a candidate keeps {len(kept)} "
                    f"node(s) float, {report.qdq_left} Q/DQ left (was {first.qdq_left})")
    return first, path, kept


def slower_than_float_warning(speedup: float, chosen: Timed, timed: list[Timed]) -> str | None:
    """Plain words, when the delivered model is slower than float by the report's own measurement (`speedup`),
    on what was faster: another int8 variant measured here, or else the float model itself."""
    if speedup >= 1.0:
        return None
    fastest = min(timed, key=lambda t: t.ms)
    if fastest is not chosen and fastest.speedup > max(chosen.speedup, 1.0):
        alternative = (f"the fastest int8 variant measured was '{fastest.label}' at {fastest.speedup:.2f}x float "
                       f"(cosine {fastest.cosine:.4f}, below the delivered one's {chosen.cosine:.4f})")
    else:
        measured = ", ".join(f"'{t.label}' {t.speedup:.2f}x" for t in timed)
        alternative = (f"no int8 variant measured was faster than float ({measured}), so the fastest alternative "
                       "here is the float model itself")
    return (f"static int8 runs slower than the float model on this CPU ({speedup:.2f}x at batch 1, one thread): "
            f"onnxruntime has no fused int8 kernel for part of this graph, or its int8 work is too small to pay "
            f"for the Q/DQ around it; {alternative}. For speed here, serve the float model or try method "
            f"'dynamic'")
