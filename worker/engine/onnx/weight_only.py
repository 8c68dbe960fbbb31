"""ONNX weight-only int4/int8: onnxruntime's MatMulNBits quantizer after a Gemm -> MatMul rewrite, measured."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import evaluate, report
from worker.engine import metrics as m
from worker.engine.errors import EngineError
from worker.engine.onnx import common as onnx_common
from worker.engine.onnx import deliver, normalize, weight_only_budget, weight_only_mixed, weight_only_target
from worker.engine.onnx import rewrite as onnx_rewrite
from worker.engine.types import ArtifactFile, QuantizeResult

if TYPE_CHECKING:
    import onnx

    from worker.engine.config import WeightOnlyConfig
    from worker.engine.context import JobContext

# int8 compute inside MatMulNBits: without it the int4 model ran slower than float (ENGINE.md), and the
# 8-bit one 0.27x; with it, 1.2-2.8x faster.
ACCURACY_LEVEL = 4
GPTQ_SAMPLES = 128
SQNR_SAMPLES = 8
INT4_GATHER_OPSET = 21
SQNR_NOTE = "cumulative: each quantized layer's output in the quantized model against the float model's"


def _check_supported(ctx: JobContext) -> None:
    """Refuse, before any work, what onnxruntime 1.32 cannot do on CPU, saying what to choose instead."""
    config: WeightOnlyConfig = ctx.config
    if config.group_size == -1 or config.granularity == "per_channel":
        raise EngineError("weight_only on ONNX quantizes in blocks along K (MatMulNBits): per-channel "
                          "(group_size -1) is not available; choose group_size 32, 64 or 128, or method "
                          "'dynamic' for per-channel int8", code="unsupported")
    if config.algorithm == "awq":
        raise EngineError("algorithm 'awq' is not available for ONNX models on CPU (onnxruntime's only AWQ "
                          "path needs NVIDIA ModelOpt and a GPU); use 'gptq', 'hqq' or 'rtn'", code="unsupported")
    if config.dtype == "int8" and config.algorithm != "rtn":
        raise EngineError(f"algorithm {config.algorithm!r} is int4-only in onnxruntime (8-bit MatMulNBits has "
                          "no CPU kernel for its float zero points); use dtype int4, or algorithm 'rtn' for "
                          "int8", code="unsupported")
    if config.bits == "auto" and config.target is not None:
        raise EngineError("bits 'auto' spends a size or latency budget and a target spends precision until it holds: "
                          "give one of them (bits 4 with a target escalates int4 -> int8 -> float)",
                          code="unsupported")
    if config.algorithm == "gptq" and ctx.calibration_path is None:
        raise EngineError("algorithm 'gptq' needs a calibration dataset (calibration_dataset_id)",
                          code="dataset_mismatch")


def _nbits() -> Any:
    """The quantizer module; importing it calls logging.basicConfig(level=INFO) on the root logger, which
    would print a line per layer into every later log, so the root logger is put back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    for handler in root.handlers[len(handlers):]:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer


def _rtn(model: onnx.ModelProto, config: WeightOnlyConfig, bits: int, op_types: tuple[str, ...],
         excluded: set[str]) -> onnx.ModelProto:
    nbits = _nbits()
    algo = nbits.DefaultWeightOnlyQuantConfig(
        block_size=config.group_size, is_symmetric=config.symmetric, accuracy_level=ACCURACY_LEVEL,
        op_types_to_quantize=op_types, bits=bits)
    quantizer = nbits.MatMulNBitsQuantizer(model, bits=bits, block_size=config.group_size,
                                           is_symmetric=config.symmetric, accuracy_level=ACCURACY_LEVEL,
                                           nodes_to_exclude=sorted(excluded), algo_config=algo)
    quantizer.process()
    return quantizer.model.model


