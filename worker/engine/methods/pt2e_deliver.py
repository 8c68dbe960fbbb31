"""Deliver a PT2E static int8 module (static and QAT): a small `.pt2` program and an AOTInductor package, measured.

ENGINE.md: the converted program runs Q/DQ ops around float kernels in eager (0.52x float), and only
Inductor with freezing lowers them to int8 oneDNN kernels. So a job delivers both: the portable int8
program (loads with torch.export.load) and an AOTInductor package compiled with freezing for the
worker's CPU (runs fast with no compile step). Metrics follow the fast one; both go in the report.

Three things had to be right for that package to hold int8 kernels at all, and correct ones (torch 2.13):
- Inductor applies `freezing` only under torch.no_grad(); with grad on it was silently skipped and the
  package dequantized every int8 weight per call into float convs (no faster than float AOTI;
  pytorch/ao#4566 reports the same). compile_aoti compiles under no_grad.
- convert_pt2e names its weights `_frozen_paramN`, as freezing names what it packs: renamed.
- a dynamic batch plus a 1-channel first conv made the compiled int8 package wrong: see
  widen_single_channel_convs.
Then, at batch 1 on small models, the fixed cost of each oneDNN int8 call dominated: INT8_CONFIGS.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops for load/save
from torch import fx

from worker.engine import evaluate, report
from worker.engine import metrics as m
from worker.engine.formats import torch_export as pt2_format
from worker.engine.methods import pt2_layer_sqnr
from worker.engine.methods.pt2e_lowering import drop_unused, module_path
from worker.engine.types import ArtifactFile, QuantizeResult, TensorSpec

if TYPE_CHECKING:
    from worker.engine import JobContext

# "0" skips AOTInductor compilation: the default test run sets it (a compile takes 12-45 s here), and
# an operator can set it on hosts without a C++ toolchain. Read per call, so a test can set it.
AOTI_ENV = "QUANTSERVE_AOTI"
LOAD_NOTE = ("the .pt2 uses torch's quantized_decomposed ops: `import torch.ao.quantization.fx._decomposed` "
             "(or torchao) before torch.export.load")
# max_autotune makes Inductor write the int8 Linear layers as its own VNNI GEMM (fused with the Q/DQ
# around them) instead of oneDNN qlinear calls, whose fixed cost per call dominated small models at
# batch 1: 32x32 digits CNN 0.21 -> 0.16 ms, wide 8x8 CNN 0.15 -> 0.09 ms. The convs stay oneDNN
# qconv. Without max_autotune if that fails to build.
_QUIET = {"autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}  # no tables on stderr
INT8_CONFIGS = ({"freezing": True, "max_autotune": True, **_QUIET}, {"freezing": True})
# The float baseline: freezing made float packages slower here (dynamic batch: float convs stay
# unpacked and oneDNN reorders their weights every call; 32x32 CNN 0.48 vs 0.32 ms at batch 1).
FLOAT_CONFIGS = ({"max_autotune": True, **_QUIET}, {})
SATURATION_GAP_DB = 6.0  # AOTI vs eager on the same int8 program: equal here (44 dB); a gap means kernel trouble
_QD = torch.ops.quantized_decomposed
_WEIGHT_OPS = {torch.ops.aten.conv1d.default: "Conv1d", torch.ops.aten.conv2d.default: "Conv2d",
               torch.ops.aten.conv3d.default: "Conv3d", torch.ops.aten.linear.default: "Linear",
               torch.ops.aten.conv_transpose1d.default: "ConvTranspose1d",
               torch.ops.aten.conv_transpose2d.input: "ConvTranspose2d"}


def aoti_enabled() -> bool:
    return os.environ.get(AOTI_ENV, "1") != "0"


def _is(node: object, *targets: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def weight_layers(gm: fx.GraphModule, bits: int) -> list[dict[str, Any]]:
    """The `layers` entries of every conv/linear in a converted graph: integer or float weights and inputs."""
    layers, seen = [], set()
    for node in gm.graph.nodes:
        if not _is(node, *_WEIGHT_OPS) or len(node.args) < 2:
            continue
        name = module_path(node)[0]
        if name in seen:
            continue
        seen.add(name)
        w, x = node.args[1], node.args[0]
        int_weight = _is(w, _QD.dequantize_per_channel.default, _QD.dequantize_per_tensor.default)
        layers.append({"name": name, "op": _WEIGHT_OPS[node.target],
                       "weight_dtype": (f"int{bits}" if int_weight else "float32"),
                       "activation_dtype": "uint8" if _is(x, _QD.dequantize_per_tensor.default) else "float32",
                       "sqnr_db": None})
    return layers


def weights_per_channel(gm: fx.GraphModule) -> int:
    """Rewrite per-tensor int8 weights of conv/linear as per-channel with one repeated scale (same numbers).

    Why by hand: Inductor's freezing passes match only `dequantize_per_channel` weights when they lower
    to oneDNN int8 kernels; a per-tensor weight would stay a float conv dequantized on every call.
    """
    rewritten = 0
    for node in list(gm.graph.nodes):
        if not _is(node, torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
                   torch.ops.aten.conv3d.default, torch.ops.aten.linear.default):
            continue
        dq = node.args[1]
        if not _is(dq, _QD.dequantize_per_tensor.default) or not isinstance(dq.args[1], float):
            continue
        weight = dq.args[0]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            continue
        channels = int(_attr(gm, str(weight.target)).shape[0])
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


def rename_frozen_params(gm: fx.GraphModule) -> int:
    """Rename convert_pt2e's `_frozen_paramN` weights: Inductor's freezing names the weights it packs the
    same way, and once a weight was dropped (widen_single_channel_convs replaces one) a packed conv read
    another layer's plain int8 tensor under a reused name ("Weight should be prepacked as an MKLDNN tensor")."""
    renamed = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target).startswith("_frozen_param"):
            name = f"_int8_weight_{renamed}"
            gm.register_buffer(name, _attr(gm, str(node.target)))
            delattr(gm, str(node.target))
            node.target = name
            renamed += 1
    gm.recompile()
    return renamed


