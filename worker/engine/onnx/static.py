"""ONNX static int8: onnxruntime's quantize_static (QDQ) after quant_pre_process, calibrated, checked and measured."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import evaluate, report
from worker.engine import metrics as m
from worker.engine.errors import EngineError
from worker.engine.onnx import calibration as onnx_calibration
from worker.engine.onnx import common as onnx_common
from worker.engine.onnx import deliver, keep_float, normalize, rewrite, sensitive, speed, static_layers, subgraphs
from worker.engine.onnx import sensitivity as onnx_sensitivity
from worker.engine.types import ArtifactFile, QuantizeResult

if TYPE_CHECKING:
    import onnx

    from worker.engine.config import StaticConfig
    from worker.engine.context import JobContext

# Ops whose presence marks a transformer: static with every op type quantized destroys those (MiniLM
# cosine 0.41, ENGINE.md) because Softmax/Add/LayerNorm outputs lose too much at 8 bits. A Softmax alone
# is no sign (a CNN classifier's or a YOLO head's last op): it counts beside an activation-by-activation
# MatMul, the attention score.
TRANSFORMER_OPS = frozenset({"LayerNormalization", "SkipLayerNormalization", "Attention",
                             "MultiHeadAttention", "GroupQueryAttention", "EmbedLayerNormalization",
                             "SimplifiedLayerNormalization"})
# Gather is kept: an int8 embedding table costs one per-tensor rounding and is most of a small encoder.
TRANSFORMER_OP_TYPES = ("MatMul", "Gemm", "Gather")
COLLAPSE_COSINE = 0.9
COLLAPSE_TOP1 = 0.9
CHECK_SAMPLES = 32
PER_CHANNEL_OPSET = 13


def _op_types(model: onnx.ModelProto) -> tuple[list[str], bool]:
    """The op types to quantize statically, and whether the graph looks like a transformer."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    ops = {n.op_type for n in model.graph.node}
    if ops & TRANSFORMER_OPS or ("Softmax" in ops and _activation_matmuls(model)):
        return [*TRANSFORMER_OP_TYPES, *(["Conv"] if "Conv" in ops else [])], True
    # what quantize_static uses when given none; the calibrator needs the same list to see the same tensors
    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry)), False


def _activation_matmuls(model: onnx.ModelProto) -> set[str]:
    """MatMuls with no constant operand (attention's Q x K and P x V). On transformers they stay float:
    an 8-bit Softmax output is the kind of loss that took MiniLM to cosine 0.41 (ENGINE.md), and
    onnxruntime's MatMulConstBOnly option is ignored by its QDQ quantizer."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return {n.name for n in model.graph.node if n.op_type == "MatMul" and not set(n.input) & constants}


def _named(prepared: Path, scratch: Path) -> tuple[onnx.ModelProto, Path]:
    """The prepared model with every node named (exclusion and the layer table work by node name) and its
    Gemm biases flat (rewrite.flatten_gemm_biases)."""
    import onnx

    model = onnx.load(str(prepared))
    if all(node.name for node in model.graph.node) and not rewrite.flatten_gemm_biases(model):
        return model, prepared
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    named = scratch / "named.onnx"
    onnx.save_model(model, str(named))
    return model, named


def _lstms_dynamic(ctx: JobContext, model: onnx.ModelProto, path: Path, scratch: Path, excluded: set[str],
                   reduce_range: bool) -> tuple[Path, int]:
    """LSTMs quantized dynamically: static QDQ leaves them float (ENGINE.md), DynamicQuantizeLSTM stores
    their weights as int8. Calibration then runs on this model, so its ranges include the LSTMs' error."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    lstms = [n.name for n in model.graph.node if n.op_type == "LSTM" and n.name not in excluded]
    if not lstms:
        return path, 0
    config: StaticConfig = ctx.config
    base = scratch / "lstm_int8.onnx"
    quantize_dynamic(str(path), str(base), op_types_to_quantize=["LSTM"], nodes_to_quantize=lstms,
                     per_channel=config.granularity == "per_channel", reduce_range=reduce_range,
                     weight_type=QuantType.QInt8 if config.symmetric else QuantType.QUInt8)
    return base, len(lstms)


