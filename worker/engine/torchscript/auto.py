"""TorchScript method auto: the scripted module, its samples and runners for auto_runner's sweep.

Candidates: dynamic, and static with minmax and histogram observers (torch.ao has no entropy one); TorchScript has
no weight_only. Float and each candidate are timed as delivered: the file loaded back with torch.jit.load.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from worker.engine import auto_runner, evaluate
from worker.engine.torchscript import common as ts_common

if TYPE_CHECKING:
    from worker.engine.config import AutoConfig
    from worker.engine.context import JobContext
    from worker.engine.types import QuantizeResult


def run(ctx: JobContext) -> QuantizeResult:
    """Every candidate the module and data allow, one after another; the fastest meeting the goal is the model."""
    config: AutoConfig = ctx.config
    started = time.monotonic()
    ctx.progress("loading", 0.01)
    original = ts_common.load_module(ctx.model_path)
    inputs = ts_common.resolve_input_specs(ctx, ts_common.input_specs(original))
    samples = evaluate.load_samples(ctx, inputs)  # a bad dataset fails the job once, not every candidate
    names = [spec.name for spec in inputs]
    goal = auto_runner.measured_goal(config.target, ts_common.runner_for_module(original, names, threads=None),
                                     samples)
    del original
    subject = auto_runner.Subject(
        goal=goal, has_linear_weights=True, feed=samples.batches[0],  # no weight_only candidate to ask it
        float_runner=lambda: ts_common.load_runner(ctx.model_path, threads=None),
        candidate_runner=lambda result: ts_common.load_runner(auto_runner.model_file(result), threads=None),
        report_key="torchscript_auto", latency_note="each model loaded with torch.jit.load, as delivered")
    return auto_runner.sweep_all(ctx, subject, started)
