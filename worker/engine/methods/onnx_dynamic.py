"""ONNX dynamic int8: onnxruntime's quantize_dynamic after quant_pre_process, checked and measured."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.engine import evaluate, report
from worker.engine import metrics as m
from worker.engine.formats import onnx as onnx_format
from worker.engine.types import ArtifactFile, EngineError, QuantizeResult

if TYPE_CHECKING:
    import onnx

    from worker.engine import JobContext
    from worker.engine.config import DynamicConfig

# Conv is left out on purpose: ConvInteger ran the digits CNN 4-5x slower than float (ENGINE.md).
# Gemm is rewritten to MatMul by the dynamic quantizer itself in onnxruntime 1.32.
OP_TYPES = ("MatMul", "Gemm", "Attention", "LSTM", "Gather", "EmbedLayerNormalization")
TARGET_COSINE = 0.995  # ENGINE.md's goal on MiniLM; below it the most sensitive layers stay float
MAX_RATIO_FOR_FLOAT_LAYERS = 0.30  # ...but only as long as the file stays this small
MAX_EXTRA_RATIO = 0.04  # and float layers never add more than 4% of the original size
COLLAPSE_COSINE = 0.9
TUNING_SAMPLES = 32
_QUANTIZED_SUFFIX = re.compile(r"(_Transposed(_\d+)?)?_quantized$")


@contextlib.contextmanager
def _scratch(work_dir: Path) -> Iterator[Path]:
    """cwd and tempfile both inside work_dir for the block: quant_pre_process leaves files behind."""
    scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=work_dir))
    previous_cwd, previous_tmp = os.getcwd(), tempfile.tempdir
    os.chdir(scratch)
    tempfile.tempdir = str(scratch)
    try:
        yield scratch
    finally:
        tempfile.tempdir = previous_tmp
        os.chdir(previous_cwd)
        shutil.rmtree(scratch, ignore_errors=True)


def _pre_process(model_path: Path, ctx: JobContext, scratch: Path) -> tuple[Path, list[str]]:
    """quant_pre_process folds LSTM W/R hidden behind Slice/Concat into initializers; without it the
    quantizer silently skips the LSTM. Falls back to the raw model when it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = scratch / "prepared.onnx"
    errors = []
    for options in ({}, {"skip_symbolic_shape": True}):
        try:
            quant_pre_process(str(model_path), str(target), **options)
            return target, []
        except Exception as exc:  # it raises whatever its shape inference hits
            errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    ctx.log("warning", f"quant_pre_process failed ({'; '.join(errors)}); quantizing the model as uploaded")
    return model_path, ["onnxruntime's pre-processing failed, so the model was quantized as uploaded; "
                            "layers whose weights are computed in the graph stayed float"]


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


def _excluded(nodes: list[onnx_format.WeightNode], patterns: tuple[str, ...]) -> set[str]:
    """Nodes whose node name, layer name or weight name matches any of the user's regexes."""
    regexes = [re.compile(p) for p in patterns]
    return {n.node for n in nodes
            if any(r.search(name) for r in regexes for name in (n.node, n.layer, *n.weights))}


def _quantized_weights(model: onnx.ModelProto) -> dict[str, str]:
    """Original weight name -> integer dtype, for every weight the quantizer stored as integers."""
    from onnx import helper

    found = {}
    for t in model.graph.initializer:
        if _QUANTIZED_SUFFIX.search(t.name) and t.data_type in (2, 3):  # UINT8, INT8
            found[_QUANTIZED_SUFFIX.sub("", t.name)] = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).name
    return found