def _quantize(ctx: JobContext, base: Path, output: Path, cache: Path, method: str, op_types: list[str],
              excluded: set[str], reduce_range: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    config: StaticConfig = ctx.config
    extra: dict[str, Any] = {"WeightSymmetric": config.symmetric}
    if method == "Distribution":
        # Distribution's int8 range is the histogram's symmetric span, so a Relu folded into its producer
        # (the QDQ default) would let negative values through: digits CNN top-1 0.94 -> 0.89. Keep them.
        extra["QDQKeepRemovableActivations"] = True
    quantize_static(
        str(base), str(output), None, calibration_cache_path=str(cache),
        calibrate_method=CalibrationMethod[method], quant_format=QuantFormat.QDQ,
        op_types_to_quantize=op_types, per_channel=config.granularity == "per_channel",
        reduce_range=reduce_range,
        # U8S8 and S8S8 measured the same on the reference CPU (ENGINE.md); uint8 activations are what
        # onnxruntime recommends for x86 with or without VNNI.
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8 if config.symmetric else QuantType.QUInt8,
        # the dynamic LSTM step renames a Gemm it rewrites to <name>_MatMul + <name>_Add
        nodes_to_exclude=sorted(excluded | {f"{n}_MatMul" for n in excluded} | {f"{n}_Add" for n in excluded}),
        extra_options=extra,
    )


def _fidelity(reference: list[list[np.ndarray]], path: Path, batches: list[dict[str, np.ndarray]]
              ) -> tuple[float, float | None, float]:
    """(worst output's mean cosine, top-1 agreement, worst per-sample cosine) of a quantized file against
    float outputs, with graph optimizations on: the int8 kernels that saturate are only chosen then."""
    runner = onnx_common.load_runner(path, threads=None, ours=True)
    outs = [runner(b) for b in batches]
    mean, low = m.worst_cosine(reference, outs)
    return mean, m.top1_agreement([r[0] for r in reference], [o[0] for o in outs]), low


def _keep_sensitive_float(ctx: JobContext, model: onnx.ModelProto, nodes: list[onnx_common.WeightNode],
                          output: Path, scratch: Path, reference: list[list[np.ndarray]],
                          checks: list[dict[str, np.ndarray]], requantize: Any, summary: dict[str, Any],
                          warnings: list[str]) -> set[str]:
    """When `output` is not faithful, replace it by the candidate with its most sensitive layers float, if
    one is clearly better (sensitive.py). Returns the nodes kept float."""
    import onnx

    before = _fidelity(reference, output, checks)
    if not sensitive.low(before):
        return set()
    sqnr = static_layers.layer_sqnr(ctx, model, onnx.load(str(output)), nodes, checks[:8], scratch)
    outcome, better = sensitive.keep_worst_float(
        ctx, sensitive.sqnr_drops(model, sqnr), len(nodes), requantize,
        lambda path: _fidelity(reference, path, checks), before, scratch)
    summary["sensitive_layers"] = {"before": {"cosine": round(before[0], 6), "cosine_min": round(before[2], 6)},
                                   "tried": outcome.tried, "kept_float": outcome.kept}
    if better is None:
        return set()
    shutil.move(better, output)
    warnings.append(sensitive.warning(outcome, {n.node: n.layer for n in nodes}))
    return set(outcome.kept)


def _collapsed(fidelity: tuple[float, float | None, float]) -> bool:
    cosine, top1, _ = fidelity
    return cosine < COLLAPSE_COSINE or (top1 is not None and top1 < COLLAPSE_TOP1)


def _score(fidelity: tuple[float, float | None, float]) -> tuple[float, float]:
    return (fidelity[1] if fidelity[1] is not None else fidelity[0], fidelity[0])


def _retry_if_collapsed(ctx: JobContext, quantize: Any, output: Path, scratch: Path,
                        reference: list[list[np.ndarray]], checks: list[dict[str, np.ndarray]],
                        summary: dict[str, Any]) -> tuple[bool, list[str]]:
    """On a collapse, quantize again with 7-bit weights and keep the better file. Returns (switched, warnings)."""
    fidelity = _fidelity(reference, output, checks)
    summary["check"] = {"cosine": round(fidelity[0], 6), "top1_agreement": fidelity[1]}
    if not _collapsed(fidelity):
        return False, []
    retry = scratch / "reduce_range.onnx"
    quantize(retry, True)
    retried = _fidelity(reference, retry, checks)
    summary["retry"] = {"cosine": round(retried[0], 6), "top1_agreement": retried[1]}
    ctx.log("warning", f"static int8 collapsed (cosine, top-1: {fidelity}); with reduce_range: {retried}")
    if _score(retried) <= _score(fidelity):
        return False, []
    shutil.move(retry, output)
    summary["reduce_range_reason"] = "fidelity collapsed with 8-bit weights"
    return True, [f"outputs collapsed with 8-bit weights (cosine {fidelity[0]:.3f} on calibration samples; int8 "
                  f"kernels without VNNI can saturate); weights were quantized to 7 bits (reduce_range) instead "
                  f"(cosine {retried[0]:.3f})"]


def run(ctx: JobContext) -> QuantizeResult:
    """Quantize an ONNX model's weights and activations to int8 with ranges calibrated on ctx's samples."""
    import onnx
    from onnxruntime.quantization.calibrate import save_tensors_data

    config: StaticConfig = ctx.config
    started = time.monotonic()
    ctx.progress("loading", 0.02)
    if ctx.calibration_path is None:
        raise EngineError("static quantization needs a calibration dataset (calibration_dataset_id)",
                          code="dataset_mismatch")
    original = onnx_common.load(ctx.model_path)
    info = onnx_common.describe(original)
    samples = evaluate.load_samples(ctx, info.inputs)  # fail on a bad dataset before any work
    calibration = evaluate.load_npz(Path(ctx.calibration_path), info.inputs, config.calibration.num_samples,
                                    "calibration").batches
    checks = calibration[:CHECK_SAMPLES]
    model_path = ctx.model_path.resolve()  # absolute: the quantizer runs with cwd in a scratch folder
    output = ctx.work_dir.resolve() / f"{ctx.model_name}.int8.onnx"
    original_bytes = model_path.stat().st_size
    host = report.host_info()
    # Without VNNI, 8-bit per-channel int8 convolutions saturate (ENGINE.md): 7-bit weights avoid it.
    reduce_range = host.get("vnni") is False
    warnings: list[str] = subgraphs.check(original, "static")  # weights under If/Loop stay float
    summary: dict[str, Any] = {"reduce_range_reason": "no VNNI on this CPU" if reduce_range else None}

    per_channel = config.granularity == "per_channel"
    with onnx_common.scratch_dir(ctx.work_dir.resolve()) as scratch:
        # per-channel QDQ needs DequantizeLinear's `axis` (opset 13): below it onnxruntime writes a model it
        # then refuses to load, without a word
        normalized = normalize.prepare(model_path, scratch, min_opset=PER_CHANNEL_OPSET if per_channel else 0,
                                       log=ctx.log, feeds=checks[0])
        warnings += normalized.warnings
        prepared = normalized.path
        if per_channel and normalized.opset < PER_CHANNEL_OPSET:
            config = config.model_copy(update={"granularity": "per_tensor"})
            ctx = dataclasses.replace(ctx, config=config)
            warnings.append(f"weights were quantized per tensor, not per channel: per-channel needs opset "
                            f"{PER_CHANNEL_OPSET} and this model stays at opset {normalized.opset}")
        model, named = _named(prepared, scratch)
        known = {n.name: onnx_common.layer_name(n) for n in original.graph.node if n.name}
        nodes = [dataclasses.replace(n, layer=known.get(n.node, n.layer)) for n in onnx_common.weight_nodes(model)]
        by_config = onnx_common.excluded_nodes(nodes, config)
        del original
        ctx.progress("quantizing", 0.08)
        try:
            base, lstms = _lstms_dynamic(ctx, model, named, scratch, by_config, reduce_range)
        except Exception as exc:  # onnxruntime's quantizer raises whatever its graph walk hits
            raise EngineError(f"onnxruntime could not quantize this model's LSTMs: {exc}", code="unsupported") from exc
        base_model = onnx.load(str(base))
        op_types, transformer = _op_types(base_model)
        if transformer:
            warnings.append(f"transformer-like graph: only {', '.join(op_types)} with constant weights were "
                            "quantized statically (int8 Softmax/LayerNorm/Add outputs destroy transformers); "
                            "method 'dynamic' is usually more faithful on transformers")

        attention = _activation_matmuls(base_model) if transformer else set()
        float_check = onnx_common.load_runner(model_path, threads=None)
        if config.calibration.algorithm == "auto":
            def score(ranges: Any, method: str, held: list[dict[str, np.ndarray]]) -> float:
                trial, trial_cache = scratch / f"auto_{method}.onnx", scratch / f"auto_{method}.json"
                save_tensors_data(ranges, trial_cache)
                infinite = set(onnx_calibration.non_finite(ranges))
                around = {n.name for n in base_model.graph.node if infinite & {*n.input, *n.output}}
                _quantize(ctx, base, trial, trial_cache, method, op_types, by_config | attention | around,
                          reduce_range)
                return sensitive.score(_fidelity([float_check(b) for b in held], trial, held))

            chosen, summary["calibration_selection"] = onnx_calibration.choose_algorithm(
                ctx, base, op_types, calibration, scratch, score)
            calibration_config = config.calibration.model_copy(update={"algorithm": chosen})
            ctx = dataclasses.replace(ctx, config=config.model_copy(update={"calibration": calibration_config}))
        ranges, method, notes = onnx_calibration.calibrate(ctx, base, op_types, calibration, scratch)
        warnings += notes
        infinite = onnx_calibration.non_finite(ranges)
        kept_for_range = {n.name for n in base_model.graph.node if set(infinite) & {*n.input, *n.output}}
        if infinite:
            warnings.append(f"{len(infinite)} tensor(s) had a non-finite range in calibration and stay float, "
                            f"with the {len(kept_for_range)} node(s) around them: {', '.join(infinite)}")
        cache = scratch / "calibration.json"
        save_tensors_data(ranges, cache)
        joins = keep_float.mixed_range_joins(base_model, ranges)
        kept_for_scale = set(joins) | keep_float.output_data_movement(base_model)
        warnings += [note] if (note := keep_float.warning(joins)) else []
        excluded = by_config | kept_for_range | attention | kept_for_scale

        def quantize(path: Path, reduce: bool, kept: frozenset[str] = frozenset(), job: JobContext = ctx) -> None:
            try:
                _quantize(job, base, path, cache, method, op_types, excluded | kept, reduce)
            except Exception as exc:  # as above: a model onnxruntime's QDQ quantizer cannot handle
                raise EngineError(f"onnxruntime's static quantizer failed on this model: {type(exc).__name__}: "
                                  f"{exc}", code="unsupported") from exc

        ctx.progress("quantizing", 0.5)
        quantize(output, reduce_range)
        ctx.progress("quantizing", 0.6)
        reference = [float_check(b) for b in checks]
        switched, notes = _retry_if_collapsed(ctx, quantize, output, scratch, reference, checks, summary)
        reduce_range, warnings = reduce_range or switched, warnings + notes

        delivered = deliver.checked_or_per_tensor(
            ctx, output, "as calibrated",
            lambda cfg, kept, path: quantize(path, reduce_range, frozenset(kept), dataclasses.replace(ctx, config=cfg)),
            checks[0], scratch=scratch, full_check=normalized.full_check, reference=reference[0])
        warnings += delivered.warnings
        excluded |= delivered.kept_float

        chosen_config = dataclasses.replace(ctx, config=delivered.variant.options["config"])
        ctx.progress("quantizing", 0.62)
        excluded |= _keep_sensitive_float(ctx, model, nodes, output, scratch, reference, checks,
                                          lambda kept, path: quantize(path, reduce_range, frozenset(kept),
                                                                      chosen_config), summary, warnings)
        ctx.progress("quantizing", 0.65)
        first, pruned, kept_for_speed = speed.without_float_islands(
            ctx, lambda kept, path: quantize(path, reduce_range, frozenset(kept), chosen_config), output, scratch,
            checks[0], full_check=normalized.full_check)
        candidates = {"as quantized": output, **({"float islands kept float": pruned} if pruned else {})}
        chosen, timed, float_ms = speed.rank(ctx, model_path, candidates, checks, reference)
        if chosen.path != output:
            shutil.move(chosen.path, output)
            excluded |= kept_for_speed
            warnings.append(f"{len(kept_for_speed)} node(s) stayed float where onnxruntime has no int8 kernel "
                            f"for them ({', '.join(sorted(set(first.float_islands.values())))}): their Q/DQ "
                            f"pairs only added work ({chosen.speedup:.2f}x float instead of "
                            f"{timed[0].speedup:.2f}x)")
        summary["kernels"] = {"as_quantized": first.summary(), "candidates": [
            {"label": t.label, "ms_p50": t.ms, "speedup": t.speedup, "cosine": t.cosine} for t in timed],
            "float_ms_p50": float_ms, "chosen": chosen.label,
            "kept_float_for_speed": sorted(kept_for_speed) if chosen.path == pruned else []}

        ctx.progress("quantizing", 0.67)
        quantized = onnx.load(str(output))
        sqnr = static_layers.layer_sqnr(ctx, model, quantized, nodes, checks[:8], scratch)
        integer = {n.node for n, row in zip(nodes, static_layers.layer_table(nodes, quantized, sqnr), strict=True)
                   if row["weight_dtype"] != "float32"}
        sensed = onnx_sensitivity.analyse(
            ctx, output=output, model_path=model_path, nodes=nodes, quantized=integer, samples=samples, sqnr=sqnr,
            requantize=lambda kept, path: quantize(path, reduce_range, kept, chosen_config), scratch=scratch)
        if sensed.kept:  # the target kept layers float: the delivered file changed
            excluded |= sensed.kept
            quantized = onnx.load(str(output))
            sqnr = static_layers.layer_sqnr(ctx, model, quantized, nodes, checks[:8], scratch)
        ctx.progress("quantizing", 0.7)
    quantize_s = time.monotonic() - started

    layers = static_layers.layer_table(nodes, quantized, sqnr)
    warnings += static_layers.coverage_warnings(model, quantized, layers, by_config)
    metrics = onnx_common.measure_files(ctx, model_path, output, samples, original_bytes=original_bytes,
                                        layers=layers, warnings=warnings)
    if note := speed.slower_than_float_warning(metrics["latency"]["speedup"], chosen, timed):
        metrics["warnings"].append(note)
    metrics["sensitivity"] = sensed.report
    if sensed.target is not None:
        metrics["target"] = sensed.target
    summary.update({
        "pre_processed": normalized.pre_process, "format": "QDQ", "calibration_method": method,
        "opset": {"upload": normalized.original_opset, "quantized": normalized.opset},
        "constants_folded": normalized.folded_constants, "variant": delivered.variant.label,
        "kept_float_invalid": sorted(delivered.kept_float),
        "calibration_samples": len(calibration), "activation_type": "uint8",
        "weight_type": "int8" if config.symmetric else "uint8",
        "per_channel": delivered.variant.options["config"].granularity == "per_channel",
        "reduce_range": reduce_range, "transformer_like": transformer,
        "activation_matmuls_float": len(attention),
        "op_types": op_types if transformer else "all that onnxruntime's QDQ quantizer supports",
        "lstms_dynamic_int8": lstms, "non_finite_tensors": infinite,
        "excluded_by_config": [n.layer for n in nodes if n.node in by_config],
        "kept_float_for_range": sorted(kept_for_range), "layer_sqnr": static_layers.SQNR_NOTE,
        "kept_float_mixed_range_joins": joins, "kept_float_for_scale": sorted(kept_for_scale),
        "quantize_s": round(quantize_s, 3),
    })
    return QuantizeResult(
        artifacts=[ArtifactFile(kind="model", path=output, filename=output.name, format="onnx")],
        metrics=metrics,
        report={"versions": report.runtime_versions(), "host": host, "onnx_static": summary},
        error=sensed.error,
    )
