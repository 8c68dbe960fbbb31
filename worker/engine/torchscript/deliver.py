"""Deliver a quantized TorchScript module: save it, measure the saved file against the float one, describe it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from worker.engine import evaluate, report
from worker.engine.torchscript import common as ts_common
from worker.engine.torchscript import layer_sqnr as ts_layer_sqnr
from worker.engine.types import ArtifactFile, QuantizeResult, TensorSpec

if TYPE_CHECKING:
    import torch

    from worker.engine.context import JobContext


def artifact_path(ctx: JobContext) -> Path:
    """Where deliver() saves the quantized module (the target's cost saves the plain candidate under its name)."""
    return ctx.work_dir / f"{ctx.model_name}.int8.pt"


def deliver(ctx: JobContext, original: torch.jit.ScriptModule, quantized: torch.jit.ScriptModule,
            found: list[tuple[str, str]], int8: set[str], inputs: list[TensorSpec], samples: evaluate.Samples,
            notes: list[str], details_key: str, details: dict) -> QuantizeResult:
    """Save the quantized module, measure the saved file against the float one, and build the result.

    Shared by the dynamic and static TorchScript methods; `found` lists (layer, type), `int8` the
    layers whose weights were quantized."""
    import torch

    output = artifact_path(ctx)
    ctx.progress("packaging", 0.60)
    torch.jit.save(quantized, str(output))
    layers = [{"name": n, "op": kind, "weight_dtype": "int8" if n in int8 else "float32",
               "activation_dtype": "uint8" if n in int8 else "float32", "sqnr_db": None} for n, kind in found]
    ts_layer_sqnr.fill(ctx, layers, original, quantized, inputs, samples)
    del quantized
    float_runner = ts_common.runner_for_module(original, [s.name for s in inputs], threads=1)
    quant_runner = ts_common.load_runner(output, threads=1)  # measure the saved file, not the object

    engine = torch.backends.quantized.engine
    metrics = evaluate.measure(
        ctx, float_runner, quant_runner, samples,
        original_bytes=Path(ctx.model_path).stat().st_size, quantized_bytes=output.stat().st_size,
        runtime=f"torch {torch.__version__} (TorchScript, {engine})", layers=layers, extra_warnings=notes,
    )
    return QuantizeResult(
        artifacts=[ArtifactFile(kind="model", path=output, filename=output.name, format="torchscript")],
        metrics=metrics,
        report={"versions": report.runtime_versions(), "host": report.host_info(),
                details_key: {**details, "quantized_engine": engine}},
    )
