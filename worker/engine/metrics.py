"""Fidelity and latency numbers (ENGINE.md definitions), in pure numpy; every value JSON-safe."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

# SQNR of identical outputs is infinite; JSON has no inf, and 150 dB is far beyond any float32 noise.
SQNR_CAP_DB = 150.0

Outputs = Sequence[Any]  # per sample: an array or a list of arrays (one per model output)


def _flat(outs: Any) -> np.ndarray:
    """All numbers of one sample (or of many), as one float64 vector."""
    if isinstance(outs, np.ndarray | np.generic | int | float):
        return np.asarray(outs, dtype=np.float64).ravel()
    parts = [_flat(o) for o in outs]
    return np.concatenate(parts) if parts else np.zeros(0)


def _finite(value: float) -> float:
    return float(np.clip(np.nan_to_num(value, nan=-SQNR_CAP_DB), -SQNR_CAP_DB, SQNR_CAP_DB))


def sqnr_db(float_outs: Outputs, quant_outs: Outputs) -> float:
    """10*log10(sum f^2 / sum (f-q)^2) over every output of every sample, clipped to +-150 dB."""
    f, q = _flat(float_outs), _flat(quant_outs)
    if f.shape != q.shape:
        raise ValueError(f"float and quantized outputs differ in size: {f.size} vs {q.size}")
    signal, noise = float(np.sum(f * f)), float(np.sum((f - q) ** 2))
    if not np.isfinite(noise) or not np.isfinite(signal):
        return -SQNR_CAP_DB  # a NaN/inf output is a collapse, not a measurement
    if noise == 0.0:
        return SQNR_CAP_DB
    if signal == 0.0:
        return -SQNR_CAP_DB
    return _finite(10.0 * np.log10(signal / noise))


def cosine_per_sample(float_outs: Outputs, quant_outs: Outputs) -> np.ndarray:
    """Cosine similarity of each sample's outputs (all outputs concatenated)."""
    values = []
    for f_sample, q_sample in zip(float_outs, quant_outs, strict=True):
        f, q = _flat(f_sample), _flat(q_sample)
        nf, nq = np.linalg.norm(f), np.linalg.norm(q)
        if not (np.isfinite(nf) and np.isfinite(nq)) or not np.all(np.isfinite(q)):
            values.append(0.0)
        elif nf == 0.0 and nq == 0.0:
            values.append(1.0)  # both all-zero: identical
        elif nf == 0.0 or nq == 0.0:
            values.append(0.0)
        else:
            values.append(float(np.dot(f, q) / (nf * nq)))
    return np.asarray(values, dtype=np.float64)


def cosine(float_outs: Outputs, quant_outs: Outputs) -> tuple[float, float]:
    """(mean, min) of the per-sample cosine."""
    values = cosine_per_sample(float_outs, quant_outs)
    if values.size == 0:
        return 1.0, 1.0
    return float(values.mean()), float(values.min())


def collapsed_to_zero(float_outs: Outputs, quant_outs: Outputs) -> bool:
    """The quantized output is all zeros on every sample while the float one is not: a dead output (a
    detector map that lost everything), which a mean over the other outputs can hide."""
    f, q = _flat(float_outs), _flat(quant_outs)
    return bool(q.size and not np.any(q) and np.any(f))


def per_output(float_outs: Outputs, quant_outs: Outputs, names: Sequence[str] | None = None) -> list[dict]:
    """Fidelity of each model output on its own: float_outs[sample][output]. ENGINE.md: a detector kept a
    quarter of its detections while a cosine over all outputs read 0.956; the worst output tells."""
    count = len(float_outs[0]) if len(float_outs) else 0
    rows = []
    for k in range(count):
        f, q = [sample[k] for sample in float_outs], [sample[k] for sample in quant_outs]
        mean, low = cosine(f, q)
        rows.append({"name": names[k] if names and k < len(names) else f"output_{k}",
                     "sqnr_db": round(sqnr_db(f, q), 2), "cosine": round(mean, 6), "cosine_min": round(low, 6),
                     "collapsed_to_zero": collapsed_to_zero(f, q)})
    return rows


