"""ONNX dynamic int8: quantize_dynamic after quant_pre_process, smoothed or partly float if fidelity asks."""

from __future__ import annotations

import collections
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
# SmoothQuant migration strengths. MiniLM's layers scored best at 0.8-0.9 sample by sample, but served in a
# batch of 64 those scales lost (cosine 0.992 against 0.996 with at most 0.7): one per-tensor scale then covers
# sentences whose outlier channels the tuning samples did not show.
SMOOTHING_ALPHAS = (0.5, 0.6, 0.7)
SQNR_SAMPLES = 8  # per-layer error on this many tuning samples; channel maxima use all of them
MIN_SMOOTHING_GAIN_DB = 1.0  # each smoothed input costs a Mul: only for a real gain in the layer's SQNR
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


@dataclasses.dataclass
class _MatMul:
    """A MatMul/Gemm with a constant weight, seen as x @ weight, and its float input x on a few samples."""

    op: str
    x: str  # the input tensor's name
    weight_name: str
    weight: np.ndarray  # [K, N]
    inputs: list[np.ndarray]


def _capture_matmuls(ctx: JobContext, model: onnx.ModelProto, nodes: list[onnx_format.WeightNode],
                     batches: list[dict[str, np.ndarray]], scratch: Path) -> dict[str, _MatMul]:
    """Each MatMul/Gemm's weight and float input, by node name; empty when the inputs cannot be captured."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    targets = [n for n in nodes if n.op in ("MatMul", "Gemm")]
    if not targets:
        return {}
    try:
        # every tuning sample: channel maxima from 8 of them made smoothing scales that lost in batches
        values = onnx_format.capture(model, [by_name[n.node].input[0] for n in targets], batches,
                                     scratch / "capture.onnx")
    except Exception as exc:  # only a diagnostic: the job goes on without per-layer numbers
        ctx.log("warning", f"per-layer error not measured: {exc}")
        return {}
    found = {}
    for n in targets:
        node = by_name[n.node]
        attrs = {a.name: a.i for a in node.attribute}
        w = numpy_helper.to_array(inits[n.weights[0]])
        if node.op_type == "Gemm" and attrs.get("transB", 0):
            w = w.T
        xs = values[node.input[0]]
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            xs = [x.T for x in xs]
        found[n.node] = _MatMul(node.op_type, node.input[0], n.weights[0], w, xs)
    return found


def _layer_sqnr(matmuls: dict[str, _MatMul], config: DynamicConfig) -> dict[str, float]:
    """Each MatMul/Gemm's own SQNR under dynamic int8, from its float inputs."""
    per_channel = config.granularity == "per_channel"
    return {name: m.dynamic_matmul_sqnr(mm.inputs[:SQNR_SAMPLES], mm.weight, per_channel=per_channel,
                                        symmetric=config.symmetric)
            for name, mm in matmuls.items()}


