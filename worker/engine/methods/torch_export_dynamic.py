"""torch.export dynamic int8: PT2E (X86InductorQuantizer, dynamic) on Linear, lowered to int8 matmuls."""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import TYPE_CHECKING, Any

from worker.engine import evaluate, report
from worker.engine.formats import torch_export as pt2_format
from worker.engine.types import ArtifactFile, EngineError, QuantizeResult, TensorSpec

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import torch

    from worker.engine import JobContext
    from worker.engine.config import DynamicConfig

EXAMPLE_BATCH = 2  # 0/1 would specialize the batch dimension on re-export
# aten ops whose weights PT2E dynamic leaves float here, by the name users know them by
_FLOAT_OPS = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN", "embedding": "Embedding",
              "embedding_bag": "EmbeddingBag", "_embedding_bag": "EmbeddingBag", "conv1d": "Conv1d",
              "conv2d": "Conv2d", "conv3d": "Conv3d", "convolution": "Conv", "conv_transpose1d": "ConvTranspose1d",
              "conv_transpose2d": "ConvTranspose2d"}


def _weight_layers(gm: torch.fx.GraphModule) -> list[tuple[str, str, Any]]:
    """(module path, op name, node) for each Linear and each weight op that stays float, graph order."""
    from worker.engine.methods.pt2e_lowering import module_path

    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not hasattr(node.target, "_schema"):
            continue
        base = node.target._schema.name.split("::")[-1]
        if base == "linear" or base in _FLOAT_OPS:
            path, kind = module_path(node)
            found.append((path, "Linear" if base == "linear" else _FLOAT_OPS[base], node))
    return found


def _quantizer(config: DynamicConfig, excluded: set[str]):  # noqa: ANN202 - torchao Quantizer
    import torch
    from torchao.quantization.pt2e.observer import MinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec
    from torchao.quantization.pt2e.quantizer.composable_quantizer import ComposableQuantizer
    from torchao.quantization.pt2e.quantizer.embedding_quantizer import EmbeddingQuantizer
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from worker.engine.methods.pt2e_lowering import module_path

    qconfig = get_default_x86_inductor_quantization_config(is_dynamic=True, is_qat=False)
    if config.granularity == "per_tensor":
        qconfig = dataclasses.replace(qconfig, weight=QuantizationSpec(
            dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric,
            is_dynamic=False, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12)))
    linears = X86InductorQuantizer()
    # Linear only, not set_global: dynamic convolutions have no int8 kernel outside Inductor (and
    # ran 4-5x slower than float in ONNX, ENGINE.md); the global recipe would also wrap pooling in Q/DQ.
    linears.set_module_type_qconfig(torch.nn.Linear, qconfig)
    for name in sorted(excluded):
        linears.set_module_name_qconfig(name, None)

    class Embeddings(EmbeddingQuantizer):
        """torchao's weight-only uint8 embedding recipe, minus the layers the user excluded."""

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            super().annotate(model)
            for node in model.graph.nodes:
                if module_path(node)[0] in excluded:
                    node.meta.pop("quantization_annotation", None)
            return model

    return ComposableQuantizer([Embeddings(), linears])


def _example_args(program: torch.export.ExportedProgram, specs: list[TensorSpec]) -> tuple[tuple, tuple]:
    """Small, fresh (cloned, never a view) example inputs and matching dynamic_shapes for re-export."""
    import torch
    from torch.export import Dim

    dims: dict[str, Any] = {}
    args, shapes = [], []
    ranges = {str(sym): rng for sym, rng in program.range_constraints.items()}
    for spec in specs:
        sizes, dynamic = [], {}
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                sizes.append(dim)
                continue
            rng = ranges.get(dim)
            lower = int(rng.lower) if rng is not None and rng.lower.is_finite else 1
            upper = int(rng.upper) if rng is not None and rng.upper.is_finite else None
            if dim not in dims:
                # the original's own range, so the program still takes what the upload took (batch 1 too);
                # a derived dimension (e.g. 2*s0) has no range of its own: export works it out
                dims[dim] = Dim(dim, min=max(lower, 1), max=upper) if rng is not None else Dim.AUTO
            size = EXAMPLE_BATCH if upper is None else min(max(EXAMPLE_BATCH, lower), upper)
            sizes.append(max(size, lower))
            dynamic[axis] = dims[dim]
        dtype = getattr(torch, spec.dtype)
        tensor = torch.randn(sizes).to(dtype) if dtype.is_floating_point else torch.zeros(sizes, dtype=dtype)
        args.append(tensor.clone())
        shapes.append(dynamic or None)
    return tuple(args), tuple(shapes)


