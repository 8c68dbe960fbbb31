"""torch.export sensitivity and targets: sensitivity.py's probes and prefix search on candidates built in memory.

A candidate is the quantized GraphModule a handler builds for a set of layers kept at higher precision, run in
eager torch: the numbers the portable `.pt2` computes, before re-export, saving and AOTInductor. Re-exporting
and saving each probe would cost seconds apiece for no other number (re-export keeps the graph's arithmetic).
Every build is deterministic (the same calibration samples, round to nearest), so the handler delivers the
chosen set by building it once more on its normal path. Probes run most suspect first, by the layer SQNR
layer_sqnr.py measures inside the plain quantized model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import evaluate, sensitivity_analysis
from worker.engine.sensitivity_analysis import Outcome, attach  # noqa: F401 - the names its handlers use
from worker.engine.torch_export import common as pt2_common
from worker.engine.torch_export import layer_sqnr as pt2_layer_sqnr

if TYPE_CHECKING:
    import torch

    from worker.engine.context import JobContext
    from worker.engine.types import TensorSpec

Build = Callable[[frozenset[str]], "torch.nn.Module"]  # layers kept at higher precision -> quantized module
STACK = 32  # samples per call in per_sample()
LATENCY_RUNS = 50  # the target's latency cost: a quick interleaved comparison, not the report's headline figure


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
    """Candidates by lowest layer SQNR in the plain quantized graph first (graph order where it cannot be read)."""
    return sensitivity_analysis.by_lowest_sqnr(ctx, candidates, lambda: pt2_layer_sqnr.layer_sqnr(
        float_module, plain, pt2_layer_sqnr.sample_batches(ctx, specs, samples), list(candidates)))


def analyse(ctx: JobContext, *, float_module: torch.fx.GraphModule, plain: torch.fx.GraphModule, build: Build,
            candidates: Sequence[str], specs: list[TensorSpec], samples: evaluate.Samples, keep_as: str = "float",
            device: str = "cpu", span: tuple[float, float] = (0.40, 0.45),
            plain_bytes: Callable[[torch.fx.GraphModule], int] | None = None) -> Outcome:
    """metrics.sensitivity for `plain` (whose quantized layers are `candidates`), and with config.target the
    fewest most sensitive layers to keep at `keep_as` ("float", or "int8" for int4 weight-only) until it holds
    (sensitivity_analysis.analyse, run in eager torch). Returns what to keep; the handler builds and delivers
    that. plain_bytes(plain) saves the plain candidate for the cost in bytes (attach() reads the delivered size);
    it may consume `plain`."""
    names = [spec.name for spec in specs]
    batches = samples.batches

    def outputs(module: torch.nn.Module, upto: int) -> list[list[np.ndarray]]:
        run = pt2_common.runner_for_module(module, names, threads=None, device=device)
        return [evaluate.unpadded(b, o) for b, o in zip(batches[:upto], per_sample(run, batches[:upto], specs),
                                                         strict=True)]

    return sensitivity_analysis.analyse(
        ctx, float_model=float_module, plain=plain, build=build, outputs=outputs, samples=samples, keep_as=keep_as,
        order=lambda: _order(ctx, float_module, plain, candidates, specs, samples), span=span,
        runs_in="in eager torch (the portable .pt2's arithmetic)", plain_bytes=plain_bytes,
        latency=lambda a, b: _cost(a, b, batches[0], names, device))


def _cost(plain: torch.fx.GraphModule, chosen: torch.fx.GraphModule, feed: dict[str, np.ndarray],
          names: list[str], device: str) -> dict[str, Any]:
    """Latency of the plain and the chosen candidate, interleaved; their sizes come from the saved files."""
    a = pt2_common.runner_for_module(plain, names, threads=None, device=device)
    b = pt2_common.runner_for_module(chosen, names, threads=None, device=device)
    return sensitivity_analysis.latency_cost(lambda: a(feed), lambda: b(feed), LATENCY_RUNS,
                                             "batch 1, one thread, eager torch (the portable .pt2); a compiled "
                                             "package differs")
