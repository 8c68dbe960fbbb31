"""Calibration for ONNX static quantization: samples in, onnxruntime's tensor ranges out."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine.errors import EngineError

if TYPE_CHECKING:
    from worker.engine.config import StaticConfig
    from worker.engine.context import JobContext

# Our names -> onnxruntime's CalibrationMethod. "histogram" is Distribution, whose int8 range is the
# symmetric span of the histogram (its avg/std are for float8).
ALGORITHMS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile", "histogram": "Distribution"}
# onnxruntime's Entropy defaults to 128 histogram bins and 128 quantized bins, so its KL search has exactly one
# threshold to try, the full span: entropy ranges were min-max ranges, byte-identical artifacts (seen on the digits
# CNN and on MiniLM). More bins than quantized bins give it thresholds to choose from; TensorRT's method uses 2048,
# but onnxruntime's search is a Python loop (0.5 s a tensor at 2048 on the digits CNN, 0.07 s at 512).
ENTROPY_OPTIONS = {"num_bins": 512, "num_quantized_bins": 128}


def _reader(batches: list[dict[str, np.ndarray]], progress: Any) -> Any:
    """A CalibrationDataReader over batch-1 samples that reports progress as it is read."""
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.index = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.index >= len(batches):
                return None
            if self.index % max(1, len(batches) // 20) == 0:
                progress(self.index / len(batches))
            self.index += 1
            return batches[self.index - 1]

        def __len__(self) -> int:
            return len(batches)

    return Batches()


def calibrate(ctx: JobContext, model_path: Path, op_types: list[str], batches: list[dict[str, np.ndarray]],
               scratch: Path) -> tuple[Any, str, list[str]]:
    """Tensor ranges from the calibration samples; the histogram methods cannot take infinite values, so
    a model that produces them is calibrated with min-max instead (those tensors stay float anyway)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    config: StaticConfig = ctx.config
    algorithm = config.calibration.algorithm
    options = ({"percentile": config.calibration.percentile} if algorithm == "percentile"
               else ENTROPY_OPTIONS if algorithm == "entropy" else {})

    def collect(method_name: str) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print their progress
            calibrator = create_calibrator(
                model_path, op_types, augmented_model_path=str(scratch / "augmented.onnx"),
                calibrate_method=CalibrationMethod[method_name], extra_options=options)
            calibrator.collect_data(_reader(batches, lambda f: ctx.progress("calibrating", 0.15 + 0.3 * f)))
            return calibrator.compute_data()

    try:
        return collect(ALGORITHMS[algorithm]), ALGORITHMS[algorithm], []
    except ValueError as exc:
        if "not finite" not in str(exc):
            raise EngineError(f"calibration failed: {exc}", code="evaluation_failed") from exc
        ctx.log("warning", f"{algorithm} calibration failed on infinite values ({exc}); using minmax")
        note = (f"{algorithm} calibration cannot handle the infinite values this model produces, so it was "
                "calibrated with minmax instead")
    except Exception as exc:  # onnxruntime's own errors while running the calibration samples
        raise EngineError(f"calibration failed: {exc}", code="evaluation_failed") from exc
    return collect("MinMax"), "MinMax", [note]


AUTO_CANDIDATES = ("minmax", "percentile", "entropy")  # "auto" picks among these; the first wins a tie
MIN_HELD_OUT = 8


def held_out_split(batches: list[dict[str, np.ndarray]]) -> tuple[list, list]:
    """(fit, held out): the last quarter judges the ranges the rest chose; with too few samples, all do both."""
    held = max(MIN_HELD_OUT, len(batches) // 4)
    if len(batches) < 2 * held:
        return batches, batches
    return batches[:-held], batches[-held:]


def choose_algorithm(ctx: JobContext, model_path: Path, op_types: list[str], batches: list[dict[str, np.ndarray]],
                     scratch: Path, score: Callable[[Any, str, list[dict[str, np.ndarray]]], float]
                     ) -> tuple[str, dict[str, Any]]:
    """The calibration algorithm whose ranges, fitted on most samples, score best on the rest.

    score(ranges, onnxruntime method name, held-out samples) quantizes with those ranges and measures. No
    single algorithm wins everywhere (ENGINE.md: equal on the digits CNN; percentile clips the outliers a
    detector's score maps need, entropy the long tails of a transformer), so it is measured per model."""
    fit, held = held_out_split(batches)
    scores: dict[str, float] = {}
    for algorithm in AUTO_CANDIDATES:
        calibration = ctx.config.calibration.model_copy(update={"algorithm": algorithm})
        job = dataclasses.replace(ctx, config=ctx.config.model_copy(update={"calibration": calibration}))
        try:
            ranges, method, _ = calibrate(job, model_path, op_types, fit, scratch)
            scores[algorithm] = round(score(ranges, method, held), 6)
        except Exception as exc:  # noqa: BLE001 - a candidate that fails is no candidate; the others may hold
            ctx.log("warning", f"calibration candidate {algorithm} failed: {type(exc).__name__}: {exc}")
    if not scores:
        # every trial failed: calibrate with the first and let the real quantization say why, in its words
        ctx.log("warning", f"no calibration candidate could be scored; using {AUTO_CANDIDATES[0]}")
        return AUTO_CANDIDATES[0], {"chosen": AUTO_CANDIDATES[0], "held_out_cosine": {}, "fit_samples": len(fit),
                                    "held_out_samples": len(held), "held_out_is_fit": held is fit}
    best = max(AUTO_CANDIDATES, key=lambda a: scores.get(a, float("-inf")))
    ctx.log("info", f"calibration: {best} chosen on {len(held)} held-out samples ({scores})")
    return best, {"chosen": best, "held_out_cosine": scores, "fit_samples": len(fit), "held_out_samples": len(held),
                  "held_out_is_fit": held is fit}


def non_finite(ranges: Any) -> list[str]:
    """Tensors whose calibrated range is not finite (an attention mask of -inf, an overflow)."""
    bad = []
    for name, data in ranges.items():
        lowest, highest = data.range_value
        if not (np.all(np.isfinite(lowest)) and np.all(np.isfinite(highest))):
            bad.append(name)
    return sorted(bad)


