"""ONNX weight-only int4 mixed precision: a layer whose int4 error ruins fidelity stays at 8 bits, says so, and the
search keeps the fewest such layers that reach the target within the size budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import models
from worker.engine import quantize
from worker.engine.onnx import weight_only_mixed as mixed
from worker.engine.types import no_log, no_progress


def _mlp_with_an_outlier_layer(path: Path) -> Path:
    """x @ w1 -> Relu -> @ w2 -> Relu -> @ w3. w1 and w3 are uniform, which 4-bit blocks keep well (~23 dB); w2
    holds a row 10x the rest in every block of 32 along K (fed by a channel w1 makes 10x smaller, so it does not
    rule the output), and its 4-bit scale rounds most other weights to zero; 8 bits keep them."""
    rng = np.random.default_rng(0)
    w1 = rng.uniform(-1, 1, (64, 256)).astype(np.float32)
    w2 = rng.uniform(-1, 1, (256, 32)).astype(np.float32)
    w1[:, ::32] /= 10.0
    w2[::32] *= 10.0
    w3 = rng.uniform(-1, 1, (32, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("MatMul", ["r2", "w3"], ["y"], name="fc3")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 64])],
                              [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _cosines(float_path: Path, quant_path: Path, x: np.ndarray) -> np.ndarray:
    f = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    q = ort.InferenceSession(str(quant_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    f, q = f.reshape(len(f), -1), q.reshape(len(q), -1)
    return (f * q).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1))


def test_the_layer_int4_ruins_stays_at_8_bits_and_the_report_says_why(tmp_path: Path) -> None:
    model = _mlp_with_an_outlier_layer(tmp_path / "mlp.onnx")
    rng = np.random.default_rng(1)
    calibration = models.save_npz(tmp_path / "cal.npz", x=rng.standard_normal((8, 8, 64)).astype(np.float32))
    evaluation = models.save_npz(tmp_path / "ev.npz", x=rng.standard_normal((8, 8, 64)).astype(np.float32))
    result = quantize(model, "onnx", "weight_only", {"dtype": "int4", "group_size": 32}, tmp_path / "job",
                      calibration_path=calibration, evaluation_path=evaluation)
    layers = {layer["name"]: layer["weight_dtype"] for layer in result.metrics["layers"]}
    assert layers == {"fc1": "int4", "fc2": "int8", "fc3": "int4"}
    summary = result.report["onnx_weight_only"]
    assert [row["name"] for row in summary["kept_8bit_for_fidelity"]] == ["fc2"]
    assert summary["tuning_cosine"]["all_4bit"] < mixed.TARGET_COSINE <= summary["tuning_cosine"]["delivered"]
    [note] = [w for w in result.metrics["warnings"] if "at 8 bits instead of 4" in w]
    assert "fc2" in note and "fc1" not in note
    # what a user measures on the file is what the report says
    artifact = result.artifacts[0].path
    measured = _cosines(model, artifact, np.load(str(evaluation))["x"])
    assert result.metrics["fidelity"]["cosine"] == pytest.approx(float(measured.mean()), abs=1e-3)
    assert measured.min() >= 0.98


def test_a_model_int4_keeps_faithful_stays_all_4_bit(tmp_path: Path) -> None:
    model = _mlp_with_an_outlier_layer(tmp_path / "mlp.onnx")
    result = quantize(model, "onnx", "weight_only", {"dtype": "int4", "group_size": 32, "exclude": ["^fc2$"]},
                      tmp_path / "job")
    layers = {layer["name"]: layer["weight_dtype"] for layer in result.metrics["layers"]}
    assert layers == {"fc1": "int4", "fc2": "float32", "fc3": "int4"}
    summary = result.report["onnx_weight_only"]
    assert summary["kept_8bit_for_fidelity"] == [] and summary["tuning_cosine"]["all_4bit"] >= mixed.TARGET_COSINE
    assert not [w for w in result.metrics["warnings"] if "8 bits" in w]


class _Search:
    """promote() against a made-up model: each node costs a fixed share of cosine at 4 bits, additively."""

    def __init__(self, losses: dict[str, float], tmp_path: Path) -> None:
        self.losses, self.tmp_path, self.built = losses, tmp_path, []

    def build(self, promoted: frozenset[str]) -> Path:
        self.built.append(promoted)
        path = self.tmp_path / f"{len(self.built)}.txt"
        path.write_text(",".join(sorted(promoted)))
        return path

    def cosine(self, path: Path, reference: object, batches: object) -> float:
        promoted = set(filter(None, path.read_text().split(",")))
        return 1.0 - sum(loss for node, loss in self.losses.items() if node not in promoted)


def test_search_ranks_per_weight_and_keeps_the_fewest_layers_that_reach_the_target(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    losses = {f"n{i}": 0.004 for i in range(20)} | {"table": 0.004, "useless": 0.0}
    sizes = {node: 1000 for node in losses} | {"table": 10, "useless": 30000}
    search = _Search(losses, tmp_path)
    monkeypatch.setattr(mixed, "tuning_cosine", search.cosine)
    first = search.build(frozenset())
    result = mixed.promote(_Ctx(), search.build, first, sizes, [], [])
    # 1 - 21 * 0.004 = 0.916; the target needs all but two of the lossy nodes: 19 at 8 bits
    assert len(result.promoted) == 19 and result.promoted[0] == "table"  # the cheapest gain first
    assert "useless" not in result.promoted and result.after >= mixed.TARGET_COSINE
    assert len(search.built) < 1 + len(losses) + 12  # probes, then a handful of steps, not every prefix


def test_search_stops_at_the_size_budget_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    losses = {f"n{i}": 0.01 for i in range(4)}
    search = _Search(losses, tmp_path)
    monkeypatch.setattr(mixed, "tuning_cosine", search.cosine)
    result = mixed.promote(_Ctx(), search.build, search.build(frozenset()), dict.fromkeys(losses, 100), [], [])
    assert len(result.promoted) == 2  # half the weights: closer to int4 than to int8
    assert result.after < mixed.TARGET_COSINE and "limited to 50%" in result.note


class _Ctx:
    log = staticmethod(no_log)
    progress = staticmethod(no_progress)