def _quantize(program: torch.export.ExportedProgram, specs: list[TensorSpec], config: DynamicConfig,
              excluded: set[str]) -> tuple[torch.export.ExportedProgram, list, torch.fx.GraphModule]:
    """The exported int8 program, what was lowered, and the lowered module it was exported from."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from worker.engine.methods.pt2e_lowering import drop_unused, lower_dynamic_linears, lower_embeddings

    args, dynamic_shapes = _example_args(program, specs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchao\..*")
        prepared = prepare_pt2e(program.module(), _quantizer(config, excluded))
        with torch.no_grad():
            prepared(*args)  # runs the observers once; dynamic activations need no calibration data
        converted = convert_pt2e(prepared)
    lowered = lower_dynamic_linears(converted) + lower_embeddings(converted)
    drop_unused(converted)
    with torch.no_grad():
        result = torch.export.export(converted, args, dynamic_shapes=dynamic_shapes)
    result.example_inputs = None  # nothing pickled in the artifact: its sample-inputs member stays empty
    _strip_metadata(result)
    return result, lowered, converted


def _strip_metadata(program: torch.export.ExportedProgram) -> None:
    """Drop per-node provenance (stack traces, pass history): on a small model its JSON outweighed the
    int8 weights. The module path stays on the int8 matmuls, so the artifact still names its layers."""
    import torch

    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.target is torch.ops.aten._int_mm.default else None
        for key in ("stack_trace", "from_node", "torch_fn", "source_fn_stack", "nn_module_stack"):
            node.meta.pop(key, None)
        if stack:
            node.meta["nn_module_stack"] = stack


def _coverage_notes(found: list[tuple[str, str, Any]], int8_paths: set[str], excluded: set[str]) -> list[str]:
    """Plain words for every weight layer that stayed float, and why."""
    notes = []
    missed = sorted({p for p, kind, _ in found if kind in ("Linear", "Embedding")} - int8_paths - excluded)
    if missed:
        notes.append(f"{len(missed)} Linear/Embedding layer(s) stayed float because PT2E did not annotate "
                     f"them: {', '.join(missed[:10])}")
    recurrent = sorted({p for p, kind, _ in found if kind in ("LSTM", "GRU", "RNN")})
    if recurrent:
        notes.append(f"{len(recurrent)} recurrent layer(s) stayed float ({', '.join(recurrent[:10])}): PT2E "
                     "has no dynamic recipe for LSTM/GRU, and a .pt2 holds a graph, not the eager modules "
                     "torch.ao's quantize_dynamic rewrites")
    convs = sorted({p for p, kind, _ in found if kind.startswith("Conv")})
    if convs:
        notes.append(f"{len(convs)} convolution(s) stayed float ({', '.join(convs[:10])}): dynamic int8 "
                     "convolutions have no fast kernel on CPU; use method 'static' for convolutional models")
    other = sorted({f"{p} ({kind})" for p, kind, _ in found if kind == "EmbeddingBag"})
    if other:
        notes.append(f"stayed float: {', '.join(other[:10])}")
    return notes


def measure_saved(ctx: JobContext, quantized: torch.export.ExportedProgram, output: Path,
                  float_module: torch.nn.Module, lowered_module: torch.nn.Module, found: list,
                  dtypes: Callable[[str, str], tuple[str, str]], specs: list[TensorSpec],
                  samples: evaluate.Samples, runtime: str, notes: list[str]) -> dict:
    """Save the program, reload it, and measure it against the float module, with one row per layer.

    Shared by the dynamic and weight-only methods; dtypes(path, kind) gives (weight, activation) dtypes."""
    from worker.engine.methods import pt2_layer_sqnr

    ctx.progress("packaging", 0.55)
    names = [s.name for s in specs]
    quant_runner, original_bytes, quantized_bytes = pt2_format.save_and_reload(quantized, output, ctx.model_path,
                                                                               names, ctx.log)
    float_runner = pt2_format.runner_for_module(float_module, names, threads=1)
    layers, seen = [], set()
    for path, kind, _ in found:
        if path not in seen:
            seen.add(path)
            weight, activation = dtypes(path, kind)
            layers.append({"name": path, "op": kind, "weight_dtype": weight, "activation_dtype": activation,
                           "sqnr_db": None})
    pt2_layer_sqnr.fill(ctx, layers, float_module, lowered_module, specs, samples)
    return evaluate.measure(ctx, float_runner, quant_runner, samples, original_bytes=original_bytes,
                            quantized_bytes=quantized_bytes, runtime=runtime, layers=layers, extra_warnings=notes)


def run(ctx: JobContext) -> QuantizeResult:
    """Quantize a `.pt2` program's Linear layers to int8 weights with int8 activations computed per call."""
    import torch


    config: DynamicConfig = ctx.config
    ctx.progress("loading", 0.02)
    program = pt2_format.load_program(ctx.model_path, scratch=ctx.work_dir)
    specs = pt2_format.input_specs(program)
    samples = evaluate.load_samples(ctx, specs)  # fail on a bad dataset before any work

    float_module = program.module()
    found = _weight_layers(float_module)
    candidates = sorted({path for path, kind, _ in found if kind in ("Linear", "Embedding")})
    regexes = [re.compile(p) for p in config.exclude]
    excluded = {p for p in candidates if any(r.search(p) for r in regexes)}
    notes: list[str] = []
    if not config.symmetric:
        notes.append("asymmetric weights are not offered by the x86 int8 kernels; Linear weights were "
                     "quantized symmetrically")

    ctx.progress("quantizing", 0.10)
    try:
        quantized, lowered, lowered_module = _quantize(program, specs, config, excluded)
    except EngineError:
        raise
    except Exception as exc:  # PT2E and re-export raise many types on graphs they cannot handle
        raise EngineError(f"PT2E dynamic quantization failed on this program: {type(exc).__name__}: "
                          f"{str(exc)[:500]}", code="unsupported") from None
    int8_paths = {item.module_path for item in lowered}
    if not int8_paths:
        raise EngineError("dynamic quantization found no Linear or Embedding layer to quantize in this "
                          "program", code="nothing_to_quantize")
    notes += _coverage_notes(found, int8_paths, excluded)
    output = ctx.work_dir / f"{ctx.model_name}.int8.pt2"

    def dtypes(path: str, kind: str) -> tuple[str, str]:
        if path not in int8_paths or kind not in ("Linear", "Embedding"):
            return "float32", "float32"
        return ("int8", "int8") if kind == "Linear" else ("uint8", "float32")

    metrics = measure_saved(ctx, quantized, output, float_module, lowered_module, found, dtypes, specs, samples,
                            f"torch {torch.__version__} (eager)", notes)
    ctx.progress("done", 1.0)
    return QuantizeResult(
        artifacts=[ArtifactFile(kind="model", path=output, filename=output.name, format="torch_export")],
        metrics=metrics,
        report={"versions": report.runtime_versions(), "host": report.host_info(),
                "torch_export_dynamic": {"quantizers": ["X86InductorQuantizer(is_dynamic=True) on Linear",
                                                        "EmbeddingQuantizer (weight-only uint8)"],
                                         "lowering": "Linear: aten._int_mm with int8 activations per row; "
                                                     "Embedding: uint8 rows dequantized after lookup",
                                         "kept_float": sorted(excluded)}},
    )
