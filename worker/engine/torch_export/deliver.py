"""Deliver a quantized torch.export program: save, reload and measure it (all methods), plus AOTI for PT2E static/QAT.

ENGINE.md: the converted program runs Q/DQ ops around float kernels in eager (0.52x float), and only
Inductor with freezing lowers them to int8 oneDNN kernels. So a job delivers both: the portable int8
program (loads with torch.export.load) and an AOTInductor package compiled with freezing for the
worker's CPU (runs fast with no compile step). Metrics follow the fast one; both go in the report.
The AOTInductor package is built in aoti.py.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops for load/save
from torch import fx

from worker.engine import evaluate, report
from worker.engine.torch_export import aoti
from worker.engine.torch_export import common as pt2_common
from worker.engine.torch_export import layer_sqnr as pt2_layer_sqnr
from worker.engine.torch_export.graph import WEIGHT_OPS, is_call, module_path, reexport, tensor_attr
from worker.engine.types import ArtifactFile, QuantizeResult, TensorSpec

if TYPE_CHECKING:
    from collections.abc import Callable

    from worker.engine.context import JobContext

LOAD_NOTE = ("the .pt2 uses torch's quantized_decomposed ops: `import torch.ao.quantization.fx._decomposed` "
             "(or torchao) before torch.export.load")
_QD = torch.ops.quantized_decomposed
SATURATION_GAP_DB = 6.0  # AOTI vs eager on the same int8 program: equal here (44 dB); a gap means kernel trouble


def layer_rows(gm: fx.GraphModule, bits: int) -> list[dict[str, Any]]:
    """The `layers` entries of every conv/linear in a converted graph: integer or float weights and inputs."""
    layers, seen = [], set()
    for node in gm.graph.nodes:
        if not is_call(node, *WEIGHT_OPS) or len(node.args) < 2:
            continue
        name = module_path(node)[0]
        if name in seen:
            continue
        seen.add(name)
        w, x = node.args[1], node.args[0]
        int_weight = is_call(w, _QD.dequantize_per_channel.default, _QD.dequantize_per_tensor.default)
        layers.append({"name": name, "op": WEIGHT_OPS[node.target],
                       "weight_dtype": (f"int{bits}" if int_weight else "float32"),
                       "activation_dtype": "uint8" if is_call(x, _QD.dequantize_per_tensor.default) else "float32",
                       "sqnr_db": None})
    return layers


def weights_per_channel(gm: fx.GraphModule) -> int:
    """Rewrite per-tensor int8 weights of conv/linear as per-channel with one repeated scale (same numbers).

    Why by hand: Inductor's freezing passes match only `dequantize_per_channel` weights when they lower
    to oneDNN int8 kernels; a per-tensor weight would stay a float conv dequantized on every call.
    """
    rewritten = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
                   torch.ops.aten.conv3d.default, torch.ops.aten.linear.default):
            continue
        dq = node.args[1]
        if not is_call(dq, _QD.dequantize_per_tensor.default) or not isinstance(dq.args[1], float):
            continue
        weight = dq.args[0]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            continue
        channels = int(tensor_attr(gm, weight).shape[0])
        scale_name, zero_name = f"_per_tensor_scale_{rewritten}", f"_per_tensor_zero_{rewritten}"
        gm.register_buffer(scale_name, torch.full((channels,), float(dq.args[1]), dtype=torch.float32))
        gm.register_buffer(zero_name, torch.full((channels,), int(dq.args[2]), dtype=torch.int64))
        with gm.graph.inserting_before(dq):
            scale, zero = gm.graph.get_attr(scale_name), gm.graph.get_attr(zero_name)
            new = gm.graph.call_function(_QD.dequantize_per_channel.default,
                                         (weight, scale, zero, 0, *dq.args[3:6]))
        new.meta = dict(dq.meta)
        dq.replace_all_uses_with(new)
        gm.graph.erase_node(dq)
        rewritten += 1
    gm.recompile()
    return rewritten


def _rescaled(ctx: JobContext, low: float, high: float) -> JobContext:
    """The context with measure()'s 0.80..0.98 progress mapped into low..high (for a second measurement)."""
    def progress(stage: str, fraction: float) -> None:
        ctx.progress(stage, low + (high - low) * min(max((fraction - 0.80) / 0.18, 0.0), 1.0))

    return dataclasses.replace(ctx, progress=progress)


