"""QAT targets: when no conversion of the trained model meets config.target, fine-tune once more with the layers the
search chose kept float, and deliver that where it comes closer.

The search (torch_export/sensitivity.analyse on qat_candidates.py's builds) converts the trained model with layers
float and does not retrain: the layers around them were fine-tuned to make up for rounding that is no longer there.
Fine-tuning again from the upload with those layers float (what a resubmission with them in config.exclude does)
lets the rest fit them: on the 8x8 digits CNN, W4 per-tensor, keeping conv1 and head float reached cosine 0.99937
converted from the trained model and 0.99959 fine-tuned again. One fine-tune, not one per search step: each costs
as much as the job's own training, so it runs only when the budget left holds one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import evaluate
from worker.engine import metrics as m
from worker.engine import sensitivity as s
from worker.engine.sensitivity_analysis import Outcome, target_error
from worker.engine.torch_export import common as pt2_common
from worker.engine.torch_export.sensitivity import per_sample

if TYPE_CHECKING:
    from worker.engine.context import JobContext
    from worker.engine.types import TensorSpec


def _outputs(module: Any, specs: list[TensorSpec], samples: evaluate.Samples) -> list[list[np.ndarray]]:
    run = pt2_common.runner_for_module(module, [spec.name for spec in specs], threads=None)
    return [evaluate.unpadded(b, o) for b, o in zip(samples.batches, per_sample(run, samples.batches, specs),
                                                     strict=True)]


def retrain(ctx: JobContext, sensed: Outcome, *, fine_tune: Callable[[frozenset[str]], Any], training_s: float,
            float_module: Any, specs: list[TensorSpec], samples: evaluate.Samples) -> Any | None:
    """The module to deliver instead of the search's choice, or None to keep it. Fine-tunes once more with the
    search's best kept set float when the target was missed with layers kept and the budget holds one training
    (`training_s`, the job's first); records what it did in metrics.target.retrained and updates the target's
    figures and error when the fine-tuned candidate comes closer."""
    target = sensed.target
    if target is None or target["met"] or not sensed.kept:
        return None
    kept = list(sensed.kept)
    left = target["budget_s"] - target["search_s"]
    if left < training_s:
        target["retrained"] = {"kept_float": kept, "delivered": False,
                               "skipped": f"one more fine-tune takes about {training_s:.0f} s and "
                                          f"{max(left, 0.0):.0f} s of budget_s were left"}
        return None
    ctx.log("info", f"target missed without retraining; fine-tuning again with {', '.join(kept)} float")
    started = time.monotonic()
    module = fine_tune(frozenset(kept))
    reference = _outputs(float_module, specs, samples)
    labels = samples.labels
    goal = s.goal(ctx.config.target, None if labels is None else m.accuracy_top1([r[0] for r in reference], labels),
                  m.top1_agreement([r[0] for r in reference], [r[0] for r in reference]) is not None)
    found = s.figures(reference, _outputs(module, specs, samples), labels)
    searched = s.Figures(**target["after"])
    closer = goal.drop(found) < goal.drop(searched)
    target["retrained"] = {"kept_float": kept, "delivered": closer, **found.to_dict(),
                           "drop": round(goal.drop(found), 6), "seconds": round(time.monotonic() - started, 3)}
    target["search_s"] = round(target["search_s"] + target["retrained"]["seconds"], 3)
    if not closer:
        ctx.log("info", f"fine-tuned again: {goal.metric} drop {goal.drop(found):.4f}, not closer than without "
                        "retraining; that candidate is delivered")
        return None
    target.update(after=found.to_dict(), drop=round(goal.drop(found), 6), met=goal.met(found))
    search = s.Search(kept=kept, figures=found, met=goal.met(found))
    sensed.error = target_error(ctx, goal, search, s.Figures(**target["before"]), "float")
    return module
