"""ONNX dynamic int8: quantize_dynamic after quant_pre_process, smoothed or partly float if fidelity asks."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.engine import evaluate, report
from worker.engine import metrics as m
from worker.engine.errors import EngineError
from worker.engine.onnx import common as onnx_common
from worker.engine.onnx import deliver, normalize, smoothing, subgraphs
from worker.engine.onnx import sensitivity as onnx_sensitivity
from worker.engine.types import ArtifactFile, QuantizeResult

if TYPE_CHECKING:
    import onnx

    from worker.engine.config import DynamicConfig
    from worker.engine.context import JobContext

# Conv is left out on purpose: ConvInteger ran the digits CNN 4-5x slower than float (ENGINE.md).
# Gemm is rewritten to MatMul by the dynamic quantizer itself in onnxruntime 1.32.
OP_TYPES = ("MatMul", "Gemm", "Attention", "LSTM", "Gather", "EmbedLayerNormalization")
TARGET_COSINE = 0.995  # ENGINE.md's goal on MiniLM; below it the most sensitive layers stay float
MAX_RATIO_FOR_FLOAT_LAYERS = 0.30  # ...but only as long as the file stays this small
MAX_EXTRA_RATIO = 0.04  # and float layers never add more than 4% of the original size
COLLAPSE_COSINE = 0.9
TUNING_SAMPLES = 32
_QUANTIZED_SUFFIX = re.compile(r"(_Transposed(_\d+)?)?_quantized$")


def _quantize(src: Path, dst: Path, config: DynamicConfig, exclude: set[str], reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src), str(dst),
        op_types_to_quantize=list(OP_TYPES),
        per_channel=config.granularity == "per_channel",
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8 if config.symmetric else QuantType.QUInt8,
        # a Gemm is renamed <name>_MatMul when the quantizer rewrites it, so exclude both names
        nodes_to_exclude=sorted(exclude | {f"{n}_MatMul" for n in exclude}),
        extra_options={"MatMulConstBOnly": True},  # activation x activation MatMuls stay float
    )


def _quantized_weights(model: onnx.ModelProto) -> dict[str, str]:
    """Original weight name -> integer dtype, for every weight the quantizer stored as integers."""
    from onnx import helper

    found = {}
    for t in model.graph.initializer:
        if _QUANTIZED_SUFFIX.search(t.name) and t.data_type in (2, 3):  # UINT8, INT8
            found[_QUANTIZED_SUFFIX.sub("", t.name)] = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).name
    return found


def _layers(nodes: list[onnx_common.WeightNode], quantized: onnx.ModelProto, excluded: set[str],
            sqnr: dict[str, float]) -> list[dict]:
    integer = _quantized_weights(quantized)
    layers = []
    for n in nodes:
        dtype = None if n.node in excluded else next((integer[w] for w in n.weights if w in integer), None)
        layers.append({
            "name": n.layer, "op": n.op,
            "weight_dtype": dtype or "float32",
            # MatMulInteger and DynamicQuantizeLSTM take uint8 activations; a quantized Gather
            # only stores its table as integers and hands float rows on
            "activation_dtype": "uint8" if dtype and n.op != "Gather" else "float32",
            "sqnr_db": round(sqnr[n.node], 2) if dtype and n.node in sqnr else None,
        })
    return layers


def _try_smoothing(ctx: JobContext, model: onnx.ModelProto, matmuls: dict[str, smoothing.MatMulInput],
                   excluded: set[str], reference: list[list[np.ndarray]], tuning: list[dict[str, np.ndarray]],
                   output: Path, cosine: float, reduce_range: bool,
                   scratch: Path) -> tuple[Path, dict[str, smoothing.MatMulInput], float]:
    """Quantize a smoothed copy; it replaces output when it scores better on the tuning samples.
    Returns the smoothed float model, the MatMuls it changed and the new cosine (or empty and the old)."""
    smoothed = scratch / "smoothed.onnx"
    changed = smoothing.smooth(model, matmuls, excluded, ctx.config, smoothed, reduce_range=reduce_range)
    if not changed:
        return smoothed, {}, cosine
    candidate = scratch / "smoothed.int8.onnx"
    _quantize(smoothed, candidate, ctx.config, excluded, reduce_range)
    value = _cosine(reference, candidate, tuning)
    ctx.log("info", f"SmoothQuant scales on {len(changed)} MatMul(s): tuning cosine {cosine:.4f} -> {value:.4f}")
    if value <= cosine:
        return smoothed, {}, cosine
    shutil.move(candidate, output)
    return smoothed, changed, value


def _cosine(reference: list[list[np.ndarray]], path: Path, batches: list[dict[str, np.ndarray]]) -> float:
    runner = onnx_common.load_runner(path, threads=None, ours=True)
    return m.cosine(reference, [evaluate.unpadded(b, runner(b)) for b in batches])[0]


def run(ctx: JobContext) -> QuantizeResult:
    """Quantize an ONNX model's MatMul/Gemm/LSTM/Gather/Attention weights to int8, activations per call."""
    import onnx

    config: DynamicConfig = ctx.config
    ctx.progress("loading", 0.02)
    original = onnx_common.load(ctx.model_path)
    info = onnx_common.describe(original)
    samples = evaluate.load_samples(ctx, info.inputs)  # fail on a bad dataset before any work
    tuning = samples.batches[:TUNING_SAMPLES]
    if ctx.calibration_path is not None and samples.source == "evaluation":
        # choose layers on calibration data so the evaluation numbers stay unbiased
        tuning = evaluate.load_npz(ctx.calibration_path, info.inputs, TUNING_SAMPLES, "calibration").batches
    model_path = ctx.model_path.resolve()  # absolute: the quantizer runs with cwd in a scratch folder
    output = ctx.work_dir.resolve() / f"{ctx.model_name}.int8.onnx"
    original_bytes = model_path.stat().st_size
    warnings: list[str] = subgraphs.check(original, "dynamic")  # weights under If/Loop stay float

    with onnx_common.scratch_dir(ctx.work_dir.resolve()) as scratch:
        # Constant-node weights become initializers (else the quantizer raises or skips them and the file
        # grows), and quant_pre_process folds LSTM weights hidden behind Slice/Concat
        normalized = normalize.prepare(model_path, scratch, min_opset=0, log=ctx.log, feeds=tuning[0])
        warnings += normalized.warnings
        prepared = normalized.path
        model = onnx.load(str(prepared))
        # pre-processing drops the exporter's module paths; take layer names from the upload
        known = {n.name: onnx_common.layer_name(n) for n in original.graph.node if n.name}
        nodes = [dataclasses.replace(n, layer=known.get(n.node, n.layer)) for n in onnx_common.weight_nodes(model)]
        excluded = onnx_common.excluded_nodes(nodes, config)
        ctx.progress("quantizing", 0.15)
        _quantize(prepared, output, config, excluded, reduce_range=False)

        ctx.progress("quantizing", 0.40)
        float_tuning = onnx_common.load_runner(model_path, threads=None)
        reference = [evaluate.unpadded(b, float_tuning(b)) for b in tuning]
        cosine = _cosine(reference, output, tuning)
        reduce_range = False
        del original  # the upload's graph is no longer needed; on big models it is big
        # 8-bit products can saturate int16 accumulators on CPUs without VNNI (ENGINE.md): 7 bits fix it. On
        # such a CPU, below target and not only at a collapse: SmoothQuant scales the weights up, which made
        # the saturation worse (outlier test model: 0.987 with 8 bits after smoothing, 0.9999 with 7).
        no_vnni = report.host_info().get("vnni") is False
        if cosine < COLLAPSE_COSINE or (no_vnni and cosine < TARGET_COSINE):
            retry = scratch / "reduce_range.onnx"
            _quantize(prepared, retry, config, excluded, reduce_range=True)
            retry_cosine = _cosine(reference, retry, tuning)
            ctx.log("warning", f"cosine {cosine:.4f} with 8-bit weights, {retry_cosine:.4f} with reduce_range")
            if retry_cosine > cosine:
                shutil.move(retry, output)
                what = "collapsed" if cosine < COLLAPSE_COSINE else "lost fidelity"
                cpu = ", on a CPU without VNNI" if no_vnni else ""
                warnings.append(f"outputs {what} with 8-bit weights (cosine {cosine:.3f}{cpu}); weights were "
                                f"quantized to 7 bits (reduce_range) instead (cosine {retry_cosine:.3f})")
                cosine, reduce_range = retry_cosine, True

        ctx.progress("quantizing", 0.50)
        matmuls = smoothing.capture_matmuls(ctx, model, nodes, tuning, scratch)
        sqnr = smoothing.layer_sqnr(matmuls, config, reduce_range=reduce_range)
        smoothed: dict[str, smoothing.MatMulInput] = {}
        if cosine < TARGET_COSINE and matmuls:
            scaled_model, smoothed, cosine = _try_smoothing(ctx, model, matmuls, excluded, reference, tuning, output,
                                                            cosine, reduce_range, scratch)
            if smoothed:  # the float layers below are chosen, and quantized, on the smoothed model
                prepared = scaled_model
                sqnr.update(smoothing.layer_sqnr(smoothed, config, reduce_range=reduce_range))
        if cosine < TARGET_COSINE and sqnr:
            before = cosine
            kept, cosine = _keep_sensitive_float(ctx, prepared, output, excluded, sqnr, nodes, reference,
                                                 tuning, original_bytes, reduce_range, cosine, scratch)
            if kept:
                excluded |= kept
                names = ", ".join(f"{n.layer} ({sqnr[n.node]:.1f} dB as int8)" for n in nodes if n.node in kept)
                warnings.append(f"kept the {len(kept)} most error-sensitive layer(s) in float, which raised "
                                f"the cosine on tuning samples from {before:.4f} to {cosine:.4f}: {names}")
                ctx.log("info", f"kept float: {names}; tuning cosine now {cosine:.4f}")

        delivered = deliver.checked_or_per_tensor(
            ctx, output, "as tuned", lambda cfg, kept, path: _quantize(prepared, path, cfg, excluded | kept,
                                                                       reduce_range),
            tuning[0], scratch=scratch, full_check=normalized.full_check)
        warnings += delivered.warnings
        excluded |= delivered.kept_float
        chosen_config = delivered.variant.options["config"]
        integer = _quantized_weights(onnx.load(str(output)))
        sensed = onnx_sensitivity.analyse(
            ctx, output=output, model_path=model_path, nodes=nodes, samples=samples, sqnr=sqnr, scratch=scratch,
            quantized={n.node for n in nodes if n.node not in excluded and any(w in integer for w in n.weights)},
            requantize=lambda kept, path: _quantize(prepared, path, chosen_config, excluded | kept, reduce_range))
        excluded |= sensed.kept

    quantized = onnx.load(str(output))
    if output.stat().st_size >= original_bytes:
        raise EngineError(f"dynamic int8 did not make this model smaller ({output.stat().st_size} bytes against "
                          f"{original_bytes} uploaded): its weights are not in layers dynamic quantization "
                          "covers (MatMul, Gemm, LSTM, Gather, Attention); try method 'static'",
                          code="nothing_to_quantize")
    layers = _layers(nodes, quantized, excluded, sqnr)
    by_config = onnx_common.excluded_nodes(nodes, config)
    float_layers = {"excluded_by_config": [n.layer for n in nodes if n.node in by_config],
                    "kept_float_for_fidelity": [n.layer for n in nodes if n.node in excluded - by_config],
                    "smoothed": [n.layer for n in nodes if n.node in smoothed]}
    warnings += _coverage_warnings(model, quantized, layers, excluded)

    metrics = onnx_common.measure_files(ctx, model_path, output, samples, original_bytes=original_bytes,
                                        layers=layers, warnings=warnings)
    metrics["sensitivity"] = sensed.report
    if sensed.target is not None:
        metrics["target"] = sensed.target
    return QuantizeResult(
        artifacts=[ArtifactFile(kind="model", path=output, filename=output.name, format="onnx")],
        metrics=metrics,
        report={"versions": report.runtime_versions(), "host": report.host_info(),
                "onnx_dynamic": {"pre_processed": normalized.pre_process, "reduce_range": reduce_range,
                                 "opset": {"upload": normalized.original_opset, "quantized": normalized.opset},
                                 "constants_folded": normalized.folded_constants,
                                 "variant": delivered.variant.label,
                                 "layer_sqnr": smoothing.ESTIMATE_NOTE,
                                 "op_types": list(OP_TYPES), **float_layers}},
        error=sensed.error,
    )


