"""hf weight_only sensitivity and targets: sensitivity_analysis's probes and search on weights swapped in memory.

A candidate is a set of layers kept at higher precision. It runs as one working copy of the float model whose
quantized Linear weights hold the job's rounded weights (read back from its llm-compressor pass), and the int8
(round to nearest) or float ones for the layers it keeps: the numbers the delivered checkpoint computes once
transformers unpacks it (CompressedTensorsConfig(dequantize=True)). Re-running llm-compressor and saving per probe
would cost a pass, a save and a load each for the same numbers. Samples of equal length run stacked (no padding,
so every architecture gives each sample what it gives it alone); a causal LM's perplexity comes from the same pass.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import evaluate
from worker.engine import sensitivity_analysis as analysis
from worker.engine.hf import common as hf_common
from worker.engine.hf import measure as hf_measure

if TYPE_CHECKING:
    import torch

    from worker.engine.context import JobContext

STACK = 16  # samples of one length per forward
ESCALATION = "int4 -> int8 (largest measured drop first) -> float (largest measured drop first, the rest at int8)"
LATENCY = ("not measured: transformers runs int4, int8 and float layers alike, as float weights (the checkpoint is "
           "unpacked at load), so keeping layers changes the size here, not the speed; see metrics.latency")


class Candidates:
    """One working copy of the float model; apply(kept) puts each candidate's weights in place (no copy per probe)."""

    def __init__(self, float_model: torch.nn.Module, job: dict[str, torch.Tensor],
                 kept_weights: dict[str, torch.Tensor] | None) -> None:
        self.model = copy.deepcopy(float_model)
        modules = dict(self.model.named_modules())
        self.layers = {name: modules[name] for name in job}
        self.job = job
        # the weights a kept layer gets: int8 (int4 jobs) or the float ones
        self.kept = kept_weights if kept_weights is not None else {n: m.weight.data for n, m in self.layers.items()}

    def apply(self, kept: frozenset[str]) -> torch.nn.Module:
        for name, module in self.layers.items():
            module.weight.data = self.kept[name] if name in kept else self.job[name]
        return self.model


class Runs:
    """Each sample's outputs (and token NLL) of the float model or a candidate; the last run is kept, so that
    sensitivity_analysis's outputs() and perplexity() on one candidate share a single pass."""

    def __init__(self, float_model: torch.nn.Module, candidates: Candidates, feeds: list[dict[str, np.ndarray]],
                 with_perplexity: bool) -> None:
        self.float_model, self.candidates, self.feeds = float_model, candidates, feeds
        self.with_perplexity = with_perplexity
        self._last: tuple[Any, list[list[np.ndarray]], list[tuple[float, int]]] | None = None

    def _run(self, candidate: Any, upto: int) -> tuple[list[list[np.ndarray]], list[tuple[float, int]]]:
        key = "float" if candidate is self.float_model else candidate
        if self._last is not None and self._last[0] == key and len(self._last[1]) >= upto:
            return self._last[1][:upto], self._last[2][:upto]
        model = self.float_model if key == "float" else self.candidates.apply(candidate)
        outputs, nll = forward(model, self.feeds[:upto], self.with_perplexity)
        self._last = (key, outputs, nll)
        return outputs, nll

    def outputs(self, candidate: Any, upto: int) -> list[list[np.ndarray]]:
        return self._run(candidate, upto)[0]

    def perplexity(self, candidate: Any, upto: int) -> float | None:
        nll = self._run(candidate, upto)[1]
        try:
            return hf_measure.perplexity_of(sum(n for n, _ in nll), sum(c for _, c in nll))
        except ValueError:  # no sample with two tokens
            return None


def forward(model: torch.nn.Module, feeds: list[dict[str, np.ndarray]],
            with_perplexity: bool) -> tuple[list[list[np.ndarray]], list[tuple[float, int]]]:
    """Per sample: [its output, unpadded] as the job's runner gives it, and (summed NLL, tokens) when asked."""
    import torch

    by_shape: dict[tuple, list[int]] = {}
    for i, feed in enumerate(feeds):
        by_shape.setdefault(tuple(feed["input_ids"].shape), []).append(i)
    outputs: list[list[np.ndarray]] = [[] for _ in feeds]
    nll: list[tuple[float, int]] = [(0.0, 0)] * len(feeds)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for indices in by_shape.values():
            for start in range(0, len(indices), STACK):
                chunk = indices[start:start + STACK]
                ids = torch.from_numpy(np.concatenate([feeds[i]["input_ids"] for i in chunk])).to(device)
                mask = torch.from_numpy(np.concatenate([feeds[i]["attention_mask"] for i in chunk])).to(device)
                found = model(input_ids=ids, attention_mask=mask)
                selected = hf_common.select_output(model, found).float().cpu().numpy()
                for row, i in enumerate(chunk):
                    outputs[i] = evaluate.unpadded(feeds[i], [selected[row:row + 1]])
                    if with_perplexity and ids.shape[1] > 1:
                        nll[i] = hf_measure.token_nll(found.logits[row:row + 1], ids[row:row + 1],
                                                      mask[row:row + 1])
    return outputs, nll


