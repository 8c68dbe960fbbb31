"""metrics.py numbers and evaluate.py's samples and measure(), on hand-made arrays and fake runners."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from tests import models
from worker.engine import EngineError, JobContext
from worker.engine import metrics as m
from worker.engine.config import DynamicConfig
from worker.engine.evaluate import SYNTHETIC_WARNING, Samples, load_samples, measure
from worker.engine.types import Method, ModelFormat, TensorSpec

X_SPEC = TensorSpec("x", "float32", ["batch", 1, 8, 8])


def _ctx(tmp_path: Path, **paths: Path) -> JobContext:
    return JobContext(model_path=tmp_path / "m.onnx", format=ModelFormat.onnx, method=Method.dynamic,
                      config=DynamicConfig(), work_dir=tmp_path, **paths)


def test_sqnr_matches_the_definition_and_stays_json_safe() -> None:
    f = [[np.array([1.0, 1.0])], [np.array([2.0])]]
    q = [[np.array([1.0, 0.0])], [np.array([2.0])]]
    assert m.sqnr_db(f, q) == pytest.approx(10 * np.log10(6.0 / 1.0))
    assert m.sqnr_db(f, f) == m.SQNR_CAP_DB
    assert m.sqnr_db([np.zeros(3)], [np.ones(3)]) == -m.SQNR_CAP_DB
    assert m.sqnr_db([np.ones(3)], [np.array([1.0, np.nan, 1.0])]) == -m.SQNR_CAP_DB
    json.dumps({"a": m.sqnr_db(f, f), "b": m.sqnr_db([np.zeros(3)], [np.ones(3)])}, allow_nan=False)


def test_cosine_is_per_sample_with_mean_and_min() -> None:
    f = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.zeros(2)]
    q = [np.array([1.0, 0.0]), np.array([1.0, 1.0]), np.zeros(2)]
    mean, worst = m.cosine(f, q)
    assert worst == pytest.approx(np.sqrt(0.5))
    assert mean == pytest.approx((1 + np.sqrt(0.5) + 1) / 3)
    assert m.cosine_per_sample([np.ones(2)], [np.zeros(2)]).tolist() == [0.0]


def test_top1_agreement_and_accuracy_need_score_vectors() -> None:
    f = [np.array([[0.1, 0.9]]), np.array([[0.8, 0.2]]), np.array([[0.3, 0.7]]), np.array([[0.6, 0.4]])]
    q = [np.array([[0.2, 0.8]]), np.array([[0.1, 0.9]]), np.array([[0.4, 0.6]]), np.array([[0.9, 0.1]])]
    assert m.top1_agreement(f, q) == 0.75
    assert m.accuracy_top1(f, np.array([1, 0, 0, 0])) == 0.75
    assert m.top1_agreement([np.ones((1, 5, 3))], [np.ones((1, 5, 3))]) is None  # a sequence, not scores
    # hidden states of a one-token sequence, or an output without a batch axis: not [batch, classes] either
    assert m.top1_agreement([np.ones((1, 1, 384))], [np.ones((1, 1, 384))]) is None
    assert m.top1_agreement([np.ones(10)], [np.ones(10)]) is None
    assert m.accuracy_top1(f, np.array([1, 0])) is None  # label count does not match


def test_interleaved_latency_alternates_and_reports_medians() -> None:
    calls: list[str] = []
    float_ms, quant_ms = m.interleaved_latency(lambda: calls.append("f"), lambda: calls.append("q"),
                                               warmup=2, runs=10)
    assert calls.count("f") == calls.count("q") == 12
    assert "".join(calls[4:8]) == "fqqf"  # the order flips every round
    assert 0 <= float_ms < 5 and 0 <= quant_ms < 5


def test_fake_quantization_error_is_bounded_by_half_a_step() -> None:
    w = np.random.default_rng(0).standard_normal((64, 32))
    step = np.abs(w).max(axis=0) / 127.5
    err = np.abs(m.fake_quantize_weight(w, symmetric=True, axis=-1) - w)
    assert np.all(err <= step / 2 + 1e-12)
    assert np.abs(m.fake_quantize_weight(w, symmetric=False, axis=None) - w).max() <= np.ptp(w) / 255


def test_an_outlier_channel_lowers_dynamic_matmul_sqnr() -> None:
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((32, 16)), rng.standard_normal((8, 32))
    clean = m.dynamic_matmul_sqnr([x], w, per_channel=True, symmetric=True)
    x[:, 3] *= 500  # one outlier channel whose weights are small: the output stays normal...
    w[3] /= 500  # ...but the per-tensor activation scale is now 500x coarser for every other channel
    assert clean > 35 and m.dynamic_matmul_sqnr([x], w, per_channel=True, symmetric=True) < clean - 20


def test_samples_come_from_evaluation_with_labels_cast_within_kind(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((10, 1, 8, 8))  # float64: cast to the model's float32
    path = models.save_npz(tmp_path / "e.npz", images=x, labels=np.arange(10))
    samples = load_samples(_ctx(tmp_path, evaluation_path=path), [X_SPEC], max_samples=4)
    assert samples.source == "evaluation" and not samples.warnings
    assert len(samples.batches) == 4 and samples.batches[0]["x"].shape == (1, 1, 8, 8)
    assert samples.batches[0]["x"].dtype == np.float32 and samples.labels.tolist() == [0, 1, 2, 3]


def test_calibration_set_is_used_when_no_evaluation_set(tmp_path: Path) -> None:
    path = models.save_npz(tmp_path / "c.npz", x=np.zeros((3, 1, 8, 8), np.float32))
    samples = load_samples(_ctx(tmp_path, calibration_path=path), [X_SPEC])
    assert samples.source == "calibration" and samples.labels is None and len(samples.batches) == 3


def test_synthetic_samples_follow_the_specs_and_warn(tmp_path: Path) -> None:
    specs = [TensorSpec("input_ids", "int64", ["batch", "sequence"]),
             TensorSpec("attention_mask", "int64", ["batch", "sequence"])]
    samples = load_samples(_ctx(tmp_path), specs)
    assert samples.source == "synthetic" and samples.warnings == [SYNTHETIC_WARNING]
    assert len(samples.batches) == 32
    batch = samples.batches[0]
    assert batch["input_ids"].dtype == np.int64 and batch["input_ids"].shape[0] == 1
    assert batch["input_ids"].min() >= 0 and np.all(batch["attention_mask"] == 1)


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.zeros((100, 64), np.int64)},
     "input 'x' expects float32[?, 1, 8, 8]; dataset array 'x' is int64[100, 64]"),
    ({"x": np.zeros((5, 1, 8, 9), np.float32)},
     "input 'x' expects float32[?, 1, 8, 8]; dataset array 'x' is float32[5, 1, 8, 9]"),
    ({"x": np.zeros((5, 1, 8, 8), np.float32), "labels": np.arange(4)}, "same, non-zero number of samples"),
    ({"x": np.zeros((5, 1, 8, 8), np.float32), "labels": np.zeros(5)}, "'labels' must be integers"),
    ({"x": np.zeros((5, 1, 8, 8), np.float32), "labels": np.eye(5, dtype=np.int64)}, "of shape [N]"),
])
def test_mismatching_datasets_say_what_to_fix(tmp_path: Path, arrays: dict, message: str) -> None:
    path = models.save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(EngineError, match=re.escape(message)):
        load_samples(_ctx(tmp_path, evaluation_path=path), [X_SPEC])


def test_missing_input_names_and_pickles_are_refused(tmp_path: Path) -> None:
    specs = [X_SPEC, TensorSpec("mask", "float32", ["batch", 8])]
    path = models.save_npz(tmp_path / "one.npz", x=np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(EngineError, match=r"missing \['mask'\]"):
        load_samples(_ctx(tmp_path, evaluation_path=path), specs)
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(EngineError, match="not a readable .npz"):
        load_samples(_ctx(tmp_path, evaluation_path=pickled), [X_SPEC])


def test_unknown_shapes_without_dataset_ask_for_one(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="give an evaluation dataset"):
        load_samples(_ctx(tmp_path), [TensorSpec("x", "float32", [])])


def _samples(n: int = 6, labels: bool = True) -> Samples:
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(n)]
    return Samples(batches=batches, labels=np.zeros(n, np.int64) if labels else None, source="evaluation")


def test_measure_reports_faithful_model_without_warnings(tmp_path: Path) -> None:
    stages: list[str] = []
    ctx = _ctx(tmp_path, progress=lambda stage, fraction: stages.append(stage))
    runner = lambda feed: [feed["x"] * 2.0]  # noqa: E731
    near = lambda feed: [feed["x"] * 2.0 + 1e-4]  # noqa: E731
    metrics = measure(ctx, runner, near, _samples(), original_bytes=1000, quantized_bytes=260,
                      runtime="numpy", layers=[], latency_runs=20)
    assert metrics["size"] == {"original_bytes": 1000, "quantized_bytes": 260, "ratio": 0.26}
    assert metrics["fidelity"]["cosine"] > 0.999 and metrics["fidelity"]["samples"] == 6
    assert metrics["accuracy"]["metric"] == "top1" and metrics["duration_s"] is None
    assert metrics["latency"]["runs"] == 20 and metrics["latency"]["runtime"] == "numpy"
    assert not [w for w in metrics["warnings"] if "slower" not in w]  # speed of two lambdas is noise
    assert "evaluating" in stages and "benchmarking" in stages
    json.dumps(metrics, allow_nan=False)


def test_measure_warns_on_unmoved_size_collapse_and_slowness(tmp_path: Path) -> None:
    def slow_and_wrong(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        time.sleep(0.002)
        return [-feed["x"]]

    metrics = measure(_ctx(tmp_path), lambda feed: [feed["x"]], slow_and_wrong, _samples(labels=False),
                      original_bytes=1000, quantized_bytes=990, runtime="numpy", layers=[],
                      latency_runs=20, extra_warnings=["from the method"])
    text = " | ".join(metrics["warnings"])
    assert metrics["warnings"][0] == "from the method"
    assert "size did not move" in text and "fidelity collapsed" in text and "slower" in text
    assert "same top-1 class" in text and metrics["accuracy"] is None
    assert metrics["latency"]["speedup"] < 1


def test_measure_skips_padded_positions_and_gives_no_top1_on_hidden_states(tmp_path: Path) -> None:
    mask = np.array([[1, 1, 1, 0, 0]], np.int64)
    batches = [{"input_ids": np.ones((1, 5), np.int64), "attention_mask": mask} for _ in range(3)]
    samples = Samples(batches=batches, labels=None, source="evaluation")
    hidden = np.random.default_rng(0).standard_normal((1, 5, 8)).astype(np.float32)
    noisy_padding = hidden.copy()
    noisy_padding[:, 3:] = -noisy_padding[:, 3:]  # quantization moves padded positions most; nothing reads them
    metrics = measure(_ctx(tmp_path), lambda feed: [hidden], lambda feed: [noisy_padding], samples,
                      original_bytes=1000, quantized_bytes=260, runtime="numpy", layers=[], latency_runs=20)
    assert metrics["fidelity"]["cosine"] == 1.0 and metrics["fidelity"]["sqnr_db"] == m.SQNR_CAP_DB
    assert metrics["fidelity"]["top1_agreement"] is None and metrics["fidelity"]["samples"] == 3
    assert not [w for w in metrics["warnings"] if "slower" not in w]


def test_evaluation_is_capped_and_reports_the_samples_really_used(tmp_path: Path) -> None:
    path = models.save_npz(tmp_path / "e.npz", x=np.zeros((300, 1, 8, 8), np.float32), labels=np.zeros(300, np.int64))
    samples = load_samples(_ctx(tmp_path, evaluation_path=path), [X_SPEC])
    assert len(samples.batches) == len(samples.labels) == 256
    metrics = measure(_ctx(tmp_path), lambda feed: [feed["x"].reshape(1, -1)[:, :4] + 1.0],
                      lambda feed: [feed["x"].reshape(1, -1)[:, :4] + 1.0], samples, original_bytes=1000,
                      quantized_bytes=260, runtime="numpy", layers=[], latency_runs=20)
    assert metrics["fidelity"]["samples"] == 256 and metrics["accuracy"]["float"] == 1.0