def deliver(ctx: JobContext, *, float_program: torch.export.ExportedProgram, converted: fx.GraphModule,
            specs: list[TensorSpec], samples: evaluate.Samples, bits: int, method_key: str,
            notes: list[str], details: dict[str, Any]) -> QuantizeResult:
    """Save, compile, measure and describe; `details` goes into report[method_key]."""
    layers = layer_rows(converted, bits)
    pt2_layer_sqnr.fill(ctx, layers, float_program.module(), converted, specs, samples)  # before the rewrites
    details["per_tensor_weights_rewritten"] = weights_per_channel(converted)
    ctx.progress("packaging", 0.45)
    program, args = reexport(converted, float_program, specs)
    output = ctx.work_dir / f"{ctx.model_name}.int8.pt2"  # 4-bit weights are stored in int8 too
    pt2_common.save_program(program, output)
    original_bytes, quantized_bytes = Path(ctx.model_path).stat().st_size, output.stat().st_size
    tensors = {**program.state_dict, **program.constants}
    details["pt2"] = {"size_bytes": quantized_bytes, "ratio": round(quantized_bytes / original_bytes, 4),
                      "int8_bytes": sum(t.nbytes for t in tensors.values() if t.dtype == torch.int8),
                      "float_bytes": sum(t.nbytes for t in tensors.values() if t.is_floating_point()),
                      "load_note": LOAD_NOTE}
    ctx.log("info", f"saved {output.name}: {quantized_bytes} bytes ({quantized_bytes / original_bytes:.3f}x)")

    artifacts = [ArtifactFile(kind="model", path=output, filename=output.name, format="torch_export")]
    aoti_path = None
    if aoti.aoti_enabled():
        ctx.progress("packaging", 0.50)
        source, source_args, widened = aoti.aoti_program(converted, float_program, specs)
        aoti_path, seconds, error, config = aoti.compile_aoti(source, source_args, output.with_name(
            output.name.removesuffix(".pt2") + ".aoti.pt2"), ctx.work_dir)
        details["aoti"] = {"compile_s": round(seconds, 1), "error": error, "inductor_configs": config,
                           "widened_single_channel_convs": widened}
        if aoti_path is None:
            notes.append(f"the AOTInductor package could not be built here ({error}); only the portable .pt2 "
                         "is delivered, and it runs slower than a compiled one")
        else:
            details["aoti"]["size_bytes"] = aoti_path.stat().st_size
            artifacts.append(ArtifactFile(kind="compiled_model", path=aoti_path, filename=aoti_path.name,
                                          format="aoti_package"))
            ctx.log("info", f"compiled {aoti_path.name} in {seconds:.0f} s")
    else:
        details["aoti"] = {"skipped": f"{aoti.AOTI_ENV}=0"}
        notes.append(f"AOTInductor compilation is switched off ({aoti.AOTI_ENV}=0): only the portable .pt2 is "
                     "delivered; it runs Q/DQ ops around float kernels and is slower than a compiled package")

    names = [s.name for s in specs]
    float_runner = pt2_common.runner_for_module(float_program.module(), names, threads=1)
    with tempfile.TemporaryDirectory(dir=ctx.work_dir) as scratch:  # measure the saved file, not the object
        reloaded = pt2_common.load_program(output, scratch=Path(scratch), ours=True)
    eager_runner = pt2_common.runner_for_module(reloaded.module(), names, threads=1)
    eager_runtime = f"torch {torch.__version__} (eager .pt2, Q/DQ around float kernels)"
    common = {"original_bytes": original_bytes, "quantized_bytes": quantized_bytes, "layers": layers}
    if aoti_path is None:
        metrics = evaluate.measure(ctx, float_runner, eager_runner, samples, runtime=eager_runtime,
                                   extra_warnings=notes, **common)
        details["pt2"].update(latency=metrics["latency"], fidelity=metrics["fidelity"])
    else:
        eager = evaluate.measure(_rescaled(ctx, 0.60, 0.78), float_runner, eager_runner, samples,
                                 runtime=eager_runtime, **common)
        details["pt2"].update(latency=eager["latency"], fidelity=eager["fidelity"])
        aoti_model = torch._inductor.aoti_load_package(str(aoti_path))
        aoti_runner = pt2_common.runner_for_module(aoti_model, names, threads=1)
        eager_speedup = eager["latency"]["speedup"]
        if eager_speedup < 1.0:
            notes.append(f"the portable .pt2 runs at {eager_speedup:.2f}x float speed in eager torch (Q/DQ around "
                         f"float kernels); serve {aoti_path.name}, the compiled package, for speed")
        metrics = evaluate.measure(ctx, float_runner, aoti_runner, samples, extra_warnings=notes,
                                   runtime=f"torch {torch.__version__} int8 AOTInductor package (freezing, int8 "
                                           "kernels) vs float eager", **common)
        details["aoti"]["latency"] = metrics["latency"]
        if metrics["fidelity"]["sqnr_db"] < eager["fidelity"]["sqnr_db"] - SATURATION_GAP_DB:
            metrics["warnings"].append(  # same int8 numbers, different kernels: the kernels lost precision
                f"the compiled package is less exact than the portable .pt2 ({metrics['fidelity']['sqnr_db']} vs "
                f"{eager['fidelity']['sqnr_db']} dB SQNR): its int8 kernels saturate on this CPU or Inductor "
                "miscompiled it; check it before serving, or serve the .pt2")
        with tempfile.TemporaryDirectory(dir=ctx.work_dir) as scratch:
            compiled = aoti.compiled_float_comparison(float_program, args, aoti_model, samples.batches[0], names,
                                                  Path(scratch))
        details["aoti"]["vs_float_compiled"] = compiled
        if compiled.get("speedup") is not None and compiled["speedup"] < 1.0:
            metrics["warnings"].append(
                f"the reported speed-up ({metrics['latency']['speedup']}x) is against float eager torch; against "
                f"the float model compiled to an AOTInductor package too, the int8 package is slower here "
                f"({compiled['int8_aoti_ms_p50']} vs {compiled['float_aoti_ms_p50']} ms at batch 1): a model this "
                "small is likely bound by the fixed cost of each int8 kernel call; it still is smaller, and "
                "larger batches gain more")
    return QuantizeResult(artifacts=artifacts, metrics=metrics,
                          report={"versions": report.runtime_versions(), "host": report.host_info(),
                                  method_key: details})


def measure_saved(ctx: JobContext, quantized: torch.export.ExportedProgram, output: Path,
                  float_module: torch.nn.Module, lowered_module: torch.nn.Module, found: list,
                  dtypes: Callable[[str, str], tuple[str, str]], specs: list[TensorSpec],
                  samples: evaluate.Samples, runtime: str, notes: list[str], device: str = "cpu") -> dict:
    """Deliver a dynamic or weight-only program: save it, reload it, and measure it against the float
    module, with one row per layer; dtypes(path, kind) gives a layer's (weight, activation) dtypes. Both
    programs run on `device` (the float module and the saved program are already there)."""
    ctx.progress("packaging", 0.55)
    names = [s.name for s in specs]
    quant_runner, original_bytes, quantized_bytes = pt2_common.save_and_reload(quantized, output, ctx.model_path,
                                                                               names, ctx.log, device=device)
    float_runner = pt2_common.runner_for_module(float_module, names, threads=1, device=device)
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
