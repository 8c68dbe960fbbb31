"""torch.export method auto: the `.pt2` program, its samples and runners for auto_runner's sweep.

Candidates: dynamic, static with minmax and histogram observers (PT2E has no entropy one), weight_only int8 and
int4. Each is timed as it is delivered: a static candidate by its AOTInductor package (compiled_model) where one
was built, as the static job itself reports it, else the portable .pt2 loaded back in eager torch; float is the
uploaded program in eager torch, the baseline every torch.export job reports against.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from worker.engine import auto_runner, evaluate
from worker.engine.torch_export import common as pt2_common
from worker.engine.torch_export.graph import weight_layers

if TYPE_CHECKING:
    from worker.engine.config import AutoConfig
    from worker.engine.context import JobContext
    from worker.engine.types import QuantizeResult

LATENCY_NOTE = ("a candidate with an AOTInductor package (compiled_model: static) is timed by that package, the "
                "others by their portable .pt2 in eager torch; float is the uploaded program in eager torch")


def run(ctx: JobContext) -> QuantizeResult:
    """Every candidate the program and data allow, one after another; the fastest meeting the goal is the model."""
    config: AutoConfig = ctx.config
    started = time.monotonic()
    ctx.progress("loading", 0.01)
    work = ctx.work_dir.resolve()
    program = pt2_common.load_program(ctx.model_path, scratch=work)
    specs = pt2_common.input_specs(program)
    names = [spec.name for spec in specs]
    samples = evaluate.load_samples(ctx, specs)  # a bad dataset fails the job once, not every candidate
    float_module = program.module()
    goal = auto_runner.measured_goal(config.target, pt2_common.runner_for_module(float_module, names, threads=None),
                                     samples)
    has_linear_weights = any(kind in ("Linear", "Embedding") for _, kind, _ in weight_layers(float_module))
    del program, float_module

    def float_runner() -> pt2_common.Runner:
        return pt2_common.runner_for_module(pt2_common.load_program(ctx.model_path, scratch=work).module(), names,
                                            threads=None)

    def candidate_runner(result: QuantizeResult) -> pt2_common.Runner:
        import torch
        import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers the ops a quantized .pt2 calls

        compiled = auto_runner.model_file(result, "compiled_model")
        if compiled is not None:
            return pt2_common.runner_for_module(torch._inductor.aoti_load_package(str(compiled)), names, threads=None)
        with tempfile.TemporaryDirectory(dir=work) as scratch:  # the saved file, loaded as a user loads it
            saved = pt2_common.load_program(auto_runner.model_file(result), scratch=Path(scratch), ours=True)
        return pt2_common.runner_for_module(saved.module(), names, threads=None)

    subject = auto_runner.Subject(goal=goal, has_linear_weights=has_linear_weights, feed=samples.batches[0],
                                  float_runner=float_runner, candidate_runner=candidate_runner,
                                  report_key="torch_export_auto", kinds=("model", "compiled_model"),
                                  latency_note=LATENCY_NOTE)
    return auto_runner.sweep_all(ctx, subject, started)
