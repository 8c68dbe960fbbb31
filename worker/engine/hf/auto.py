"""hf method auto: the transformers model, its samples and runners for auto_runner's sweep.

Candidates: weight_only int8 and int4 (llm-compressor, round to nearest), measured as hf/weight_only measures
them; a causal LM on text may be judged by a perplexity target too. Latency here is float-like: transformers
unpacks compressed-tensors weights to float, on a CPU as on a GPU (hf/weight_only.py CPU_NOTE), so the candidates
differ in size and fidelity, and a latency tie goes to the smaller file; the job's warnings say so.
"""

from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING

from worker.engine import auto_runner
from worker.engine.config import WeightOnlyConfig
from worker.engine.hf import common as hf_common
from worker.engine.hf import measure as hf_measure
from worker.engine.hf.weight_only import plan_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from worker.engine import evaluate
    from worker.engine.config import AutoConfig
    from worker.engine.context import JobContext
    from worker.engine.types import QuantizeResult

LATENCY_WARNING = ("method auto: the latencies in metrics.sweep are float-like; transformers runs compressed-tensors "
                   "checkpoints with their integer weights unpacked to float on a CPU, so the candidates differ in "
                   "size and fidelity here, not in speed (vLLM's int4/int8 kernels on NVIDIA GPUs are not measured)")


def _float_perplexity(config: AutoConfig, model: PreTrainedModel, samples: evaluate.Samples) -> float | None:
    """The float model's perplexity on the samples, for a perplexity target only (each candidate's comes from its
    own weight_only metrics, on the same samples); None where it cannot be measured, which goal() then refuses."""
    if config.target is None or config.target.metric != "perplexity":
        return None
    if not hf_common.is_causal_lm(model) or samples.source == "synthetic":
        return None
    try:
        return hf_measure.perplexity(model, samples.batches)[0]
    except ValueError:  # no sample of two tokens or more
        return None


def run(ctx: JobContext) -> QuantizeResult:
    """Every candidate the model and data allow, one after another; the fastest meeting the goal is the model."""
    config: AutoConfig = ctx.config
    started = time.monotonic()
    ctx.progress("loading", 0.01)
    work = ctx.work_dir.resolve()
    folder = hf_common.unpack(ctx.model_path, work)
    tokenizer = hf_common.load_tokenizer(folder)
    float_model = hf_common.load_model(folder)
    vocab = int(getattr(float_model.config, "vocab_size", 0) or 1000)
    samples = hf_measure.samples(ctx, tokenizer, vocab)  # a bad dataset fails the job once, not every candidate
    goal = auto_runner.measured_goal(config.target, hf_common.runner_for_model(float_model), samples,
                                     float_perplexity=_float_perplexity(config, float_model, samples))
    has_linear_weights = bool(plan_layers(float_model, WeightOnlyConfig(exclude=config.exclude)).quantized())
    del float_model  # reloaded for the latency loop: each candidate loads its own while they run

    def candidate_runner(result: QuantizeResult) -> hf_common.Runner:
        archive = auto_runner.model_file(result)
        # unpacked beside it, in the candidate's folder, which the sweep removes once it has moved the archive
        delivered = hf_common.unpack(archive, archive.parent)
        return hf_common.runner_for_model(hf_common.load_model(delivered, quantized=True))

    subject = auto_runner.Subject(
        goal=goal, has_linear_weights=has_linear_weights, feed=samples.batches[0],
        float_runner=lambda: hf_common.runner_for_model(hf_common.load_model(folder)),
        candidate_runner=candidate_runner, report_key="hf_auto",
        latency_note="each model loaded with transformers as hf weight_only measures it (dequantize=True)",
        warnings=[LATENCY_WARNING])
    try:
        return auto_runner.sweep_all(ctx, subject, started)
    finally:
        if work in folder.parents:  # the float model unpacked for the goal and the latency loop: no artifact
            shutil.rmtree(work / folder.relative_to(work).parts[0], ignore_errors=True)
