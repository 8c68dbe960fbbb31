"""The AOTInductor package of a PT2E int8 program: built with freezing so it runs oneDNN int8 kernels.

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
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import fx

from worker.engine import metrics as m
from worker.engine.torch_export import common as pt2_common
from worker.engine.torch_export.graph import is_call, module_path, reexport, tensor_attr
from worker.engine.types import TensorSpec

_QD = torch.ops.quantized_decomposed


# "0" skips AOTInductor compilation: the default test run sets it (a compile takes 12-45 s here), and
# an operator can set it on hosts without a C++ toolchain. Read per call, so a test can set it.
AOTI_ENV = "QUANTSERVE_AOTI"


# max_autotune makes Inductor write the int8 Linear layers as its own VNNI GEMM (fused with the Q/DQ
# around them) instead of oneDNN qlinear calls, whose fixed cost per call dominated small models at
# batch 1: 32x32 digits CNN 0.21 -> 0.16 ms, wide 8x8 CNN 0.15 -> 0.09 ms. The convs stay oneDNN
# qconv. Without max_autotune if that fails to build.
_QUIET = {"autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}  # no tables on stderr


INT8_CONFIGS = ({"freezing": True, "max_autotune": True, **_QUIET}, {"freezing": True})


# The float baseline: freezing made float packages slower here (dynamic batch: float convs stay
# unpacked and oneDNN reorders their weights every call; 32x32 CNN 0.48 vs 0.32 ms at batch 1).
FLOAT_CONFIGS = ({"max_autotune": True, **_QUIET}, {})


def aoti_enabled() -> bool:
    return os.environ.get(AOTI_ENV, "1") != "0"


def rename_frozen_params(gm: fx.GraphModule) -> int:
    """Rename convert_pt2e's `_frozen_paramN` weights: Inductor's freezing names the weights it packs the
    same way, and once a weight was dropped (widen_single_channel_convs replaces one) a packed conv read
    another layer's plain int8 tensor under a reused name ("Weight should be prepacked as an MKLDNN tensor")."""
    renamed = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target).startswith("_frozen_param"):
            name = f"_int8_weight_{renamed}"
            gm.register_buffer(name, tensor_attr(gm, node))
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
        if not is_call(node, torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
                       torch.ops.aten.conv3d.default):
            continue
        x_dq, w_dq = node.args[0], node.args[1]
        groups = int(node.args[6]) if len(node.args) > 6 else 1
        if not (is_call(w_dq, _QD.dequantize_per_channel.default) and isinstance(w_dq.args[0], fx.Node)
                and w_dq.args[0].op == "get_attr" and groups == 1
                and is_call(x_dq, _QD.dequantize_per_tensor.default)
                and is_call(x_dq.args[0], _QD.quantize_per_tensor.default)):
            continue
        weight = tensor_attr(gm, w_dq.args[0])
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


def aoti_program(converted: fx.GraphModule, float_program: torch.export.ExportedProgram,
                 specs: list[TensorSpec]) -> tuple[torch.export.ExportedProgram, tuple, list[str]]:
    """The program the AOTInductor package is built from: the delivered one (same numbers), with its
    weights renamed and 1-channel convs widened for Inductor. Returns (program, example args, widened)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec.*")
        gm = copy.deepcopy(converted)
    rename_frozen_params(gm)
    widened = widen_single_channel_convs(gm)
    program, args = reexport(gm, float_program, specs)
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


def compiled_float_comparison(float_program: torch.export.ExportedProgram, args: tuple, aoti_model: Any,
                               feed: dict, names: list[str], scratch: Path) -> dict[str, Any]:
    """Latency of the float model as an AOTInductor package: the honest baseline for the int8 package,
    built the way float ran fastest here (FLOAT_CONFIGS: no freezing), not a handicapped one."""
    path, seconds, error, config = compile_aoti(float_program, args, scratch / "float.aoti.pt2", scratch,
                                                FLOAT_CONFIGS)
    if path is None:
        return {"error": error}
    # through the same runners as measure(), so int8_aoti_ms_p50 here and metrics.latency agree
    float_run = pt2_common.runner_for_module(torch._inductor.aoti_load_package(str(path)), names, threads=None)
    quant_run = pt2_common.runner_for_module(aoti_model, names, threads=None)
    with m.one_torch_thread():
        float_ms, quant_ms = m.interleaved_latency(lambda: float_run(feed), lambda: quant_run(feed),
                                                   warmup=10, runs=200)
    return {"baseline": "float AOTInductor package, batch 1, 1 thread, calls interleaved",
            "float_aoti_ms_p50": round(float_ms, 4), "int8_aoti_ms_p50": round(quant_ms, 4),
            "speedup": round(float_ms / quant_ms, 3) if quant_ms else None, "compile_s": round(seconds, 1),
            "inductor_configs": config}
