"""TorchScript dynamic int8: legacy torch.ao `quantize_dynamic_jit` (fbgemm Linear kernels), measured."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from worker.engine import evaluate, sensitivity_analysis
from worker.engine.errors import EngineError
from worker.engine.torchscript import common as ts_common
from worker.engine.torchscript import deliver, refusal
from worker.engine.torchscript import sensitivity as ts_sensitivity
from worker.engine.types import QuantizeResult

if TYPE_CHECKING:
    import torch

    from worker.engine.config import DynamicConfig
    from worker.engine.context import JobContext

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


def run(ctx: JobContext) -> QuantizeResult:
    """Quantize a TorchScript model's Linear layers to int8 weights with per-call int8 activations."""
    config: DynamicConfig = ctx.config
    ctx.progress("loading", 0.02)
    original = ts_common.load_module(ctx.model_path)
    inputs = ts_common.resolve_input_specs(ctx, ts_common.input_specs(original))
    samples = evaluate.load_samples(ctx, inputs)  # fail on a bad dataset before any work

    layers_found = _weight_modules(original)
    excluded = {n for n, kind in layers_found if kind == _LINEAR and config.excludes(n)}
    linears = [n for n, kind in layers_found if kind == _LINEAR and n not in excluded]
    stays_float = [(n, kind) for n, kind in layers_found if kind in _STAYS_FLOAT]
    notes: list[str] = []
    if not config.symmetric:
        notes.append("asymmetric weights are not offered by fbgemm's dynamic Linear; weights were quantized "
                     "symmetrically")

    def convert(kept_float: frozenset[str] = frozenset()) -> torch.jit.ScriptModule:
        try:
            return _quantize(original, _qconfig_dict(config, excluded | kept_float))
        except Exception as exc:  # the JIT passes raise RuntimeError and friends on graphs they cannot match
            raise refusal.jit_refusal(exc, original, "dynamic") from exc

    ctx.progress("quantizing", 0.10)
    quantized = convert()
    n_int8 = _count_ops(quantized, "quantized::linear_dynamic")
    if n_int8 == 0:
        raise EngineError("dynamic quantization of TorchScript found no Linear layer to quantize (the legacy "
                          "JIT path quantizes Linear only); export the model with torch.export instead",
                          code="nothing_to_quantize")
    sensed = ts_sensitivity.analyse(ctx, original=original, plain=quantized, build=convert, candidates=linears,
                                    inputs=inputs, samples=samples, artifact=deliver.artifact_path(ctx),
                                    per_call_scales=True, span=(0.15, 0.55))
    if sensed.kept:  # the target keeps these float: the same build the search measured, delivered
        quantized = convert(frozenset(sensed.kept))
        excluded |= set(sensed.kept)
        linears = [n for n in linears if n not in excluded]
        n_int8 = _count_ops(quantized, "quantized::linear_dynamic")
    if n_int8 < len(linears):
        notes.append(f"only {n_int8} of {len(linears)} Linear layer(s) were quantized: the JIT pass skips "
                     "Linear modules it cannot match in the scripted graph")
    if stays_float:
        kinds = sorted({kind for _, kind in stays_float})
        notes.append(f"{len(stays_float)} {'/'.join(kinds)} layer(s) stayed float: TorchScript's "
                     f"quantize_dynamic_jit quantizes Linear only ({', '.join(n for n, _ in stays_float)}); "
                     "export the model with torch.export for broader coverage")

    result = deliver.deliver(ctx, original, quantized, layers_found, set(linears), inputs, samples, notes,
                             "torchscript_dynamic", {"quantized_linear_ops": n_int8, "kept_float": sorted(excluded)})
    return sensitivity_analysis.attach(result, sensed)