def analyse(ctx: JobContext, *, float_model: torch.nn.Module, job_weights: dict[str, torch.Tensor],
            kept_weights: dict[str, torch.Tensor] | None, samples: evaluate.Samples, keep_as: str,
            plain_bytes: int, gptq: bool) -> analysis.Outcome:
    """metrics.sensitivity of the plain pass (its layers: job_weights) and, with config.target, the fewest most
    sensitive layers to keep at `keep_as` ("int8": kept_weights; "float") until it holds."""
    candidates = Candidates(float_model, job_weights, kept_weights)
    with_perplexity = hf_common.is_causal_lm(float_model) and samples.source != "synthetic"
    runs = Runs(float_model, candidates, samples.batches, with_perplexity)
    names = list(job_weights)

    def order() -> list[str]:
        """Lowest layer SQNR in the plain candidate first."""
        return analysis.by_lowest_sqnr(ctx, names, lambda: hf_measure.layer_sqnr(
            float_model, candidates.apply(frozenset()), set(names), samples.batches))

    runs_in = "in eager transformers, each candidate's rounded weights swapped into a copy of the float model (the " \
              "numbers the delivered checkpoint computes once unpacked)"
    if gptq and keep_as == "int8":
        runs_in += "; int4 weights are the job's own GPTQ weights, the int8 ones of kept layers round to nearest, a " \
                   "proxy for the GPTQ pass the delivered checkpoint runs"
    try:
        return analysis.analyse(
            ctx, float_model=float_model, plain=frozenset(), build=lambda kept: kept, outputs=runs.outputs,
            order=order, samples=samples, runs_in=runs_in, keep_as=keep_as, span=(0.30, 0.55),
            latency=lambda _plain, _chosen: {"latency": LATENCY}, plain_bytes=lambda _plain: plain_bytes,
            perplexity=runs.perplexity if with_perplexity else None)
    finally:
        del candidates.model  # the working copy: one model's worth of memory


def escalate(ctx: JobContext, first: analysis.Outcome, *, float_model: torch.nn.Module,
             eight: dict[str, torch.Tensor], samples: evaluate.Samples, plain_bytes: int,
             gptq: bool) -> analysis.Outcome:
    """An int4 job whose target every measured layer at int8 did not reach: the search again from all-int8, keeping
    the most sensitive layers float (the rest at int8), within what is left of budget_s. Returns `first` when
    there is nothing to escalate (met, no target, or the budget already ran out)."""
    target = first.target
    if target is None or first.error is None or first.report.get("stopped_by") == "budget":
        return first
    budget = ctx.config.target.budget_s
    left = budget - target["search_s"]
    if left <= 0:
        return first
    ctx.log("info", "every layer at int8 did not reach the target: keeping the most sensitive layers float")
    step = dataclasses.replace(ctx, config=ctx.config.model_copy(update={
        "target": ctx.config.target.model_copy(update={"budget_s": left})}))
    second = analyse(step, float_model=float_model, job_weights=eight, kept_weights=None, samples=samples,
                     keep_as="float", plain_bytes=plain_bytes, gptq=gptq)
    found = second.target or {}
    kept_float = list(second.kept)
    composed = {**found, "budget_s": budget, "before": target["before"], "step": "float", "escalation": ESCALATION,
                "kept_int8": [n for n in eight if n not in kept_float], "kept_float": kept_float,
                "tried_int8": first.report.get("tried", []),
                "search_s": round(target["search_s"] + found.get("search_s", 0.0), 3)}
    composed.setdefault("cost", {"latency": LATENCY, "bytes_before": plain_bytes})  # all-int8 is never the plain
    error = None
    if not composed.get("met"):
        why = "the time budget ran out" if second.report.get("stopped_by") == "budget" else \
            "keeping every measured layer float, the rest at int8, did not reach it"
        error = {"code": "target_not_met", "message": f"the accuracy target was not met within {budget:g} s ({why}): "
                 f"best candidate {composed['metric']} drop {composed['drop']:.4f} (at most {composed['max_drop']} "
                 f"asked), with {len(composed['kept_int8'])} layer(s) at int8 and {len(kept_float)} float; it is "
                 "delivered as the job's artifact"}
    return analysis.Outcome(report=first.report, target=composed, kept=kept_float, error=error)
