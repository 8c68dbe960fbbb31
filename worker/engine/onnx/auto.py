"""ONNX method auto: the ONNX model, its samples and runners for auto_runner's sweep.

auto_runner.py runs each candidate (dynamic, static minmax/entropy, weight_only int8/int4) through its own handler,
then times float and every candidate in one loop in onnxruntime (one thread); sweep.py picks the delivered file.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from worker.engine import auto_runner, evaluate
from worker.engine.onnx import common as onnx_common
from worker.engine.onnx import sensitivity as onnx_sensitivity

if TYPE_CHECKING:
    from worker.engine.config import AutoConfig
    from worker.engine.context import JobContext
    from worker.engine.types import QuantizeResult


def run(ctx: JobContext) -> QuantizeResult:
    """Every candidate the model and data allow, one after another; the fastest meeting the goal is the model."""
    config: AutoConfig = ctx.config
    started = time.monotonic()
    ctx.progress("loading", 0.01)
    original = onnx_common.load(ctx.model_path)
    info = onnx_common.describe(original)
    samples = evaluate.load_samples(ctx, info.inputs)  # a bad dataset fails the job once, not every candidate
    model_path = ctx.model_path.resolve()
    # the target's own checks (labels for accuracy, class scores for top1_agreement) fail here, before any work
    goal, _ = onnx_sensitivity.float_goal(config.target, model_path, samples)
    has_linear_weights = any(n.op_type in ("MatMul", "Gemm") for n in original.graph.node)
    del original
    subject = auto_runner.Subject(
        goal=goal, has_linear_weights=has_linear_weights, feed=samples.batches[0],
        float_runner=lambda: onnx_common.load_runner(model_path, threads=1),
        candidate_runner=lambda result: onnx_common.load_runner(auto_runner.model_file(result), threads=1,
                                                                ours=True),
        report_key="onnx_auto")
    return auto_runner.sweep_all(ctx, subject, started)