def _smooth(model: onnx.ModelProto, matmuls: dict[str, _MatMul], excluded: set[str], config: DynamicConfig,
            path: Path) -> dict[str, _MatMul]:
    """Save the model with SmoothQuant scales where they raise the MatMuls' int8 SQNR; the MatMuls changed.

    Written by hand because onnxruntime offers SmoothQuant only for static quantization. Transformers
    carry a few activation channels 10-20x larger than the rest (MiniLM: 28 against a median of 1.6
    into each FFN), and dynamic int8 quantizes each activation with one scale; x @ W == (x / s) @ (s W),
    so a Mul by 1/s before the MatMul and s folded into its weight make the activation even.
    """
    import onnx
    from onnx import helper, numpy_helper

    readers = collections.Counter(i for n in model.graph.node for i in n.input)
    groups: dict[str, list[str]] = {}
    for name, mm in matmuls.items():
        # a weight is rescaled in place, so only one that no other node reads
        if mm.op == "MatMul" and name and name not in excluded and readers[mm.weight_name] == 1:
            groups.setdefault(mm.x, []).append(name)
    plan = {}
    for x, names in groups.items():
        inputs = matmuls[names[0]].inputs
        x_max = np.max([np.abs(x.reshape(-1, x.shape[-1])).max(0) for x in inputs], axis=0)
        scale, plain, smoothed = m.smoothing_scales(
            x_max, inputs[:SQNR_SAMPLES], [matmuls[n].weight for n in names],
            per_channel=config.granularity == "per_channel", symmetric=config.symmetric, alphas=SMOOTHING_ALPHAS)
        if scale is not None and smoothed - plain >= MIN_SMOOTHING_GAIN_DB:
            plan[x] = (scale, names)
    if not plan:
        return {}

    scaled = onnx.ModelProto()
    scaled.CopyFrom(model)
    inits = {t.name: t for t in scaled.graph.initializer}
    changed = {}
    for x, (scale, names) in plan.items():
        dtype = matmuls[names[0]].weight.dtype
        scaled.graph.initializer.append(numpy_helper.from_array((1 / scale).astype(dtype), f"{x}_smooth_scale"))
        for name in names:
            mm = matmuls[name]
            weight = (mm.weight * scale[:, None]).astype(dtype)
            inits[mm.weight_name].CopyFrom(numpy_helper.from_array(weight, mm.weight_name))
            changed[name] = dataclasses.replace(mm, weight=weight, inputs=[v / scale for v in mm.inputs])
    ordered = []
    for node in scaled.graph.node:
        x = node.input[0] if node.name in changed else None
        if x in plan:  # the Mul goes right before the first MatMul reading x, which keeps the graph sorted
            ordered.append(helper.make_node("Mul", [x, f"{x}_smooth_scale"], [f"{x}_smoothed"],
                                            name=f"{x}_smooth"))
            plan.pop(x)
        if node.name in changed:
            node.input[0] = f"{node.input[0]}_smoothed"
        ordered.append(node)
    del scaled.graph.node[:]
    scaled.graph.node.extend(ordered)
    onnx.save_model(scaled, str(path))
    return changed


def _try_smoothing(ctx: JobContext, model: onnx.ModelProto, matmuls: dict[str, _MatMul], excluded: set[str],
                   reference: list[list[np.ndarray]], tuning: list[dict[str, np.ndarray]], output: Path,
                   cosine: float, reduce_range: bool, scratch: Path) -> tuple[Path, dict[str, _MatMul], float]:
    """Quantize a smoothed copy; it replaces output when it scores better on the tuning samples.
    Returns the smoothed float model, the MatMuls it changed and the new cosine (or empty and the old)."""
    smoothed = scratch / "smoothed.onnx"
    changed = _smooth(model, matmuls, excluded, ctx.config, smoothed)
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
    runner = onnx_format.load_runner(path, threads=None)
    return m.cosine(reference, [evaluate.unpadded(b, runner(b)) for b in batches])[0]


def run(ctx: JobContext) -> QuantizeResult:
    """Quantize an ONNX model's MatMul/Gemm/LSTM/Gather/Attention weights to int8, activations per call."""
    import onnx

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
        reference = [evaluate.unpadded(b, float_tuning(b)) for b in tuning]
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
        matmuls = _capture_matmuls(ctx, model, nodes, tuning, scratch)
        sqnr = _layer_sqnr(matmuls, config)
        smoothed: dict[str, _MatMul] = {}
        pre_processed = prepared != model_path
        if cosine < TARGET_COSINE and matmuls:
            scaled_model, smoothed, cosine = _try_smoothing(ctx, model, matmuls, excluded, reference, tuning, output,
                                                            cosine, reduce_range, scratch)
            if smoothed:  # the float layers below are chosen, and quantized, on the smoothed model
                prepared = scaled_model
                sqnr.update(_layer_sqnr(smoothed, config))
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
                    "kept_float_for_fidelity": [n.layer for n in nodes if n.node in excluded - by_config],
                    "smoothed": [n.layer for n in nodes if n.node in smoothed]}
    warnings += _coverage_warnings(model, quantized, layers, excluded)

    metrics = onnx_format.measure_files(ctx, model_path, output, samples, original_bytes=original_bytes,
                                        layers=layers, warnings=warnings)
    ctx.progress("done", 1.0)
    return QuantizeResult(
        artifacts=[ArtifactFile(kind="model", path=output, filename=output.name, format="onnx")],
        metrics=metrics,
        report={"versions": report.runtime_versions(), "host": report.host_info(),
                "onnx_dynamic": {"pre_processed": pre_processed, "reduce_range": reduce_range,
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