def widen_single_channel_convs(gm: fx.GraphModule) -> list[str]:
    """For the AOTInductor build only: an int8 conv that reads a 1-channel input gets a second, all-zero
    input channel (zero activations, zero int8 weights: the same sums), so it stays an int8 kernel.

    Why: with a dynamic batch, Inductor assumes a conv on an (N, 1, H, W) input writes NCHW (that input
    is NCHW and NHWC at once), but oneDNN's int8 conv writes NHWC; the next layer then read the bytes in
    the wrong order (top-1 12 % on the 32x32 digits CNN; `AOTI_RUNTIME_CHECK_INPUTS=1` reports the stride
    mismatch). With two channels the layouts differ and Inductor tracks the real one. Returns the layers."""
    rewritten = []
    for node in list(gm.graph.nodes):
        if not _is(node, torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default):
            continue
        x_dq, w_dq = node.args[0], node.args[1]
        groups = int(node.args[6]) if len(node.args) > 6 else 1
        if not (_is(w_dq, _QD.dequantize_per_channel.default) and isinstance(w_dq.args[0], fx.Node)
                and w_dq.args[0].op == "get_attr" and groups == 1
                and _is(x_dq, _QD.dequantize_per_tensor.default)
                and _is(x_dq.args[0], _QD.quantize_per_tensor.default)):
            continue
        weight = _attr(gm, str(w_dq.args[0].target))
        if weight.shape[1] != 1:
            continue
        name = f"_widened_weight_{len(rewritten)}"
        gm.register_buffer(name, torch.cat([weight, torch.zeros_like(weight)], dim=1))
        q = x_dq.args[0]
        with gm.graph.inserting_before(node):
            wide_x = gm.graph.call_function(torch.ops.aten.cat.default,
                                            ([q.args[0], gm.graph.call_function(torch.ops.aten.zeros_like.default,
                                                                                (q.args[0],))], 1))
            wide_q = gm.graph.call_function(q.target, (wide_x, *q.args[1:]))
            wide_dq = gm.graph.call_function(x_dq.target, (wide_q, *x_dq.args[1:]))
            wide_w = gm.graph.call_function(w_dq.target, (gm.graph.get_attr(name), *w_dq.args[1:]))
        node.args = (wide_dq, wide_w, *node.args[2:])
        rewritten.append(module_path(node)[0])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return rewritten


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def small_program(converted: fx.GraphModule, float_program: torch.export.ExportedProgram,
                  specs: list[TensorSpec]) -> tuple[torch.export.ExportedProgram, tuple]:
    """Re-export with only the tensors the graph reads and small cloned example inputs (ENGINE.md: 536 KB
    -> 158 KB). Returns the program (example inputs cleared, so nothing is pickled) and the example args."""
    from worker.engine.methods.torch_export_dynamic import _example_args

    for node in list(converted.graph.nodes):  # a QAT graph keeps the guards of its batch>=2 training export
        if node.op == "call_module" and str(node.target).startswith("_guards_fn") and not node.users:
            converted.graph.erase_node(node)
    drop_unused(converted)
    args, dynamic_shapes = _example_args(float_program, specs)
    with torch.no_grad():
        program = torch.export.export(converted, args, dynamic_shapes=dynamic_shapes)
    program.example_inputs = None
    for node in program.graph.nodes:  # provenance JSON outweighs small int8 weights; layer names are in metrics
        for key in ("stack_trace", "from_node", "torch_fn", "source_fn_stack", "nn_module_stack"):
            node.meta.pop(key, None)
    return program, args


