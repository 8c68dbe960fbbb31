"""TorchScript static int8: legacy torch.ao `quantize_jit` (x86/fbgemm kernels), calibrated, measured.

Legacy on purpose (registry status `legacy`): torch 2.13 still runs it but warns that the JIT and
torch.ao APIs are deprecated; those imports and warnings stay inside this module. It is worth
offering because fbgemm ran the digits CNN 2.4-2.55x faster than float on a CPU without VNNI,
faster than PT2E there (ENGINE.md).

Calibration algorithms (activations, 7-bit `reduce_range` as torch's x86/fbgemm qconfig has it, so
u8*s8 products cannot saturate on CPUs without VNNI):
- `minmax`: MinMaxObserver.
- `histogram`: HistogramObserver, i.e. exactly `get_default_qconfig("x86")`.
- `entropy`, `percentile`: no such torch.ao observer; the job fails with `unsupported`.
Weights: per-channel (default) or per-tensor symmetric int8 min/max.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

from worker.engine import evaluate, sensitivity_analysis
from worker.engine.errors import EngineError
from worker.engine.torch_export.graph import batched
from worker.engine.torch_export.x86_recipe import ALGORITHMS, CALIBRATION_BATCH, calibration_samples
from worker.engine.torchscript import common as ts_common
from worker.engine.torchscript import deliver, refusal
from worker.engine.torchscript import sensitivity as ts_sensitivity
from worker.engine.types import QuantizeResult

if TYPE_CHECKING:
    import torch

    from worker.engine.config import StaticConfig
    from worker.engine.context import JobContext

_WEIGHT_KINDS = {"Conv1d", "Conv2d", "Conv3d", "Linear"}
_FLOAT_KINDS = {"LSTM", "GRU", "RNN", "Embedding", "EmbeddingBag", "ConvTranspose1d", "ConvTranspose2d"}


@contextlib.contextmanager
def _legacy_api() -> Iterator[None]:
    """Silence the deprecation warnings of torch.ao's JIT quantization, which this path knowingly uses."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*quant_min and quant_max.*")  # reduce_range notice
        warnings.filterwarnings("ignore", message=r".*\.grad attribute of a Tensor that is not a leaf.*")
        yield


def _qconfig(config: StaticConfig):  # noqa: ANN202 - torch.ao QConfig
    import torch
    from torch.ao.quantization import QConfig, observer

    algorithm = config.calibration.algorithm
    if algorithm not in ALGORITHMS:
        raise EngineError(f"calibration algorithm {algorithm!r} is not available for TorchScript static "
                          f"quantization (torch.ao has no such observer); use one of {sorted(ALGORITHMS)}",
                          code="unsupported")
    activation = getattr(observer, ALGORITHMS[algorithm]).with_args(reduce_range=True)
    if config.granularity == "per_channel":
        weight = observer.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    else:
        weight = observer.MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    return QConfig(activation=activation, weight=weight)


def _weight_modules(module: torch.jit.ScriptModule) -> list[tuple[str, str]]:
    found = []
    for name, sub in module.named_modules():
        kind = getattr(sub, "original_name", "")
        if name and (kind in _WEIGHT_KINDS or kind in _FLOAT_KINDS):
            found.append((name, kind))
    return found


def _quantized_ops(module: torch.jit.ScriptModule) -> int:
    kinds = [node.kind() for node in module.inlined_graph.nodes()]
    return sum(1 for k in kinds if k.startswith(("quantized::conv", "quantized::linear")))


