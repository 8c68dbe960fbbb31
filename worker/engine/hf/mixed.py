"""hf weight_only `bits: auto`: each Linear int4 or int8 by its Hessian trace per byte (HAWQ), under max_size_ratio.

The figures are bits_auto.py's: Hutchinson's Gauss-Newton trace of each layer (the squared distance of the model's
outputs to the float model's own, on calibration, else evaluation, samples), times the exact rounding error of the
job's 4-bit weights and of round-to-nearest 8-bit ones (both read back from llm-compressor passes), against the
bytes each layer really takes at 4 and 8 bits in the saved checkpoints. bits_auto.allocate picks the layers raised
to int8; the mix is written by one llm-compressor pass with an int4 and an int8 config group, saved, and its size
checked against the budget.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import bits_auto
from worker.engine.hf import measure as hf_measure

if TYPE_CHECKING:
    import torch

    from worker.engine import evaluate
    from worker.engine.context import JobContext

PROBES = 4  # Rademacher vectors per batch: one backward each
SAMPLES = 16  # calibration samples the loss is taken over (a backward through a transformer per probe and batch)
STACK = 8
METHOD = ("HAWQ: Hessian trace (Hutchinson's estimator of the Gauss-Newton J^T J of the output distance to float, "
          "Rademacher probes in output space) x rounding error per layer, 0/1 knapsack on loss saved per byte")
FLOOR_NOTE = ("Embeddings, norms and the output head stay float and are not counted down (the size counts every "
              "*.safetensors weight)")


def trace_feeds(ctx: JobContext, tokenizer: Any, samples: evaluate.Samples) -> tuple[list[dict], str]:
    """Calibration samples, else the evaluation (or generated) ones the job measures on."""
    if ctx.calibration_path is not None and samples.source != "calibration":
        return hf_measure.calibration_feeds(ctx, tokenizer, limit=SAMPLES)[:SAMPLES], "calibration"
    return samples.batches[:SAMPLES], samples.source


def _stacks(feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Feeds of one length stacked STACK at a time (no padding: each sample's outputs are what it gets alone)."""
    by_shape: dict[tuple, list[dict[str, np.ndarray]]] = {}
    for feed in feeds:
        by_shape.setdefault(tuple(feed["input_ids"].shape), []).append(feed)
    return [{k: np.concatenate([f[k] for f in group[i:i + STACK]]) for k in group[0]}
            for group in by_shape.values() for i in range(0, len(group), STACK)]


def traces(model: torch.nn.Module, names: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """bits_auto.gauss_newton_traces of each named Linear's weight, over every float output of the model (masked
    where a sample pads)."""
    import torch

    modules = dict(model.named_modules())
    weights = {name: modules[name].weight for name in names}
    device = next(model.parameters()).device
    wanted = {id(w) for w in weights.values()}
    before = {name: p.requires_grad for name, p in model.named_parameters()}

    def outputs(batch: dict[str, np.ndarray]) -> tuple[list[torch.Tensor], int]:
        feed = {k: torch.from_numpy(v).to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        found = [v for v in model(**feed).to_tuple() if torch.is_tensor(v) and v.is_floating_point()]
        mask = feed["attention_mask"]
        return [o * mask[..., None].to(o.dtype) if o.dim() == 3 and o.shape[:2] == mask.shape else o
                for o in found], int(mask.shape[0])

    try:
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in wanted)
        with torch.enable_grad():
            return bits_auto.gauss_newton_traces(outputs, weights, _stacks(feeds), PROBES)
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(before[name])


def rows(float_model: torch.nn.Module, job: dict[str, torch.Tensor], eight: dict[str, torch.Tensor],
         found: dict[str, float], bytes4: dict[str, int], bytes8: dict[str, int], source: str) -> dict[str, dict]:
    """bits_auto.layer_row per layer: its trace, the squared rounding error of its 4- and 8-bit weights, its bytes."""
    modules = dict(float_model.named_modules())
    result = {}
    for name, rounded in job.items():
        weight = modules[name].weight.detach().float()
        error4 = float((rounded.float() - weight).pow(2).sum())
        error8 = float((eight[name].float() - weight).pow(2).sum())
        result[name] = bits_auto.layer_row(found[name], weight.numel(), error4, error8, bytes4[name], bytes8[name],
                                           source)
    return result


def choose(ctx: JobContext, layer_rows: dict[str, dict], *, original_bytes: int, bytes4: int,
           build: Callable[[frozenset[str]], Path]) -> tuple[frozenset[str], dict[str, Any], Path | None]:
    """The layers at int8, the report's bits_auto, and the folder of that mix (None: all-int4, the plain pass).
    build(at_int8) writes a mix and returns its folder; the last one built within budget is the one chosen."""
    from worker.engine.hf.common import weights_bytes

    built: dict[frozenset[str], Path] = {}

    def size_of(at_int8: frozenset[str]) -> int:
        built[at_int8] = build(at_int8)
        return weights_bytes(built[at_int8])

    chosen, report = bits_auto.allocate(ctx, layer_rows, original_bytes=original_bytes, bytes4=bytes4,
                                        size_of=size_of, method=METHOD, probes=PROBES, artifact="checkpoint",
                                        floor_note=FLOOR_NOTE)
    kept = built.pop(frozenset(chosen), None) if chosen else None
    for folder in built.values():  # mixes over budget: a checkpoint each, of no further use
        shutil.rmtree(folder, ignore_errors=True)
    return frozenset(chosen), report, kept