def aoti_program(converted: fx.GraphModule, float_program: torch.export.ExportedProgram,
                 specs: list[TensorSpec]) -> tuple[torch.export.ExportedProgram, tuple, list[str]]:
    """The program the AOTInductor package is built from: the delivered one (same numbers), with its
    weights renamed and 1-channel convs widened for Inductor. Returns (program, example args, widened)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec.*")
        gm = copy.deepcopy(converted)
    rename_frozen_params(gm)
    widened = widen_single_channel_convs(gm)
    program, args = small_program(gm, float_program, specs)
    return program, args, widened


def compile_aoti(program: torch.export.ExportedProgram, args: tuple, path: Path, scratch: Path,
                 configs: tuple[dict[str, Any], ...] = INT8_CONFIGS
                 ) -> tuple[Path | None, float, str | None, dict[str, Any] | None]:
    """AOTInductor package built with the first of `configs` that compiles (passed per call: a global flag
    was ignored on a cached compile), under torch.no_grad(): Inductor skips freezing when grad is on.

    Compiles a deep copy in a fresh Inductor cache under the job's scratch folder, so nothing stale is
    reused and nothing is left behind. Returns (path or None, seconds, error text, config used)."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    start, error = time.perf_counter(), None
    for config in configs:
        try:
            with warnings.catch_warnings():  # torch's own pytree pickling warns about its LeafSpec on deepcopy
                warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec.*")
                # and Inductor's own code (autotuning, int8 lowering) about torch APIs it uses
                warnings.filterwarnings("ignore", category=UserWarning, message=r"(TypedStorage|To copy construct)")
                copied = copy.deepcopy(program)
                copied.example_inputs = (tuple(a.clone() for a in args), {})
                with (tempfile.TemporaryDirectory(prefix="inductor-", dir=scratch) as cache,
                      temporary_cache_dir(cache), torch.no_grad()):
                    torch._inductor.aoti_compile_and_package(copied, package_path=str(path),
                                                             inductor_configs=dict(config))
            return path, time.perf_counter() - start, None, dict(config)
        except Exception as exc:  # no C++ compiler, an op Inductor cannot lower, ...: the .pt2 still ships
            path.unlink(missing_ok=True)
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
    return None, time.perf_counter() - start, error, None


def _rescaled(ctx: JobContext, low: float, high: float) -> JobContext:
    """The context with measure()'s 0.80..0.98 progress mapped into low..high (for a second measurement)."""
    def progress(stage: str, fraction: float) -> None:
        ctx.progress(stage, low + (high - low) * min(max((fraction - 0.80) / 0.18, 0.0), 1.0))

    return dataclasses.replace(ctx, progress=progress)


