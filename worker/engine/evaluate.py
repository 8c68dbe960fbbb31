"""The one measurement every method runs: samples in, the API's `metrics` object out."""

from __future__ import annotations

import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import metrics as m
from worker.engine.errors import EngineError
from worker.engine.formats import layout
from worker.engine.types import TensorSpec

if TYPE_CHECKING:
    from worker.engine.context import JobContext

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]

SYNTHETIC_SAMPLES = 32
SYNTHETIC_WARNING = f"fidelity measured on {SYNTHETIC_SAMPLES} generated inputs: no dataset given"
SYNTHETIC_SEQUENCE = 16  # non-batch symbolic dims: one token would leave attention nothing to attend to
LATENCY_BUDGET_S = 20.0  # big models get fewer timed runs rather than a job that times out


@dataclass
class Samples:
    # one input dict per sample: a batch of one, or the sample as the dataset stacked it (formats/layout.py)
    batches: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    source: str  # "evaluation" | "calibration" | "synthetic"
    warnings: list[str] = field(default_factory=list)


def _describe(dtype: str, shape: Sequence[Any]) -> str:
    return f"{dtype}[{', '.join('?' if isinstance(d, str) else str(d) for d in shape)}]"


def _input_shape(spec: TensorSpec, array: np.ndarray) -> list[Any] | None:
    """The input's shape for the layout rule; None where its rank is unknown. ONNX records a scalar and an
    input of unknown shape alike as []: a 1-D array then reads as stacked scalars, anything else as before."""
    return spec.shape if spec.shape or array.ndim == 1 else None


def _check_array(spec: TensorSpec, key: str, array: np.ndarray) -> np.ndarray:
    """The dataset array cast to the input's dtype, or an EngineError saying what does not match."""
    expected = np.dtype(spec.dtype) if spec.dtype in np.sctypeDict else None
    mismatch = f"input {spec.name!r} expects {_describe(spec.dtype, spec.shape)}; dataset array {key!r} is " \
               f"{_describe(array.dtype.name, array.shape)}"
    if expected is None or array.ndim == 0 or array.dtype.kind != expected.kind:
        raise EngineError(mismatch, code="dataset_mismatch")  # float data into an int input: not a cast
    problem = layout.sample_shape_problem(_input_shape(spec, array), array.shape)
    if problem:
        raise EngineError(f"{mismatch}: {problem}", code="dataset_mismatch")
    return array.astype(expected, copy=False)  # float64 -> float32 and the like: same kind, safe