def worst_cosine(float_outs: Outputs, quant_outs: Outputs) -> tuple[float, float]:
    """(mean, min) per-sample cosine of the worst output; an output collapsed to zeros scores 0."""
    rows = per_output(float_outs, quant_outs)
    if not rows:
        return 1.0, 1.0
    worst = min(rows, key=lambda r: (not r["collapsed_to_zero"], r["cosine"]))
    return (0.0 if worst["collapsed_to_zero"] else worst["cosine"]), min(r["cosine_min"] for r in rows)


def _argmax_rows(logits: Sequence[np.ndarray]) -> np.ndarray | None:
    """argmax of each sample's (batch-1) output; None unless every one is [1, classes] scores."""
    arrays = [np.asarray(x) for x in logits]
    # [1, seq, hidden], [1, 1, hidden], images, scalars: an argmax over them means nothing
    if not arrays or any(a.ndim != 2 or a.shape[0] != 1 or a.shape[1] < 2 for a in arrays):
        return None
    if not all(np.issubdtype(a.dtype, np.floating) for a in arrays):
        return None
    return np.asarray([int(np.argmax(a.reshape(-1))) for a in arrays])


def top1_agreement(float_logits: Sequence[np.ndarray], quant_logits: Sequence[np.ndarray]) -> float | None:
    """Share of samples whose argmax matches; None when the output is not one score vector per sample."""
    f, q = _argmax_rows(float_logits), _argmax_rows(quant_logits)
    if f is None or q is None or f.size == 0:
        return None
    return float(np.mean(f == q))


def accuracy_top1(logits: Sequence[np.ndarray], labels: np.ndarray) -> float | None:
    """Share of samples whose argmax equals the label; None when not classifier-like."""
    predicted = _argmax_rows(logits)
    labels = np.asarray(labels).reshape(-1)
    if predicted is None or predicted.size == 0 or predicted.size != labels.size:
        return None
    return float(np.mean(predicted == labels))


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Latency as metrics.latency takes it (batch 1, one thread): torch's intra-op threads pinned to one while
    inside, where the caller already uses torch; torch is never imported here."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def interleaved_latency(float_fn: Callable[[], Any], quant_fn: Callable[[], Any], warmup: int,
                        runs: int) -> tuple[float, float]:
    """Median ms per call of each function, calls alternated in one process (interleaved_latencies)."""
    float_ms, quant_ms = interleaved_latencies([float_fn, quant_fn], warmup, runs)
    return float_ms, quant_ms


def interleaved_latencies(fns: Sequence[Callable[[], Any]], warmup: int, runs: int) -> list[float]:
    """Median ms per call of each function, one call of each per round in one process.

    Alternating (and reversing the order every round) spreads CPU frequency changes and noisy neighbours
    evenly over every model, which back-to-back blocks of runs do not; method auto compares all of its
    candidates this way, so their figures share one stretch of time.
    """
    for _ in range(max(0, warmup)):
        for fn in fns:
            fn()
    timings: list[list[int]] = [[] for _ in fns]
    order = list(zip(fns, timings, strict=True))
    for i in range(max(1, runs)):
        for fn, sink in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter_ns()
            fn()
            sink.append(time.perf_counter_ns() - start)
    return [float(np.median(ns)) / 1e6 for ns in timings]