def _keep_sensitive_float(ctx: JobContext, prepared: Path, output: Path, excluded: set[str],
                          sqnr: dict[str, float], nodes: list[onnx_common.WeightNode],
                          reference: list[list[np.ndarray]], tuning: list[dict[str, np.ndarray]],
                          original_bytes: int, reduce_range: bool, cosine: float,
                          scratch: Path) -> tuple[set[str], float]:
    """Re-quantize with the lowest-SQNR layers left float (1, 2, 4, 8 of them) within the size budget;
    keep the first candidate reaching TARGET_COSINE, else the best one."""
    base = output.stat().st_size
    budget = MAX_EXTRA_RATIO * original_bytes
    if base <= MAX_RATIO_FOR_FLOAT_LAYERS * original_bytes:
        budget = min(budget, MAX_RATIO_FOR_FLOAT_LAYERS * original_bytes - base)
    elements = {n.node: n.elements for n in nodes}
    ranked = sorted((node for node in sqnr if node not in excluded), key=sqnr.__getitem__)
    best: tuple[set[str], float] = (set(), cosine)
    tried = 0
    for count in (1, 2, 4, 8):
        chosen = set(ranked[:count])
        # a float layer costs 3 more bytes per weight than its int8 copy
        if len(chosen) == tried or 3 * sum(elements[c] for c in chosen) > budget:
            break
        tried = len(chosen)
        candidate = scratch / f"keep_{count}.onnx"
        _quantize(prepared, candidate, ctx.config, excluded | chosen, reduce_range)
        value = _cosine(reference, candidate, tuning)
        ctx.log("info", f"{count} layer(s) float: tuning cosine {value:.4f}")
        if value > best[1]:
            best = (chosen, value)
            shutil.copyfile(candidate, output)
        if value >= TARGET_COSINE:
            break
    return best


def _coverage_warnings(model: onnx.ModelProto, quantized: onnx.ModelProto, layers: list[dict],
                       excluded: set[str]) -> list[str]:
    """Plain words for what the quantizer skipped without saying so."""
    warnings = []
    lstms = sum(1 for n in model.graph.node if n.op_type == "LSTM")
    quantized_lstms = sum(1 for n in quantized.graph.node if n.op_type == "DynamicQuantizeLSTM")
    if lstms > quantized_lstms:
        warnings.append(f"{lstms - quantized_lstms} of {lstms} LSTM layer(s) stayed float: onnxruntime "
                        "quantizes an LSTM only when its W and R weights are plain initializers")
    if any(layer["op"] in ("Conv", "ConvTranspose") for layer in layers):
        warnings.append("convolutions stay float under dynamic quantization (ConvInteger is slower than "
                        "float on CPU); use method 'static' for convolutional models")
    if not excluded and not any(layer["weight_dtype"] != "float32" for layer in layers):
        raise EngineError("dynamic quantization found no MatMul, Gemm, LSTM, Gather or Attention weights "
                          "to quantize in this model", code="nothing_to_quantize")
    return warnings