def _compiled_float_comparison(float_program: torch.export.ExportedProgram, args: tuple, aoti_model: Any,
                               feed: dict, names: list[str], scratch: Path) -> dict[str, Any]:
    """Latency of the float model as an AOTInductor package: the honest baseline for the int8 package,
    built the way float ran fastest here (FLOAT_CONFIGS: no freezing), not a handicapped one."""
    path, seconds, error, config = compile_aoti(float_program, args, scratch / "float.aoti.pt2", scratch,
                                                FLOAT_CONFIGS)
    if path is None:
        return {"error": error}
    # through the same runners as measure(), so int8_aoti_ms_p50 here and metrics.latency agree
    float_run = pt2_format.runner_for_module(torch._inductor.aoti_load_package(str(path)), names, threads=None)
    quant_run = pt2_format.runner_for_module(aoti_model, names, threads=None)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        float_ms, quant_ms = m.interleaved_latency(lambda: float_run(feed), lambda: quant_run(feed),
                                                   warmup=10, runs=200)
    finally:
        torch.set_num_threads(previous)
    return {"baseline": "float AOTInductor package, batch 1, 1 thread, calls interleaved",
            "float_aoti_ms_p50": round(float_ms, 4), "int8_aoti_ms_p50": round(quant_ms, 4),
            "speedup": round(float_ms / quant_ms, 3) if quant_ms else None, "compile_s": round(seconds, 1),
            "inductor_configs": config}


def deliver(ctx: JobContext, *, float_program: torch.export.ExportedProgram, converted: fx.GraphModule,
            specs: list[TensorSpec], samples: evaluate.Samples, bits: int, method_key: str,
            notes: list[str], details: dict[str, Any]) -> QuantizeResult:
    """Save, compile, measure and describe; `details` goes into report[method_key]."""
    layers = weight_layers(converted, bits)
    pt2_layer_sqnr.fill(ctx, layers, float_program.module(), converted, specs, samples)  # before the rewrites
    details["per_tensor_weights_rewritten"] = weights_per_channel(converted)
    ctx.progress("packaging", 0.45)
    program, args = small_program(converted, float_program, specs)
    output = ctx.work_dir / f"{ctx.model_name}.int8.pt2"  # 4-bit weights are stored in int8 too
    pt2_format.save_program(program, output)
    original_bytes, quantized_bytes = Path(ctx.model_path).stat().st_size, output.stat().st_size
    tensors = {**program.state_dict, **program.constants}
    details["pt2"] = {"size_bytes": quantized_bytes, "ratio": round(quantized_bytes / original_bytes, 4),
                      "int8_bytes": sum(t.nbytes for t in tensors.values() if t.dtype == torch.int8),
                      "float_bytes": sum(t.nbytes for t in tensors.values() if t.is_floating_point()),
                      "load_note": LOAD_NOTE}
    ctx.log("info", f"saved {output.name}: {quantized_bytes} bytes ({quantized_bytes / original_bytes:.3f}x)")

    artifacts = [ArtifactFile(kind="model", path=output, filename=output.name, format="torch_export")]
    aoti_path = None
    if aoti_enabled():
        ctx.progress("compiling", 0.50)
        source, source_args, widened = aoti_program(converted, float_program, specs)
        aoti_path, seconds, error, config = compile_aoti(source, source_args, output.with_name(
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
        details["aoti"] = {"skipped": f"{AOTI_ENV}=0"}
        notes.append(f"AOTInductor compilation is switched off ({AOTI_ENV}=0): only the portable .pt2 is "
                     "delivered; it runs Q/DQ ops around float kernels and is slower than a compiled package")

    names = [s.name for s in specs]
    float_runner = pt2_format.runner_for_module(float_program.module(), names, threads=1)
    with tempfile.TemporaryDirectory(dir=ctx.work_dir) as scratch:  # measure the saved file, not the object
        reloaded = pt2_format.load_program(output, scratch=Path(scratch))
    eager_runner = pt2_format.runner_for_module(reloaded.module(), names, threads=1)
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
        aoti_runner = pt2_format.runner_for_module(aoti_model, names, threads=1)
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
            compiled = _compiled_float_comparison(float_program, args, aoti_model, samples.batches[0], names,
                                                  Path(scratch))
        details["aoti"]["vs_float_compiled"] = compiled
        if compiled.get("speedup") is not None and compiled["speedup"] < 1.0:
            metrics["warnings"].append(
                f"the reported speed-up ({metrics['latency']['speedup']}x) is against float eager torch; against "
                f"the float model compiled to an AOTInductor package too, the int8 package is slower here "
                f"({compiled['int8_aoti_ms_p50']} vs {compiled['float_aoti_ms_p50']} ms at batch 1): a model this "
                "small is likely bound by the fixed cost of each int8 kernel call; it still is smaller, and "
                "larger batches gain more")
    ctx.progress("done", 1.0)
    return QuantizeResult(artifacts=artifacts, metrics=metrics,
                          report={"versions": report.runtime_versions(), "host": report.host_info(),
                                  method_key: details})
