"""TorchScript dynamic int8: legacy torch.ao `quantize_dynamic_jit` (fbgemm Linear kernels), measured."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from worker.engine import evaluate, report
from worker.engine.formats import torchscript as ts_format
from worker.engine.types import ArtifactFile, DatasetKind, EngineError, QuantizeResult, TensorSpec

if TYPE_CHECKING:
    import torch

    from worker.engine import JobContext
    from worker.engine.config import DynamicConfig

# Module types that carry weights, as TorchScript names them (ScriptModule.original_name).
_LINEAR = "Linear"
_STAYS_FLOAT = {"LSTM", "GRU", "RNN", "Embedding", "EmbeddingBag", "Conv1d", "Conv2d", "Conv3d",
                "ConvTranspose1d", "ConvTranspose2d", "LSTMCell", "GRUCell"}


def _weight_modules(module: torch.jit.ScriptModule) -> list[tuple[str, str]]:
    """(qualified name, type) of every Linear and of every weight layer that stays float."""
    found = []
    for name, sub in module.named_modules():
        kind = getattr(sub, "original_name", "")
        if name and (kind == _LINEAR or kind in _STAYS_FLOAT):
            found.append((name, kind))
    return found


def _excluded(names: list[str], patterns: tuple[str, ...]) -> set[str]:
    regexes = [re.compile(p) for p in patterns]
    return {n for n in names if any(r.search(n) for r in regexes)}


def _qconfig_dict(config: DynamicConfig, excluded: set[str]) -> dict:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    qconfig = per_channel_dynamic_qconfig if config.granularity == "per_channel" else default_dynamic_qconfig
    return {"": qconfig, **{name: None for name in sorted(excluded)}}


def _quantize(module: torch.jit.ScriptModule, qconfig_dict: dict) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # The legacy JIT API (and the torch.jit.script it calls) warns that it is deprecated; that is
        # known and why this path is marked `legacy` in the registry.
        warnings.filterwarnings("ignore", message=r".*deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*\.grad attribute of a Tensor that is not a leaf.*")
        from torch.ao.quantization import quantize_dynamic_jit

        return quantize_dynamic_jit(module, qconfig_dict)


def _count_ops(module: torch.jit.ScriptModule, kind: str) -> int:
    return sum(1 for node in module.inlined_graph.nodes() if node.kind() == kind)


def resolve_input_specs(ctx: JobContext, inputs: list[TensorSpec]) -> list[TensorSpec]:
    """TorchScript records no dtypes or shapes: take them from the dataset the job measures on."""
    path = ctx.evaluation_path or ctx.calibration_path
    if path is None or all(s.dtype != "unknown" for s in inputs):
        return inputs
    from worker.engine.formats import datasets

    arrays = datasets.inspect(Path(path), DatasetKind.tensors).arrays
    if len(inputs) == 1 and len(arrays) == 1:
        matched = {inputs[0].name: next(iter(arrays.values()))}
    else:
        matched = {s.name: arrays[s.name] for s in inputs if s.name in arrays}
    resolved = []
    for spec in inputs:
        array = matched.get(spec.name)
        if spec.dtype != "unknown" or array is None:
            resolved.append(spec)  # load_samples names what is missing
        else:
            resolved.append(TensorSpec(spec.name, array.dtype, ["batch", *array.shape[1:]]))
    return resolved


def run(ctx: JobContext) -> QuantizeResult:
    """Quantize a TorchScript model's Linear layers to int8 weights with per-call int8 activations."""
    config: DynamicConfig = ctx.config
    ctx.progress("loading", 0.02)
    original = ts_format.load_module(ctx.model_path)
    inputs = resolve_input_specs(ctx, ts_format.input_specs(original))
    samples = evaluate.load_samples(ctx, inputs)  # fail on a bad dataset before any work

    layers_found = _weight_modules(original)
    excluded = _excluded([n for n, kind in layers_found if kind == _LINEAR], config.exclude)
    linears = [n for n, kind in layers_found if kind == _LINEAR and n not in excluded]
    stays_float = [(n, kind) for n, kind in layers_found if kind in _STAYS_FLOAT]
    notes: list[str] = []
    if not config.symmetric:
        notes.append("asymmetric weights are not offered by fbgemm's dynamic Linear; weights were quantized "
                     "symmetrically")

    ctx.progress("quantizing", 0.10)
    quantized = _quantize(original, _qconfig_dict(config, excluded))
    n_int8 = _count_ops(quantized, "quantized::linear_dynamic")
    if n_int8 == 0:
        raise EngineError("dynamic quantization of TorchScript found no Linear layer to quantize (the legacy "
                          "JIT path quantizes Linear only); export the model with torch.export instead",
                          code="nothing_to_quantize")
    if n_int8 < len(linears):
        notes.append(f"only {n_int8} of {len(linears)} Linear layer(s) were quantized: the JIT pass skips "
                     "Linear modules it cannot match in the scripted graph")
    if stays_float:
        kinds = sorted({kind for _, kind in stays_float})
        notes.append(f"{len(stays_float)} {'/'.join(kinds)} layer(s) stayed float: TorchScript's "
                     f"quantize_dynamic_jit quantizes Linear only ({', '.join(n for n, _ in stays_float)}); "
                     "export the model with torch.export for broader coverage")

    return deliver(ctx, original, quantized, layers_found, set(linears), inputs, samples, notes, "torchscript_dynamic",
                   {"quantized_linear_ops": n_int8, "kept_float": sorted(excluded)})


def deliver(ctx: JobContext, original: torch.jit.ScriptModule, quantized: torch.jit.ScriptModule,
            found: list[tuple[str, str]], int8: set[str], inputs: list[TensorSpec], samples: evaluate.Samples,
            notes: list[str], details_key: str, details: dict) -> QuantizeResult:
    """Save the quantized module, measure the saved file against the float one, and build the result.

    Shared by the dynamic and static TorchScript methods; `found` lists (layer, type), `int8` the
    layers whose weights were quantized."""
    import torch

    from worker.engine.methods import ts_layer_sqnr

    output = ctx.work_dir / f"{ctx.model_name}.int8.pt"
    ctx.progress("packaging", 0.60)
    torch.jit.save(quantized, str(output))
    layers = [{"name": n, "op": kind, "weight_dtype": "int8" if n in int8 else "float32",
               "activation_dtype": "uint8" if n in int8 else "float32", "sqnr_db": None} for n, kind in found]
    ts_layer_sqnr.fill(ctx, layers, original, quantized, inputs, samples)
    del quantized
    float_runner = ts_format.runner_for_module(original, [s.name for s in inputs], threads=1)
    quant_runner = ts_format.load_runner(output, threads=1)  # measure the saved file, not the object

    engine = torch.backends.quantized.engine
    metrics = evaluate.measure(
        ctx, float_runner, quant_runner, samples,
        original_bytes=Path(ctx.model_path).stat().st_size, quantized_bytes=output.stat().st_size,
        runtime=f"torch {torch.__version__} (TorchScript, {engine})", layers=layers, extra_warnings=notes,
    )
    ctx.progress("done", 1.0)
    return QuantizeResult(
        artifacts=[ArtifactFile(kind="model", path=output, filename=output.name, format="torchscript")],
        metrics=metrics,
        report={"versions": report.runtime_versions(), "host": report.host_info(),
                details_key: {**details, "quantized_engine": engine}},
    )