def run(ctx: JobContext) -> QuantizeResult:
    """Quantize a TorchScript model's convolutions and Linear layers to int8 with calibrated activations."""
    import torch

    config: StaticConfig = ctx.config
    ctx.progress("loading", 0.02)
    original = ts_common.load_module(ctx.model_path)
    inputs = ts_common.resolve_input_specs(ctx, ts_common.input_specs(original))
    samples = evaluate.load_samples(ctx, inputs)  # fail on a bad dataset before any work
    calibration = calibration_samples(ctx, inputs, config.calibration.num_samples)
    qconfig = _qconfig(config)

    found = _weight_modules(original)
    candidates = [n for n, kind in found if kind in _WEIGHT_KINDS]
    excluded = {name for name in candidates if config.excludes(name)}
    quantizable = [n for n in candidates if n not in excluded]
    notes: list[str] = []
    if not config.symmetric:
        notes.append("asymmetric weights are not offered by fbgemm; weights were quantized symmetrically")

    ctx.progress("calibrating", 0.05)
    names = [s.name for s in inputs]
    scalars = any(s.dtype != "unknown" and not s.shape for s in inputs)  # int/float/bool args go one by one
    batches = ([tuple(ts_common.arguments(original, names, b)) for b in calibration] if scalars
               else list(batched(calibration, inputs, CALIBRATION_BATCH)))

    def convert(kept_float: frozenset[str] = frozenset(), progress: bool = False) -> torch.jit.ScriptModule:
        """prepare, calibrate and convert a copy of the model with `excluded | kept_float` float."""
        def calibrate(model: torch.jit.ScriptModule, data: list[tuple]) -> None:
            with torch.no_grad():
                for i, batch in enumerate(data):
                    model(*batch)
                    if progress:
                        ctx.progress("calibrating", 0.05 + 0.40 * (i + 1) / len(batches))

        try:
            with _legacy_api():
                from torch.ao.quantization import quantize_jit

                # inplace=False: prepare_jit copies the module, so `original` stays the float reference
                return quantize_jit(original, {"": qconfig, **{n: None for n in sorted(excluded | kept_float)}},
                                    calibrate, [batches], inplace=False)
        except EngineError:
            raise
        except Exception as exc:  # the JIT passes raise RuntimeError and friends on graphs they cannot match
            raise refusal.jit_refusal(exc, original, "static") from exc

    quantized = convert(progress=True)
    ctx.progress("quantizing", 0.50)
    n_int8 = _quantized_ops(quantized)
    if n_int8 == 0:
        raise EngineError("static quantization of TorchScript found no convolution or Linear layer it could "
                          "quantize; export the model with torch.export instead", code="nothing_to_quantize")
    sensed = ts_sensitivity.analyse(ctx, original=original, plain=quantized, build=convert, candidates=quantizable,
                                    inputs=inputs, samples=samples, artifact=deliver.artifact_path(ctx),
                                    per_call_scales=False, span=(0.50, 0.58))
    if sensed.kept:  # the target keeps these float: the same build the search measured, delivered
        quantized = convert(frozenset(sensed.kept))
        excluded |= set(sensed.kept)
        quantizable = [n for n in quantizable if n not in excluded]
        n_int8 = _quantized_ops(quantized)
    if n_int8 < len(quantizable):
        notes.append(f"only {n_int8} of {len(quantizable)} convolution/Linear layer(s) were quantized: the JIT "
                     "pass skips modules it cannot match in the scripted graph")
    stays_float = [(n, kind) for n, kind in found if kind in _FLOAT_KINDS]
    if stays_float:
        notes.append(f"{len(stays_float)} layer(s) stayed float ({', '.join(n for n, _ in stays_float[:10])}): "
                     "TorchScript static quantizes convolutions and Linear only")

    int8 = set(quantizable) if n_int8 >= len(quantizable) else set()
    result = deliver.deliver(
        ctx, original, quantized, found, int8, inputs, samples, notes, "torchscript_static",
        {"quantized_ops": n_int8, "kept_float": sorted(excluded), "calibration_samples": len(calibration),
         "activation_observer": f"{ALGORITHMS[config.calibration.algorithm]} (reduce_range)",
         "granularity": config.granularity})
    return sensitivity_analysis.attach(result, sensed)