def _layers(nodes: list[onnx_format.WeightNode], quantized: onnx.ModelProto, excluded: set[str],
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


def _layer_sqnr(ctx: JobContext, model: onnx.ModelProto, nodes: list[onnx_format.WeightNode],
                batches: list[dict[str, np.ndarray]], scratch: Path) -> dict[str, float]:
    """Each MatMul/Gemm's own SQNR under dynamic int8, from its float inputs on a few samples."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    targets = [n for n in nodes if n.op in ("MatMul", "Gemm")]
    if not targets:
        return {}
    try:
        values = onnx_format.capture(model, [by_name[n.node].input[0] for n in targets], batches[:8],
                                     scratch / "capture.onnx")
    except Exception as exc:  # only a diagnostic: the job goes on without per-layer numbers
        ctx.log("warning", f"per-layer error not measured: {exc}")
        return {}
    config: DynamicConfig = ctx.config
    result = {}
    for n in targets:
        node = by_name[n.node]
        attrs = {a.name: a.i for a in node.attribute}
        w = numpy_helper.to_array(inits[n.weights[0]])
        if node.op_type == "Gemm" and attrs.get("transB", 0):
            w = w.T
        xs = values[node.input[0]]
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            xs = [x.T for x in xs]
        result[n.node] = m.dynamic_matmul_sqnr(xs, w, per_channel=config.granularity == "per_channel",
                                               symmetric=config.symmetric)
    return result


def _cosine(reference: list[list[np.ndarray]], path: Path, batches: list[dict[str, np.ndarray]]) -> float:
    runner = onnx_format.load_runner(path, threads=None)
    return m.cosine(reference, [runner(b) for b in batches])[0]


def run(ctx: JobContext) -> QuantizeResult:
    """Quantize an ONNX model's MatMul/Gemm/LSTM/Gather/Attention weights to int8, activations per call."""
    import onnx
    import onnxruntime

    config: DynamicConfig = ctx.config
    ctx.progress("preparing", 0.02)
    original = onnx_format.load(ctx.model_path)
    info = onnx_format.describe(original)
    samples = evaluate.load_samples(ctx, info.inputs)  # fail on a bad dataset before any work
    tuning = samples.batches[:TUNING_SAMPLES]
    if ctx.calibration_path is not None and samples.source == "evaluation":
        # choose layers on calibration data so the evaluation numbers stay unbiased
        tuning = evaluate.load_npz(ctx.calibration_path, info.inputs, TUNING_SAMPLES, "calibration").batches
    model_path = ctx.model_path.resolve()  # absolute: the quantizer runs with cwd in a scratch folder
    output = ctx.work_dir.resolve() / f"{ctx.model_name}.int8.onnx"
    original_bytes = model_path.stat().st_size
    warnings: list[str] = []

    with _scratch(ctx.work_dir.resolve()) as scratch:
        prepared, notes = _pre_process(model_path, ctx, scratch)
        warnings += notes
        model = onnx.load(str(prepared))
        # pre-processing drops the exporter's module paths; take layer names from the upload
        known = {n.name: onnx_format.layer_name(n) for n in original.graph.node if n.name}
        nodes = [dataclasses.replace(n, layer=known.get(n.node, n.layer)) for n in onnx_format.weight_nodes(model)]
        excluded = _excluded(nodes, config.exclude)
        ctx.progress("quantizing", 0.15)
        _quantize(prepared, output, config, excluded, reduce_range=False)

        ctx.progress("checking", 0.40)
        float_tuning = onnx_format.load_runner(model_path, threads=None)
        reference = [float_tuning(b) for b in tuning]
        cosine = _cosine(reference, output, tuning)
        reduce_range = False
        del original  # the upload's graph is no longer needed; on big models it is big
        if cosine < COLLAPSE_COSINE:
            # 8-bit products can saturate int16 accumulators on CPUs without VNNI (ENGINE.md): 7 bits fix it
            retry = scratch / "reduce_range.onnx"
            _quantize(prepared, retry, config, excluded, reduce_range=True)
            retry_cosine = _cosine(reference, retry, tuning)
            ctx.log("warning", f"cosine {cosine:.4f} with 8-bit weights, {retry_cosine:.4f} with reduce_range")
            if retry_cosine > cosine:
                shutil.move(retry, output)
                warnings.append(f"outputs collapsed with 8-bit weights (cosine {cosine:.3f}); weights were "
                                f"quantized to 7 bits (reduce_range) instead (cosine {retry_cosine:.3f})")
                cosine, reduce_range = retry_cosine, True

        ctx.progress("checking", 0.50)
        sqnr = _layer_sqnr(ctx, model, nodes, tuning, scratch)
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

    quantized = onnx.load(str(output))
    layers = _layers(nodes, quantized, excluded, sqnr)
    by_config = _excluded(nodes, config.exclude)
    float_layers = {"excluded_by_config": [n.layer for n in nodes if n.node in by_config],
                    "kept_float_for_fidelity": [n.layer for n in nodes if n.node in excluded - by_config]}
    warnings += _coverage_warnings(model, quantized, layers, excluded)

    runner_float = onnx_format.load_runner(model_path, threads=1)
    runner_quant = onnx_format.load_runner(output, threads=1)
    metrics = evaluate.measure(
        ctx, runner_float, runner_quant, samples,
        original_bytes=original_bytes, quantized_bytes=output.stat().st_size,
        runtime=f"onnxruntime {onnxruntime.__version__}", layers=layers, extra_warnings=warnings,
    )
    ctx.progress("done", 1.0)
    return QuantizeResult(
        artifacts=[ArtifactFile(kind="model", path=output, filename=output.name, format="onnx")],
        metrics=metrics,
        report={"versions": report.runtime_versions(), "host": report.host_info(),
                "onnx_dynamic": {"pre_processed": prepared != model_path, "reduce_range": reduce_range,
                                 "op_types": list(OP_TYPES), **float_layers}},
    )


def _keep_sensitive_float(ctx: JobContext, prepared: Path, output: Path, excluded: set[str],
                          sqnr: dict[str, float], nodes: list[onnx_format.WeightNode],
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
