"""torch.export dynamic int8: PT2E (X86InductorQuantizer, dynamic) on Linear, lowered to int8 matmuls."""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, Any

from worker.engine import evaluate, report
from worker.engine.errors import EngineError
from worker.engine.torch_export import common as pt2_common
from worker.engine.torch_export import sensitivity as pt2_sensitivity
from worker.engine.torch_export.deliver import measure_saved
from worker.engine.torch_export.graph import example_args, module_path, reexport, weight_layers
from worker.engine.torch_export.lowering import lower_dynamic_linears, lower_embeddings
from worker.engine.types import ArtifactFile, QuantizeResult, TensorSpec

if TYPE_CHECKING:
    import torch

    from worker.engine.config import DynamicConfig
    from worker.engine.context import JobContext


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


def _convert(program: torch.export.ExportedProgram, specs: list[TensorSpec], config: DynamicConfig,
             excluded: set[str]) -> tuple[list, torch.fx.GraphModule]:
    """What was lowered to int8, and the lowered module (eager; re-exported only for the artifact)."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    args, _ = example_args(program, specs)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchao\..*")
            prepared = prepare_pt2e(program.module(), _quantizer(config, excluded))
            with torch.no_grad():
                prepared(*args)  # runs the observers once; dynamic activations need no calibration data
            converted = convert_pt2e(prepared)
        lowered = lower_dynamic_linears(converted) + lower_embeddings(converted)
        converted.recompile()  # the graph edits reach forward() only now; the probes run it
        return lowered, converted
    except EngineError:
        raise
    except Exception as exc:  # PT2E raises many types on graphs it cannot handle
        raise EngineError(f"PT2E dynamic quantization failed on this program: {type(exc).__name__}: "
                          f"{str(exc)[:500]}", code="unsupported") from exc


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


def run(ctx: JobContext) -> QuantizeResult:
    """Quantize a `.pt2` program's Linear layers to int8 weights with int8 activations computed per call."""
    import torch

    config: DynamicConfig = ctx.config
    ctx.progress("loading", 0.02)
    program = pt2_common.load_program(ctx.model_path, scratch=ctx.work_dir)
    specs = pt2_common.input_specs(program)
    samples = evaluate.load_samples(ctx, specs)  # fail on a bad dataset before any work

    float_module = program.module()
    found = weight_layers(float_module)
    candidates = sorted({path for path, kind, _ in found if kind in ("Linear", "Embedding")})
    excluded = {p for p in candidates if config.excludes(p)}
    notes: list[str] = []
    if not config.symmetric:
        notes.append("asymmetric weights are not offered by the x86 int8 kernels; Linear weights were "
                     "quantized symmetrically")

    ctx.progress("quantizing", 0.10)
    lowered, lowered_module = _convert(program, specs, config, excluded)
    if not lowered:
        raise EngineError("dynamic quantization found no Linear or Embedding layer to quantize in this "
                          "program", code="nothing_to_quantize")
    output = ctx.work_dir / f"{ctx.model_name}.int8.pt2"
    sensed = pt2_sensitivity.analyse(
        ctx, float_module=float_module, plain=lowered_module, specs=specs, samples=samples, span=(0.15, 0.45),
        build=lambda kept: _convert(program, specs, config, excluded | kept)[1],
        candidates=sorted({item.module_path for item in lowered}),
        plain_bytes=lambda gm: pt2_sensitivity.saved_bytes(gm, program, specs, output))
    if sensed.kept:  # the target keeps these float: the same build the search measured, delivered
        excluded |= set(sensed.kept)
        lowered, lowered_module = _convert(program, specs, config, excluded)
    try:
        quantized, _ = reexport(lowered_module, program, specs)
    except Exception as exc:  # re-export raises many types on graphs it cannot handle
        raise EngineError(f"PT2E dynamic quantization failed on this program: {type(exc).__name__}: "
                          f"{str(exc)[:500]}", code="unsupported") from exc
    int8_paths = {item.module_path for item in lowered}
    notes += _coverage_notes(found, int8_paths, excluded)

    def dtypes(path: str, kind: str) -> tuple[str, str]:
        if path not in int8_paths or kind not in ("Linear", "Embedding"):
            return "float32", "float32"
        return ("int8", "int8") if kind == "Linear" else ("uint8", "float32")

    metrics = measure_saved(ctx, quantized, output, float_module, lowered_module, found, dtypes, specs, samples,
                            f"torch {torch.__version__} (eager)", notes)
    return pt2_sensitivity.attach(QuantizeResult(
        artifacts=[ArtifactFile(kind="model", path=output, filename=output.name, format="torch_export")],
        metrics=metrics,
        report={"versions": report.runtime_versions(), "host": report.host_info(),
                "torch_export_dynamic": {"quantizers": ["X86InductorQuantizer(is_dynamic=True) on Linear",
                                                        "EmbeddingQuantizer (weight-only uint8)"],
                                         "lowering": "Linear: aten._int_mm with int8 activations per row; "
                                                     "Embedding: uint8 rows dequantized after lookup",
                                         "kept_float": sorted(excluded)}},
    ), sensed)