def fake_quantize_weight(w: np.ndarray, *, symmetric: bool, axis: int | None, reduce_range: bool = False
                         ) -> np.ndarray:
    """w after onnxruntime's int8 (symmetric) or uint8 weight quantization, per channel along axis."""
    w = np.asarray(w, dtype=np.float64)
    reduce_axes = None if axis is None else tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    lo = np.minimum(np.min(w, axis=reduce_axes, keepdims=True), 0.0)
    hi = np.maximum(np.max(w, axis=reduce_axes, keepdims=True), 0.0)
    if symmetric:
        qmin, qmax = (-64, 63) if reduce_range else (-128, 127)
        absmax = np.maximum(-lo, hi)
        scale, zero = 2 * absmax / (qmax - qmin), 0.0
    else:
        qmin, qmax = (0, 127) if reduce_range else (0, 255)
        scale = (hi - lo) / (qmax - qmin)
        zero = np.round(qmin - lo / np.where(scale == 0, 1, scale))
    scale = np.where(scale == 0, 1.0, scale)
    return (np.clip(np.round(w / scale) + zero, qmin, qmax) - zero) * scale


def fake_quantize_activation(x: np.ndarray) -> np.ndarray:
    """x after DynamicQuantizeLinear: per-tensor uint8 over a range that includes zero."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255 or 1.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def dynamic_matmul_sqnr(activations: Sequence[np.ndarray], weight: np.ndarray, *, per_channel: bool,
                        symmetric: bool, reduce_range: bool = False) -> float:
    """SQNR of one MatMul (x @ W, W [K, N]) under dynamic int8, each call quantized on its own.

    It isolates a layer's own error (float inputs in, both quantizations applied), which is what
    ranks layers for keeping the sensitive ones in float.
    """
    w_q = fake_quantize_weight(weight, symmetric=symmetric, axis=-1 if per_channel else None,
                               reduce_range=reduce_range)
    w = np.asarray(weight, dtype=np.float64)
    f_outs, q_outs = [], []
    for x in activations:
        x = np.asarray(x, dtype=np.float64)
        f_outs.append(x @ w)
        q_outs.append(fake_quantize_activation(x) @ w_q)
    return sqnr_db(f_outs, q_outs)


def smoothing_scales(x_max: np.ndarray, activations: Sequence[np.ndarray], weights: Sequence[np.ndarray], *,
                     per_channel: bool, symmetric: bool, alphas: Sequence[float], reduce_range: bool = False
                     ) -> tuple[np.ndarray | None, float, float]:
    """SmoothQuant's per-input-channel scale s for MatMuls that share one input (x @ W, each W [K, N]):
    x / s and s * W compute the same product, but x's outlier channels shrink, so the per-tensor
    activation scale of dynamic int8 no longer wastes its 256 steps on them.

    s = max|x_k|^alpha / max|W_k|^(1 - alpha) (x_max: max|x_k| over as many samples as can be had; a
    channel whose outliers they miss stays an outlier), alpha chosen to maximise the worst of the MatMuls'
    own SQNR on `activations`. Returns (s, or None when no alpha beats leaving x alone; the worst SQNR
    without it; the worst SQNR with it).
    """
    xs = [np.asarray(x, dtype=np.float64) for x in activations]
    ws = [np.asarray(w, dtype=np.float64) for w in weights]
    x_max = np.asarray(x_max, dtype=np.float64)
    w_max = np.max([np.abs(w).max(1) for w in ws], axis=0)

    def worst(scale: np.ndarray) -> float:
        return min(dynamic_matmul_sqnr([x / scale for x in xs], w * scale[:, None], per_channel=per_channel,
                                       symmetric=symmetric, reduce_range=reduce_range) for w in ws)

    plain = worst(np.ones_like(x_max))
    best: tuple[np.ndarray | None, float] = (None, plain)
    for alpha in alphas:
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = x_max**alpha / w_max ** (1 - alpha)
        # a channel that is always zero, or whose weights are, keeps its scale
        scale = np.where(np.isfinite(scale) & (scale > 0), np.clip(scale, 1e-4, 1e4), 1.0)
        value = worst(scale)
        if value > best[1]:
            best = (scale, value)
    return best[0], plain, best[1]
