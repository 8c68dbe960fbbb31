"""TorchScript sensitivity and targets: sensitivity_analysis.py on candidates torch.ao's JIT passes build in memory.

A candidate is the ScriptModule quantize_jit / quantize_dynamic_jit returns for a qconfig dict that sets None on
the layers kept float (config.exclude's own mechanism), run as it is: torch.jit.save writes that graph and its
packed weights, so the saved archive computes the same numbers (deliver() measures the saved file). Saving and
reloading each probe would only add time. Every build is deterministic (the same calibration batches, min/max or
histogram observers), so the handler delivers the chosen set by building it once more. Probes run most suspect
first, by the layer SQNR layer_sqnr.py measures inside the plain quantized model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import evaluate, sensitivity_analysis
from worker.engine.sensitivity_analysis import Outcome
from worker.engine.torch_export.layer_sqnr import sample_batches
from worker.engine.torch_export.sensitivity import LATENCY_RUNS, per_sample
from worker.engine.torchscript import common as ts_common
from worker.engine.torchscript import layer_sqnr as ts_layer_sqnr
from worker.engine.types import TensorSpec

if TYPE_CHECKING:
    import torch

    from worker.engine.context import JobContext

Build = Callable[[frozenset[str]], "torch.jit.ScriptModule"]  # layers kept float -> quantized module


def _order(ctx: JobContext, original: torch.jit.ScriptModule, plain: torch.jit.ScriptModule,
           candidates: Sequence[str], inputs: list[TensorSpec], samples: evaluate.Samples) -> list[str]:
    """Candidates by lowest layer SQNR in the plain quantized module first (module order where it cannot be read)."""
    return sensitivity_analysis.by_lowest_sqnr(ctx, candidates, lambda: ts_layer_sqnr.layer_sqnr(
        original, plain, sample_batches(ctx, inputs, samples), list(candidates)))


def _saved_bytes(module: torch.jit.ScriptModule, artifact: Path) -> int:
    """The size of `module` saved as the handler saves its artifact, under the same name (the archive's folder)."""
    import torch

    with tempfile.TemporaryDirectory(dir=artifact.parent) as tmp:
        path = Path(tmp) / artifact.name
        torch.jit.save(module, str(path))
        return path.stat().st_size


def _latency(plain: torch.jit.ScriptModule, chosen: torch.jit.ScriptModule, feed: dict[str, np.ndarray],
             names: list[str]) -> dict[str, Any]:
    """Latency of the plain and the chosen candidate, interleaved, as metrics.latency runs them."""
    a = ts_common.runner_for_module(plain, names, threads=None)
    b = ts_common.runner_for_module(chosen, names, threads=None)
    return sensitivity_analysis.latency_cost(lambda: a(feed), lambda: b(feed), LATENCY_RUNS,
                                             "batch 1, one thread, the TorchScript module (fbgemm kernels)")


def analyse(ctx: JobContext, *, original: torch.jit.ScriptModule, plain: torch.jit.ScriptModule, build: Build,
            candidates: Sequence[str], inputs: list[TensorSpec], samples: evaluate.Samples, artifact: Path,
            per_call_scales: bool, span: tuple[float, float]) -> Outcome:
    """metrics.sensitivity for `plain` (whose quantized layers are `candidates`), and with config.target the
    fewest most sensitive layers to keep float until it holds. per_call_scales: the activations are quantized
    with a range taken from each call's input (dynamic), so samples run one by one, as measure() runs them;
    with fixed scales (static) a sample's outputs do not depend on its batch, and they run 32 at a time."""
    names = [spec.name for spec in inputs]
    batches = samples.batches
    one_by_one = [TensorSpec(spec.name, spec.dtype, []) for spec in inputs]  # per_sample stacks batch dims only

    def outputs(module: torch.jit.ScriptModule, upto: int) -> list[list[np.ndarray]]:
        run = ts_common.runner_for_module(module, names, threads=None)
        chosen = batches[:upto]
        try:
            found = per_sample(run, chosen, one_by_one if per_call_scales else inputs)
        except Exception:  # noqa: BLE001 - a scripted forward may fix its batch size: then one at a time
            found = per_sample(run, chosen, one_by_one)
        return [evaluate.unpadded(b, o) for b, o in zip(chosen, found, strict=True)]

    return sensitivity_analysis.analyse(
        ctx, float_model=original, plain=plain, build=build, outputs=outputs, samples=samples, span=span,
        order=lambda: _order(ctx, original, plain, candidates, inputs, samples),
        runs_in="on the TorchScript module the JIT passes build (fbgemm kernels, as the saved archive runs)",
        latency=lambda a, b: _latency(a, b, batches[0], names), plain_bytes=lambda module: _saved_bytes(module,
                                                                                                        artifact))