def load_npz(path: Path, inputs: list[TensorSpec], max_samples: int, source: str) -> Samples:
    try:
        with np.load(str(path), allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise EngineError(f"the {source} dataset is not a readable .npz of plain arrays: {exc}",
                          code="dataset_mismatch") from exc
    labels = arrays.pop("labels", None)
    inputs = [s for s in inputs if not s.optional or s.name in arrays]
    if len(inputs) == 1 and len(arrays) == 1:
        pairs = [(inputs[0], *next(iter(arrays.items())))]  # one array for a one-input model, any name
    else:
        missing = [s.name for s in inputs if s.name not in arrays]
        if missing:
            raise EngineError(
                f"the {source} dataset has arrays {sorted(arrays)}, but the model's inputs are "
                f"{[s.name for s in inputs]}: name one array after each input (missing {missing})",
                code="dataset_mismatch")
        pairs = [(s, s.name, arrays[s.name]) for s in inputs]
    checked = {spec.name: _check_array(spec, key, array) for spec, key, array in pairs}
    if labels is not None and (labels.dtype.kind not in "iu" or labels.ndim != 1):
        raise EngineError(f"dataset 'labels' must be integers of shape [N] (one class index per sample), "
                          f"got {_describe(labels.dtype.name, labels.shape)}", code="dataset_mismatch")
    counts = {a.shape[0] for a in checked.values()} | ({len(labels)} if labels is not None else set())
    if len(counts) != 1 or 0 in counts:
        raise EngineError(f"the {source} dataset's arrays (and labels) must hold the same, non-zero "
                          f"number of samples; found {sorted(counts)}", code="dataset_mismatch")
    n = min(counts.pop(), max_samples)
    stacked = {spec.name: layout.stacks_samples(_input_shape(spec, array), array.shape) for spec, _, array in pairs}
    # np.array copies a stacked sample whole, 0-d included (ascontiguousarray would make a scalar 1-D)
    batches = [{name: np.array(a[i]) if stacked[name] else np.ascontiguousarray(a[i : i + 1])
                for name, a in checked.items()} for i in range(n)]
    if labels is not None:
        labels = labels[:n]
    return Samples(batches=batches, labels=labels, source=source)


def _synthetic(inputs: list[TensorSpec]) -> Samples:
    for spec in inputs:
        if not spec.shape or any(d is None for d in spec.shape):
            raise EngineError(
                f"the shape of input {spec.name!r} is not recorded in the model, so quantserve cannot "
                "generate test inputs for it; give an evaluation dataset", code="dataset_mismatch")
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(SYNTHETIC_SAMPLES):
        batch = {}
        for spec in inputs:
            shape = [1] + [d if isinstance(d, int) else SYNTHETIC_SEQUENCE for d in spec.shape[1:]]
            dtype = np.dtype(spec.dtype)
            if dtype.kind == "f":
                batch[spec.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind == "b":
                batch[spec.name] = np.ones(shape, dtype)
            elif "mask" in spec.name.lower():
                batch[spec.name] = np.ones(shape, dtype)  # random masks would hide whole rows
            elif "type" in spec.name.lower() or "segment" in spec.name.lower():
                batch[spec.name] = np.zeros(shape, dtype)  # token_type tables often have 2 rows
            else:
                batch[spec.name] = rng.integers(0, 10, size=shape).astype(dtype)
        batches.append(batch)
    return Samples(batches=batches, labels=None, source="synthetic", warnings=[SYNTHETIC_WARNING])


def load_samples(ctx: JobContext, inputs: list[TensorSpec], *, max_samples: int = 256) -> Samples:
    """Batch-1 samples to measure on: evaluation set, else calibration set, else generated inputs."""
    if ctx.evaluation_path is not None:
        return load_npz(Path(ctx.evaluation_path), inputs, max_samples, "evaluation")
    if ctx.calibration_path is not None:
        return load_npz(Path(ctx.calibration_path), inputs, max_samples, "calibration")
    return _synthetic(inputs)


def unpadded(batch: dict[str, np.ndarray], outputs: list[np.ndarray]) -> list[np.ndarray]:
    """Outputs without the positions the sample's attention mask pads out.

    A transformer still computes values at padded positions, which no consumer reads and which
    quantization moves the most: compared with the rest they would understate fidelity (MiniLM's
    last_hidden_state: cosine 0.976 with them, 0.990 without). Only per-position outputs,
    [1, sequence, ...] with the mask's sequence length, lose those positions.
    """
    mask = next((a for name, a in batch.items() if "attention_mask" in name.lower()), None)
    if mask is None or mask.ndim != 2 or mask.shape[0] != 1 or mask.dtype.kind not in "biu":
        return outputs
    keep = mask[0] != 0
    if keep.all() or not keep.any():
        return outputs
    return [o[:, keep] if o.ndim >= 3 and o.shape[:2] == mask.shape else o for o in outputs]


def _run_all(runner: Runner, samples: Samples, which: str,
             progress: Callable[[float], None]) -> list[list[np.ndarray]]:
    outs = []
    step = max(1, len(samples.batches) // 10)
    for i, batch in enumerate(samples.batches):
        try:
            outs.append([np.asarray(o) for o in runner(batch)])
        except EngineError:
            raise
        except Exception as exc:  # a runtime's own error types: say which model and sample failed
            shapes = {k: _describe(v.dtype.name, v.shape) for k, v in batch.items()}
            # the float model failing is the data's fault; the quantized one failing where the float one ran is ours
            code = "evaluation_failed" if which == "float" else "engine_error"
            raise EngineError(f"the {which} model failed on {samples.source} sample {i} {shapes}: {exc}",
                              code=code) from exc
        if i % step == 0:
            progress(i / len(samples.batches))
    return outs


def _latency(float_fn: Callable[[], Any], quant_fn: Callable[[], Any], runs: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    float_fn()
    quant_fn()
    per_round = max(time.perf_counter() - start, 1e-6)
    runs = max(20, min(runs, int(LATENCY_BUDGET_S / per_round)))
    with m.one_torch_thread():
        float_ms, quant_ms = m.interleaved_latency(float_fn, quant_fn, warmup=min(10, runs), runs=runs)
    return float_ms, quant_ms, runs


def measure(ctx: JobContext, float_runner: Runner, quant_runner: Runner, samples: Samples, *,
            original_bytes: int, quantized_bytes: int, runtime: str, layers: list[dict],
            latency_runs: int = 200, extra_warnings: Sequence[str] = (),
            output_names: Sequence[str] | None = None) -> dict:
    """Size, fidelity, accuracy and latency of a quantized model against its float original.

    Fidelity is measured per output (fidelity.outputs) and headlined by the worst one."""
    warnings = [*samples.warnings, *extra_warnings]
    ctx.progress("evaluating", 0.80)
    float_outs = _run_all(float_runner, samples, "float", lambda f: ctx.progress("evaluating", 0.80 + 0.05 * f))
    quant_outs = _run_all(quant_runner, samples, "quantized",
                          lambda f: ctx.progress("evaluating", 0.85 + 0.05 * f))
    if [len(o) for o in float_outs[:1]] != [len(o) for o in quant_outs[:1]]:
        raise EngineError("the quantized model returns a different number of outputs than the float one",
                          code="evaluation_failed")
    first_f, first_q = [o[0] for o in float_outs], [o[0] for o in quant_outs]
    agreement = m.top1_agreement(first_f, first_q)  # None unless the first output is [batch, classes] scores
    float_outs = [unpadded(b, o) for b, o in zip(samples.batches, float_outs, strict=True)]
    quant_outs = [unpadded(b, o) for b, o in zip(samples.batches, quant_outs, strict=True)]
    # every figure is the worst output's: a report never looks better than its weakest output
    outputs = m.per_output(float_outs, quant_outs, output_names)
    worst = min(outputs, key=lambda r: (not r["collapsed_to_zero"], r["cosine"]))
    cos_mean = 0.0 if worst["collapsed_to_zero"] else worst["cosine"]
    cos_min = min(r["cosine_min"] for r in outputs)
    fidelity = {"source": samples.source, "samples": len(float_outs),  # every sample measured, after the cap
                "sqnr_db": min(r["sqnr_db"] for r in outputs),
                "cosine": round(cos_mean, 6), "cosine_min": round(cos_min, 6),
                "top1_agreement": None if agreement is None else round(agreement, 4),
                "worst_output": worst["name"], "outputs": outputs}

    accuracy = None
    if samples.labels is not None:
        acc_f, acc_q = m.accuracy_top1(first_f, samples.labels), m.accuracy_top1(first_q, samples.labels)
        if acc_f is not None and acc_q is not None:
            accuracy = {"metric": "top1", "float": round(acc_f, 4), "quantized": round(acc_q, 4),
                        "delta": round(acc_q - acc_f, 4)}

    ctx.progress("benchmarking", 0.90)
    feed = samples.batches[0]
    float_ms, quant_ms, runs = _latency(lambda: float_runner(feed), lambda: quant_runner(feed), latency_runs)
    ctx.progress("benchmarking", 0.98)
    speedup = float_ms / quant_ms if quant_ms > 0 else 0.0
    ratio = quantized_bytes / original_bytes if original_bytes else 1.0

    if ratio > 0.9:
        warnings.append(f"size did not move: the quantized model is {ratio:.0%} of the original, so most "
                        "weights stayed float")
    dead = [r["name"] for r in outputs if r["collapsed_to_zero"]]
    if dead:
        warnings.append(f"output(s) {', '.join(dead)} collapsed to all zeros where the float model's are not: "
                        "the quantized model lost what they carry; do not serve it")
    if cos_mean < 0.9:
        where = f"output {worst['name']} has" if len(outputs) > 1 else "outputs have"
        warnings.append(f"fidelity collapsed: {where} a mean cosine of {cos_mean:.3f} to the float "
                        f"model's (worst sample {cos_min:.3f}); do not serve this model unchecked")
    elif len(outputs) > 1 and cos_min < 0.9:
        warnings.append(f"some samples lost fidelity: worst per-sample cosine {cos_min:.3f} (output "
                        f"{min(outputs, key=lambda r: r['cosine_min'])['name']})")
    if agreement is not None and agreement < 0.9:
        warnings.append(f"the quantized model picks the same top-1 class as the float model on only "
                        f"{agreement:.0%} of samples")
    if accuracy is not None and accuracy["delta"] < -0.02:
        warnings.append(f"top-1 accuracy fell from {accuracy['float']:.1%} to {accuracy['quantized']:.1%}")
    if speedup < 1.0:
        warnings.append(f"the quantized model is slower than the float one here: {quant_ms:.3f} ms vs "
                        f"{float_ms:.3f} ms per call (batch 1, one thread, {speedup:.2f}x)")

    return {
        "size": {"original_bytes": int(original_bytes), "quantized_bytes": int(quantized_bytes),
                 "ratio": round(ratio, 4)},
        "fidelity": fidelity,
        "accuracy": accuracy,
        "perplexity": None,
        "latency": {"device": str(ctx.device), "runtime": runtime, "batch_size": 1, "threads": 1,
                    "float_ms_p50": round(float_ms, 4), "quantized_ms_p50": round(quant_ms, 4),
                    "speedup": round(speedup, 3), "runs": runs},
        "layers": layers,
        "duration_s": None,
        "warnings": warnings,
    }
