"""What a user measures on an artifact, by hand: runs it on the evaluation set, cosine per output, the task.

Shared by tests/zoo/test_zoo.py and bench/zoo.py; independent of the engine's own metrics code, so the two
can be compared. Definitions follow ENGINE.md: cosine per sample, then mean and min; judged by the worst
output; positions an attention mask pads out are left out of per-position outputs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.zoo.corpus import ZooModel

Feed = dict[str, Any]  # input name -> array (or a Python int for a TorchScript `int` argument)
Runner = Callable[[Feed], list[np.ndarray]]


# ---- running ------------------------------------------------------------------------------------------

class OnnxRunner:
    """One onnxruntime CPU session: one thread, default graph optimizations (what a user gets)."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feed: Feed) -> list[np.ndarray]:
        return self.session.run(None, feed)


class TorchScriptRunner:
    """torch.jit.load on CPU, one thread; `int` arguments get Python ints, as the module's schema asks."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self.module = torch.jit.load(str(path), map_location="cpu").eval()
        arguments = [a for a in self.module.forward.schema.arguments if a.name != "self"]
        self.kinds = {a.name: str(a.type) for a in arguments}
        self.ranks: dict[str, int | None] = {name: (0 if kind == "int" else None) for name, kind in self.kinds.items()}
        self.output_names = ["output"]

    def __call__(self, feed: Feed) -> list[np.ndarray]:
        import torch
        from torch.utils import _pytree as pytree

        args = [int(np.asarray(feed[n]).reshape(-1)[0]) if kind == "int" else torch.from_numpy(np.asarray(feed[n]))
                for n, kind in self.kinds.items()]
        with torch.no_grad():
            result = self.module(*args)
        leaves = [leaf.numpy() for leaf in pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)]
        if len(leaves) != len(self.output_names):
            self.output_names = [f"output_{i}" for i in range(len(leaves))]
        return leaves

    def reset(self) -> None:
        if hasattr(self.module, "reset_states"):
            self.module.reset_states()


def load_runner(path: Path, fmt: str, threads: int = 1) -> OnnxRunner | TorchScriptRunner:
    return OnnxRunner(path, threads) if fmt == "onnx" else TorchScriptRunner(path, threads)


def sample_feeds(npz_path: Path, ranks: dict[str, int | None], limit: int | None = None) -> list[Feed]:
    """Batch-1 feeds from a zoo .npz: an array one rank above its input holds stacked samples (a[i]);
    otherwise its first axis is the batch axis (a[i:i+1]). Unknown rank (TorchScript): 1-D arrays are
    stacked scalars."""
    with np.load(str(npz_path), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files if name in ranks}
    count = min(len(a) for a in arrays.values())
    count = count if limit is None else min(count, limit)
    feeds = []
    for i in range(count):
        feed = {}
        for name, array in arrays.items():
            rank = ranks[name]
            stacked = array.ndim == rank + 1 if rank is not None else array.ndim == 1
            feed[name] = np.ascontiguousarray(array[i] if stacked else array[i : i + 1])
        feeds.append(feed)
    return feeds


def run_all(runner: Runner, feeds: list[Feed]) -> list[list[np.ndarray]]:
    if isinstance(runner, TorchScriptRunner):
        runner.reset()  # a stateful module sees the same sequence from the same start
    return [[np.asarray(o) for o in runner(feed)] for feed in feeds]


# ---- fidelity -----------------------------------------------------------------------------------------

def _unpadded(feed: Feed, output: np.ndarray) -> np.ndarray:
    mask = next((np.asarray(v) for k, v in feed.items() if "attention_mask" in k.lower()), None)
    if mask is None or mask.ndim != 2 or mask.shape[0] != 1 or output.ndim < 3 or output.shape[:2] != mask.shape:
        return output
    keep = mask[0] != 0
    return output[:, keep] if keep.any() else output


def cosine(f: np.ndarray, q: np.ndarray) -> float:
    f, q = np.asarray(f, np.float64).ravel(), np.asarray(q, np.float64).ravel()
    if f.shape != q.shape or not np.all(np.isfinite(q)):
        return 0.0
    nf, nq = np.linalg.norm(f), np.linalg.norm(q)
    if nf == 0.0 and nq == 0.0:
        return 1.0
    if nf == 0.0 or nq == 0.0:
        return 0.0
    return float(np.dot(f, q) / (nf * nq))


@dataclass
class Fidelity:
    per_output: dict[str, dict[str, float]]  # output name -> {"cosine": mean over samples, "cosine_min": min}

    @property
    def worst(self) -> tuple[str, float, float]:
        """(name, mean, min) of the output with the lowest per-sample minimum."""
        name = min(self.per_output, key=lambda n: (self.per_output[n]["cosine_min"], self.per_output[n]["cosine"]))
        return name, self.per_output[name]["cosine"], self.per_output[name]["cosine_min"]


def fidelity(names: list[str], feeds: list[Feed], float_outs: list[list[np.ndarray]],
             quant_outs: list[list[np.ndarray]]) -> Fidelity:
    per_output = {}
    for k, name in enumerate(names):
        values = [cosine(_unpadded(feed, f[k]), _unpadded(feed, q[k]))
                  for feed, f, q in zip(feeds, float_outs, quant_outs, strict=True)]
        per_output[name] = {"cosine": float(np.mean(values)), "cosine_min": float(np.min(values))}
    return Fidelity(per_output)


# ---- task checks --------------------------------------------------------------------------------------

@dataclass
class TaskCheck:
    label: str  # what was measured, e.g. "top-1 agreement"
    value: float | None  # higher is better, 1.0 = same as float; None when it does not apply
    detail: str = ""


def _top1(f: list[list[np.ndarray]], q: list[list[np.ndarray]]) -> TaskCheck:
    same = [int(np.argmax(a[0])) == int(np.argmax(b[0])) for a, b in zip(f, q, strict=True)]
    return TaskCheck("top-1 agreement", float(np.mean(same)))


def _mask_iou(f: list[list[np.ndarray]], q: list[list[np.ndarray]], threshold: float) -> TaskCheck:
    ious = []
    for a, b in zip(f, q, strict=True):
        fm, qm = a[0] > threshold, b[0] > threshold
        union = np.logical_or(fm, qm).sum()
        ious.append(1.0 if union == 0 else float(np.logical_and(fm, qm).sum() / union))
    return TaskCheck(f"mask IoU@{threshold}", float(np.mean(ious)), f"min {min(ious):.3f}")


def _ctc_decode(probabilities: np.ndarray) -> tuple[int, ...]:
    best = probabilities.reshape(-1, probabilities.shape[-1]).argmax(-1)
    return tuple(int(c) for i, c in enumerate(best) if c != 0 and (i == 0 or c != best[i - 1]))


def _ctc_text(f: list[list[np.ndarray]], q: list[list[np.ndarray]]) -> TaskCheck:
    same = [_ctc_decode(a[0]) == _ctc_decode(b[0]) for a, b in zip(f, q, strict=True)]
    return TaskCheck("same text read", float(np.mean(same)))


def _cell_iou(f_cells: list[np.ndarray], q_cells: list[np.ndarray]) -> tuple[float, int, float]:
    inter = sum(int(np.logical_and(a, b).sum()) for a, b in zip(f_cells, q_cells, strict=True))
    union = sum(int(np.logical_or(a, b).sum()) for a, b in zip(f_cells, q_cells, strict=True))
    found = sum(int(a.sum()) for a in f_cells)
    return (1.0 if union == 0 else inter / union), found, (inter / found if found else 1.0)


def yolo_check(f: list[list[np.ndarray]], q: list[list[np.ndarray]], boxes: int, threshold: float) -> TaskCheck:
    """(anchor, class) cells scoring above the model's own threshold, float vs quantized, as IoU of the
    two sets (before NMS). Without any float detection, the cosine of the class-score rows (min over
    samples): a cosine over the whole output would be ruled by the box coordinates (0..320)."""
    f_scores = [a[0][0, boxes:] for a in f]
    q_scores = [b[0][0, boxes:] for b in q]
    iou, found, kept = _cell_iou([s > threshold for s in f_scores], [s > threshold for s in q_scores])
    if found:
        return TaskCheck(f"detection IoU@{threshold}", iou, f"{found} float cells, {kept:.0%} kept")
    worst = min(cosine(a, b) for a, b in zip(f_scores, q_scores, strict=True))
    return TaskCheck("class-score cosine min", worst, f"no float detection above {threshold}")


def picodet_check(f: list[list[np.ndarray]], q: list[list[np.ndarray]], score_outputs: int,
                  threshold: float) -> TaskCheck:
    """Cells above the score threshold over the class-score heads (the first `score_outputs` outputs)."""
    f_cells = [np.concatenate([(o > threshold).ravel() for o in a[:score_outputs]]) for a in f]
    q_cells = [np.concatenate([(o > threshold).ravel() for o in b[:score_outputs]]) for b in q]
    iou, found, kept = _cell_iou(f_cells, q_cells)
    return TaskCheck(f"detection IoU@{threshold}", iou, f"{found} float cells, {kept:.0%} kept")


def _vad(f: list[list[np.ndarray]], q: list[list[np.ndarray]], threshold: float) -> TaskCheck:
    same = [bool(a[0].ravel()[0] >= threshold) == bool(b[0].ravel()[0] >= threshold) for a, b in zip(f, q, strict=True)]
    return TaskCheck("speech decision agreement", float(np.mean(same)))


def _embedding(feeds: list[Feed], f: list[list[np.ndarray]], q: list[list[np.ndarray]]) -> TaskCheck:
    """Mean-pooled sentence embedding (what all-MiniLM-L6-v2 serves), cosine min over sentences."""
    values = []
    for feed, a, b in zip(feeds, f, q, strict=True):
        mask = np.asarray(feed["attention_mask"], np.float64)[..., None]
        fe = (a[0] * mask).sum(1) / mask.sum(1)
        qe = (b[0] * mask).sum(1) / mask.sum(1)
        values.append(cosine(fe, qe))
    return TaskCheck("embedding cosine min", float(min(values)), f"mean {np.mean(values):.4f}")


def task_check(model: ZooModel, feeds: list[Feed], f: list[list[np.ndarray]],
               q: list[list[np.ndarray]]) -> TaskCheck:
    options = model.task_options
    if model.task == "top1":
        return _top1(f, q)
    if model.task == "mask_iou":
        return _mask_iou(f, q, options["threshold"])
    if model.task == "ctc_text":
        return _ctc_text(f, q)
    if model.task == "yolo":
        return yolo_check(f, q, options["boxes"], options["threshold"])
    if model.task == "picodet":
        return picodet_check(f, q, options["score_outputs"], options["threshold"])
    if model.task == "vad":
        return _vad(f, q, options["threshold"])
    if model.task == "embedding":
        return _embedding(feeds, f, q)
    raise ValueError(f"unknown task {model.task!r}")


# ---- speed --------------------------------------------------------------------------------------------

def interleaved_ms(float_fn: Callable[[], Any], quant_fn: Callable[[], Any], budget_s: float,
                   min_runs: int = 10, max_runs: int = 400) -> tuple[float, float, int]:
    """Median ms of each, calls alternated (order swapped every round) within a time budget."""
    for _ in range(2):
        float_fn()
        quant_fn()
    start = time.perf_counter()
    float_fn()
    quant_fn()
    runs = int(min(max_runs, max(min_runs, budget_s / max(time.perf_counter() - start, 1e-6))))
    f_ns: list[int] = []
    q_ns: list[int] = []
    for i in range(runs):
        pairs = [(float_fn, f_ns), (quant_fn, q_ns)]
        for fn, sink in pairs if i % 2 == 0 else pairs[::-1]:
            t0 = time.perf_counter_ns()
            fn()
            sink.append(time.perf_counter_ns() - t0)
    return statistics.median(f_ns) / 1e6, statistics.median(q_ns) / 1e6, runs