def _hqq(model: onnx.ModelProto, config: WeightOnlyConfig, excluded: set[str]) -> onnx.ModelProto:
    nbits = _nbits()
    # HQQ in onnxruntime 1.32 has no Gather path; the embedding is rounded to nearest afterwards
    algo = nbits.HQQWeightOnlyQuantConfig(block_size=config.group_size, bits=4, op_types_to_quantize=("MatMul",))
    quantizer = nbits.MatMulNBitsQuantizer(model, nodes_to_exclude=sorted(excluded), algo_config=algo)
    quantizer.process()
    return quantizer.model.model


def _gptq(model: onnx.ModelProto, config: WeightOnlyConfig, excluded: set[str],
          batches: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """onnxruntime's GPTQ, called directly: MatMulNBitsQuantizer drops nodes_to_exclude on this path,
    and the per-node config it builds is the one place an excluded layer can be marked fp32."""
    _nbits()  # the same root-logger repair: gptq lives behind the same import
    from onnxruntime.quantization.neural_compressor import gptq_quantize

    weights = {t.name for t in model.graph.initializer}
    scheme = "sym" if config.symmetric else "asym"
    node_config: dict[str, Any] = {
        n.name: "fp32" if n.name in excluded else {"bits": 4, "group_size": config.group_size, "scheme": scheme}
        for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights}
    with contextlib.redirect_stdout(io.StringIO()):  # it draws a progress bar on stdout
        quantized = gptq_quantize(model, [(b, None) for b in batches], node_config, num_bits=4,
                                  group_size=config.group_size, scheme=scheme, n_samples=-1,
                                  accuracy_level=ACCURACY_LEVEL)
    return quantized.model


def _int8_gather(src: Path, dst: Path, config: WeightOnlyConfig, excluded: set[str] | list[str]) -> None:
    """Embedding tables to 8 bits: MatMulNBits' Gather path is 4-bit only, and the dynamic quantizer's
    Gather only stores the table as integers (asymmetric uint8 in 1.32), which is what weight-only means."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # it logs "Please consider to run pre-processing" on the root logger at every call; weight-only needs none
    def quiet(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")

    logging.getLogger().addFilter(quiet)
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["Gather"], nodes_to_exclude=sorted(excluded),
                         weight_type=QuantType.QInt8 if config.symmetric else QuantType.QUInt8)
    finally:
        logging.getLogger().removeFilter(quiet)


def _quantize(ctx: JobContext, model: onnx.ModelProto, excluded: set[str], scratch: Path,
              batches: list[dict[str, np.ndarray]], *, gather: bool,
              promoted: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """MatMul weights to MatMulNBits; embedding tables (Gather) too when `gather` (int4 needs opset 21). At int4,
    the `promoted` nodes get 8 bits instead (weight_only_mixed): a second, 8-bit pass of the same quantizer."""
    import onnx

    config: WeightOnlyConfig = ctx.config
    if config.dtype == "int4" and promoted:
        tables = {n.name for n in model.graph.node if n.op_type == "Gather"}
        if gather and promoted & tables:
            onnx.save_model(model, str(scratch / "promote_src.onnx"))
            _int8_gather(scratch / "promote_src.onnx", scratch / "promote_gather.onnx", config,
                         sorted(tables - promoted))
            model = onnx.load(str(scratch / "promote_gather.onnx"))
        model = _quantize(ctx, model, excluded | promoted, scratch, batches, gather=gather)
        return _rtn(model, config, 8, ("MatMul",), excluded) if promoted - tables else model
    if config.dtype == "int8":
        if not gather:
            return _rtn(model, config, 8, ("MatMul",), excluded)
        src = scratch / "rewritten.onnx"
        onnx.save_model(model, str(src))
        _int8_gather(src, scratch / "gather_int8.onnx", config, excluded)
        return _rtn(onnx.load(str(scratch / "gather_int8.onnx")), config, 8, ("MatMul",), excluded)
    if config.algorithm == "rtn":
        return _rtn(model, config, 4, ("MatMul", "Gather") if gather else ("MatMul",), excluded)
    model = _hqq(model, config, excluded) if config.algorithm == "hqq" else _gptq(model, config, excluded, batches)
    return _rtn(model, config, 4, ("Gather",), excluded) if gather else model


def _layers(nodes: list[onnx_common.WeightNode], original: onnx.ModelProto, quantized: onnx.ModelProto,
            sqnr: dict[str, float]) -> list[dict]:
    """Each weight node's counterpart is found by its output tensor, which the quantizers keep."""
    producer = {o: n for n in quantized.graph.node for o in n.output}
    outputs = {n.name: n.output[0] for n in original.graph.node if n.name and n.output}
    integer = {t.name: t.data_type for t in quantized.graph.initializer if t.data_type in (2, 3)}
    table = []
    for n in nodes:
        out = outputs.get(n.node, "")
        node = next((producer[t] for t in (out, f"{out}_MatMul", f"{out}_pre_reshape", f"{out}_MatMul_pre_reshape")
                     if t in producer and producer[t].op_type in ("MatMulNBits", "GatherBlockQuantized",
                                                                  "DequantizeLinear")), None)
        weight, activation = "float32", "float32"
        if node is not None and node.op_type == "DequantizeLinear":  # the dynamic quantizer's int8 Gather
            gather = producer.get(node.input[0])
            if gather is not None and gather.op_type == "Gather" and gather.input[0] in integer:
                weight = "int8" if integer[gather.input[0]] == 3 else "uint8"
        elif node is not None:
            attrs = {a.name: a.i for a in node.attribute}
            # both ops take zero points as input 3: present = asymmetric (unsigned), absent = symmetric
            signed = len(node.input) < 4 or not node.input[3]
            weight = f"{'' if signed else 'u'}int{attrs.get('bits', 4)}"
            if node.op_type == "MatMulNBits" and attrs.get("accuracy_level") == ACCURACY_LEVEL:
                activation = "int8"  # accuracy_level 4 quantizes activations per block inside the kernel
        table.append({"name": n.layer, "op": n.op, "weight_dtype": weight, "activation_dtype": activation,
                      "sqnr_db": round(sqnr[n.node], 2) if weight != "float32" and n.node in sqnr else None})
    return table


def _layer_sqnr(ctx: JobContext, original: onnx.ModelProto, quantized: onnx.ModelProto,
                nodes: list[onnx_common.WeightNode], batches: list[dict[str, np.ndarray]],
                scratch: Path) -> dict[str, float]:
    outputs = {n.name: n.output[0] for n in original.graph.node if n.name and n.output}
    present = {o for n in quantized.graph.node for o in n.output}
    pairs = {n.node: outputs[n.node] for n in nodes if outputs.get(n.node) in present}
    if not pairs:
        return {}
    try:
        f_values = onnx_common.capture(original, list(pairs.values()), batches, scratch / "f.onnx")
        q_values = onnx_common.capture(quantized, list(pairs.values()), batches, scratch / "q.onnx")
    except Exception as exc:  # only a diagnostic: the job goes on without per-layer numbers
        ctx.log("warning", f"per-layer error not measured: {exc}")
        return {}
    return {node: m.sqnr_db(f_values[t], q_values[t]) for node, t in pairs.items()}


def run(ctx: JobContext) -> QuantizeResult:
    """Quantize an ONNX model's MatMul (and Gemm) weights and embedding tables to int4/int8 blocks."""
    import onnx

    config: WeightOnlyConfig = ctx.config
    started = time.monotonic()
    ctx.progress("loading", 0.02)
    _check_supported(ctx)
    original = onnx_common.load(ctx.model_path)
    info = onnx_common.describe(original)
    samples = evaluate.load_samples(ctx, info.inputs)  # fail on a bad dataset before any work
    # and on a target this data cannot measure (accuracy without labels)
    measure = weight_only_target.Measure.of(config.target, ctx.model_path.resolve(), samples)
    calibration = (evaluate.load_npz(Path(ctx.calibration_path), info.inputs, GPTQ_SAMPLES, "calibration").batches
                   if ctx.calibration_path is not None else samples.batches)
    model_path = ctx.model_path.resolve()
    output = ctx.work_dir.resolve() / f"{ctx.model_name}.{config.dtype}.onnx"
    original_bytes = model_path.stat().st_size
    known = {n.name: onnx_common.layer_name(n) for n in original.graph.node if n.name}
    has_gather = any(n.op_type == "Gather" for n in original.graph.node)
    warnings: list[str] = []

    with onnx_common.scratch_dir(ctx.work_dir.resolve()) as scratch:
        # int4 tables are GatherBlockQuantized with int4 DequantizeLinear: opset 21, which the quantizer
        # asserts without converting the graph (an opset-17 ReduceMean then made the model invalid)
        int4_gather = config.dtype == "int4" and has_gather
        prepared = normalize.prepare(model_path, scratch, min_opset=INT4_GATHER_OPSET if int4_gather else 0,
                                     log=ctx.log, feeds=samples.batches[0], optimize=False)
        warnings += prepared.warnings
        normalized = onnx.load(str(prepared.path))
        # layer names from the upload (Constant weights are only weights once folded into initializers)
        nodes = [dataclasses.replace(n, layer=known.get(n.node, n.layer))
                 for n in onnx_common.weight_nodes(normalized)]
        excluded = onnx_common.excluded_nodes(nodes, config)
        del original
        float_model = onnx.ModelProto()  # the layer table reads node names before the Gemm rewrite
        float_model.CopyFrom(normalized)
        rewritten, gemms_left = onnx_rewrite.gemm_to_matmul(normalized)
        if gemms_left:
            warnings.append(f"{gemms_left} Gemm layer(s) stayed float: only Gemms with a constant weight, "
                            "alpha = beta = 1 and no transA can become MatMulNBits")
        variants = [deliver.Variant(f"{config.algorithm} {config.dtype} MatMul + Gather", {"gather": True}),
                    deliver.Variant(f"{config.algorithm} {config.dtype} MatMul only", {"gather": False},
                                    gives_up="embedding tables (Gather) stay float")]
        if int4_gather and prepared.opset < INT4_GATHER_OPSET:
            variants = variants[1:]
            warnings.append(f"embedding tables (Gather) stayed float: int4 tables need opset {INT4_GATHER_OPSET} "
                            f"and this model stays at opset {prepared.opset}")
        elif not has_gather:
            variants = variants[1:]
        excluded_names = excluded | {f"{n}_MatMul" for n in excluded}  # what the Gemm rewrite names them

        numbering = itertools.count()

        def build(variant: deliver.Variant, kept: set[str], promoted: frozenset[str] = frozenset()) -> Path:
            model = onnx.ModelProto()
            model.CopyFrom(normalized)
            try:
                quantized = _quantize(ctx, model, excluded_names | kept, scratch, calibration,
                                      gather=variant.options["gather"], promoted=promoted)
            except EngineError:
                raise
            except Exception as exc:  # onnxruntime's quantizers raise whatever their graph walk hits
                raise EngineError(f"onnxruntime's {config.algorithm} weight-only quantizer failed on this model: "
                                  f"{type(exc).__name__}: {exc}", code="unsupported") from exc
            path = scratch / f"candidate_{next(numbering)}.onnx"  # not a count of files: the search removes some
            onnx.save_model(quantized, str(path))
            return path

        ctx.progress("quantizing", 0.15)
        chosen = deliver.first_valid(ctx, variants, build, samples.batches[0], full_check=prepared.full_check)
        warnings += chosen.warnings
        # int4 everywhere can lose too much (MiniLM: 0.947): the most sensitive layers then stay at 8 bits
        layer_names = {k: n.layer for n in nodes for k in (n.node, f"{n.node}_MatMul")}
        job = weight_only_target.Job(
            ctx, lambda kept, eight: build(chosen.variant, chosen.kept_float | kept, eight),
            weight_only_mixed.candidates(normalized, excluded_names | chosen.kept_float,
                                         gather=chosen.variant.options["gather"]),
            nodes, measure, 4 if config.dtype == "int4" else 8)
        if config.target is not None:  # the user's target replaces the fixed 0.99 below: int4 -> int8 -> float
            sensed = weight_only_target.checked(weight_only_target.target(job, chosen.path, calibration, model_path),
                                                samples.batches[0], prepared.full_check, warnings)
            mixed = sensed.promotion
            mixed.path = sensed.path
        else:
            # bits auto: the same probes, spent on the most faithful mix within the user's size/latency budget
            mix = weight_only_budget.apply if config.bits == "auto" else weight_only_mixed.apply
            mixed = mix(ctx, chosen, build, normalized, excluded_names, model_path=model_path, batches=calibration,
                        feed=samples.batches[0], full_check=prepared.full_check, layer_names=layer_names,
                        warnings=warnings)
            sensed = weight_only_target.sensitivity(job, mixed.path or chosen.path, frozenset(mixed.promoted),
                                                    mixed.gains)
        shutil.move(mixed.path or chosen.path, output)
        quantized = onnx.load(str(output))
        count = sum(1 for n in quantized.graph.node if n.op_type == "MatMulNBits")
        if not count:
            raise EngineError("weight_only found nothing to quantize: no MatMul or Gemm with a constant 2-D "
                              "weight became MatMulNBits", code="nothing_to_quantize")
        ctx.progress("quantizing", 0.6)
        sqnr = _layer_sqnr(ctx, float_model, quantized, nodes, calibration[:SQNR_SAMPLES], scratch)
    quantize_s = time.monotonic() - started

    layers = _layers(nodes, float_model, quantized, sqnr)
    metrics = onnx_common.measure_files(ctx, model_path, output, samples, original_bytes=original_bytes,
                                        layers=layers, warnings=warnings)
    if config.algorithm == "hqq" and metrics["latency"]["speedup"] < 1.0:
        # measured: HQQ 0.25x, rtn 1.2x on the same d256 encoder (HQQ writes float zero points)
        metrics["warnings"].append("HQQ stores float zero points, which onnxruntime's CPU MatMulNBits runs "
                                   "without its int8 path: algorithm 'rtn' is faster here")
    summary = {
        "bits": config.bits or (4 if config.dtype == "int4" else 8), "block_size": config.group_size,
        "symmetric": config.symmetric,
        "algorithm": config.algorithm, "accuracy_level": ACCURACY_LEVEL, "matmul_nbits_nodes": count,
        "gemm_rewritten": rewritten, "gemm_left_float": gemms_left,
        "embedding": ("float" if not chosen.variant.options["gather"] else "int4 GatherBlockQuantized"
                      if config.dtype == "int4" else "8-bit Gather from the dynamic quantizer (MatMulNBits' "
                                                     "Gather path is 4-bit only)"),
        "excluded_by_config": [n.layer for n in nodes if n.node in excluded],
        "kept_float_invalid": sorted(chosen.kept_float), "variant": chosen.variant.label,
        "kept_float_for_target": (sensed.target or {}).get("kept_float", []),
        "opset": {"upload": prepared.original_opset, "quantized": prepared.opset},
        "constants_folded": prepared.folded_constants,
        "kept_8bit_for_fidelity": [{"name": layer_names.get(n, n), "tuning_cosine_gain": round(mixed.gains[n], 5)
                                    if n in mixed.gains else None} for n in mixed.promoted],
        "tuning_cosine": {"all_4bit": round(mixed.before, 5), "delivered": round(mixed.after, 5),
                          "target": None if config.bits == "auto" else weight_only_mixed.TARGET_COSINE}
        if mixed.measured else None,
        "bits_auto": mixed.budget,
        "layer_sqnr": SQNR_NOTE, "quantize_s": round(quantize_s, 3),
    }
    metrics["sensitivity"] = sensed.report
    if sensed.target is not None:
        metrics["target"] = sensed.target
    return QuantizeResult(
        artifacts=[ArtifactFile(kind="model", path=output, filename=output.name, format="onnx")],
        metrics=metrics,
        report={"versions": report.runtime_versions(), "host": report.host_info(), "onnx_weight_only": summary},
        error=sensed.error,
    )
