"""ONNX weight-only bits auto: int4/int8 per layer by measured gain per byte, within a size or latency budget, with
each layer's bits and why in the report; budgets no int4 model can meet are refused, or fail plainly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from app.routes.system import capabilities_document
from tests import models
from tests.unit.test_onnx_weight_only_mixed import _cosines, _mlp_with_an_outlier_layer
from worker.engine import quantize
from worker.engine.config import WeightOnlyConfig
from worker.engine.errors import EngineError
from worker.engine.onnx import weight_only_budget as budget
from worker.engine.registry import int4_size_floor, resolve


def test_bits_sets_dtype_and_round_trips() -> None:
    assert WeightOnlyConfig(bits=4).dtype == "int4" and WeightOnlyConfig(bits=8).dtype == "int8"
    assert WeightOnlyConfig(dtype="int4").bits is None  # dtype alone works as before
    auto = WeightOnlyConfig(bits="auto", max_size_ratio=0.2)
    assert auto.dtype == "int4" and WeightOnlyConfig.model_validate(auto.model_dump()) == auto


@pytest.mark.parametrize("config,message", [
    ({"bits": 4, "dtype": "int8"}, "disagree"),
    ({"bits": "auto", "dtype": "int8", "max_size_ratio": 0.2}, "disagree"),
    ({"bits": "auto"}, "needs a budget"),
    ({"max_size_ratio": 0.2}, "only with bits 'auto'"),
    ({"bits": 8, "max_latency_ms": 5.0}, "only with bits 'auto'"),
    ({"bits": "auto", "max_size_ratio": 1.5}, "less than or equal to 1"),
    ({"bits": 2}, "Input should be 4, 8 or 'auto'"),
])
def test_bad_bits_configs_are_refused(config: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        WeightOnlyConfig.model_validate(config)


def test_budgets_no_int4_model_can_meet_and_other_backends_are_refused_before_queueing() -> None:
    onnx_spec = resolve("onnx", "weight_only")
    floor = int4_size_floor(128, True)
    assert 0.13 < floor < 0.14  # 4 bits plus a float32 scale per 128 weights, over 32 bits
    below = WeightOnlyConfig(bits="auto", max_size_ratio=0.12)
    assert [f for f, _ in onnx_spec.config_problems(below, "cpu")] == ["max_size_ratio"]
    assert onnx_spec.config_problems(WeightOnlyConfig(bits="auto", max_size_ratio=0.14), "cpu") == []
    # group 32 spends four times the scales: 0.14 is out of reach there
    assert [f for f, _ in onnx_spec.config_problems(
        WeightOnlyConfig(bits="auto", max_size_ratio=0.14, group_size=32), "cpu")] == ["max_size_ratio"]
    hqq = WeightOnlyConfig(bits="auto", max_size_ratio=0.2, algorithm="hqq")
    assert [f for f, _ in onnx_spec.config_problems(hqq, "cpu")] == ["algorithm"]
    methods = {(fmt, name): entry for fmt, doc in capabilities_document()["formats"].items()
               for name, entry in doc["methods"].items()}
    assert {pair for pair, entry in methods.items() if entry["supports_auto_bits"]} == {
        ("onnx", "weight_only"), ("torch_export", "weight_only"), ("hf", "weight_only")}
    # torch.export's: test_pt2_weight_only_auto.py; hf's: test_hf_mixed.py


def test_knapsack_prefers_gain_per_byte_and_never_exceeds_the_capacity() -> None:
    gains = {"big": 0.05, "a": 0.03, "b": 0.03, "useless": 0.0, "free": 0.001}
    costs = {"big": 0.9, "a": 0.5, "b": 0.5, "useless": 0.01, "free": 0.0}
    assert budget.knapsack(gains, costs, 1.0) == {"a", "b", "free"}  # 0.06 beats 0.05 for the same room
    assert budget.knapsack(gains, costs, 0.6) == {"a", "free"}
    assert budget.knapsack(gains, costs, 0.0) == {"free"}


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("budget")
    rng = np.random.default_rng(1)
    data = models.save_npz(tmp / "x.npz", x=rng.standard_normal((8, 8, 64)).astype(np.float32))
    return _mlp_with_an_outlier_layer(tmp / "mlp.onnx"), data


def test_the_budget_goes_to_the_layer_that_gains_most_per_byte(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = mlp
    # all-int4 (block 32) is 0.162 of the float file; fc2 at 8 bits adds 0.038, fc3 0.010, fc1 0.077: 0.205 fits
    # fc2 alone, which gains 20x more fidelity than fc3 for 4x the bytes
    result = quantize(model, "onnx", "weight_only", {"bits": "auto", "max_size_ratio": 0.205, "group_size": 32},
                      tmp_path / "job", calibration_path=data, evaluation_path=data)
    layers = {layer["name"]: layer["weight_dtype"] for layer in result.metrics["layers"]}
    assert layers == {"fc1": "int4", "fc2": "int8", "fc3": "int4"}
    assert result.metrics["size"]["ratio"] <= 0.205
    auto = result.report["onnx_weight_only"]["bits_auto"]
    rows = {row["name"]: row for row in auto["layers"]}
    assert rows["fc2"]["bits"] == 8 and rows["fc2"]["rank_by_gain_per_byte"] == 1
    assert rows["fc3"]["bits"] == 4 and "more per byte" in rows["fc3"]["why"]
    assert auto["all_4bit"]["size_ratio"] < auto["delivered"]["size_ratio"] <= 0.205
    assert auto["delivered"]["tuning_cosine"] > auto["all_4bit"]["tuning_cosine"] + 0.03
    measured = _cosines(model, result.artifacts[0].path, np.load(str(data))["x"])
    assert result.metrics["fidelity"]["cosine"] == pytest.approx(float(measured.mean()), abs=1e-3)


def test_a_budget_that_fits_every_layer_at_8_bits_gets_them_without_probes(mlp: tuple[Path, Path],
                                                                           tmp_path: Path) -> None:
    model, data = mlp
    result = quantize(model, "onnx", "weight_only", {"bits": "auto", "max_latency_ms": 1000.0, "group_size": 32},
                      tmp_path / "job", calibration_path=data)
    assert {layer["weight_dtype"] for layer in result.metrics["layers"]} == {"int8"}
    auto = result.report["onnx_weight_only"]["bits_auto"]
    assert auto["delivered"]["latency_ms"] > 0 and "fit the budget" in auto["layers"][0]["why"]


@pytest.mark.parametrize("config,over", [
    ({"max_size_ratio": 0.5, "exclude": ["^fc1$"]}, "max_size_ratio 0.5"),  # fc1 float is 0.6 of the file alone
    ({"max_latency_ms": 1e-6}, "max_latency_ms"),
])
def test_a_budget_even_all_int4_misses_fails_as_budget_not_met(mlp: tuple[Path, Path], tmp_path: Path,
                                                                config: dict, over: str) -> None:
    model, data = mlp
    with pytest.raises(EngineError, match="budget cannot be met") as failure:
        quantize(model, "onnx", "weight_only", {"bits": "auto", "group_size": 32, **config}, tmp_path / "job",
                 calibration_path=data)
    assert failure.value.code == "budget_not_met" and over in str(failure.value)
    assert not list((tmp_path / "job").rglob("*.onnx"))  # no candidate left behind


@pytest.mark.slow  # ~90 s on two busy cores: 39 probes of the real MiniLM, and two measured jobs
def test_minilm_bits_auto_at_020_beats_uniform_int4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.engine.onnx import weight_only_mixed as mixed

    model = models.export_minilm_onnx(tmp_path / "minilm.onnx")
    sentences = models.minilm_dataset(tmp_path / "sentences.npz")
    auto = quantize(model, "onnx", "weight_only", {"bits": "auto", "max_size_ratio": 0.2}, tmp_path / "auto",
                    evaluation_path=sentences)
    with monkeypatch.context() as patch:
        patch.setattr(mixed, "TARGET_COSINE", 0.0)  # int4 alone: no layer raised to 8 bits for fidelity
        uniform = quantize(model, "onnx", "weight_only", {"dtype": "int4"}, tmp_path / "uniform",
                           evaluation_path=sentences)
    assert {layer["weight_dtype"] for layer in uniform.metrics["layers"]} == {"int4"}
    assert {"int4", "int8"} <= {layer["weight_dtype"] for layer in auto.metrics["layers"]}
    assert uniform.metrics["size"]["ratio"] < auto.metrics["size"]["ratio"] <= 0.2
    # measured 2026-12-01: uniform 0.1354x, cosine 0.9485 / min 0.9230; auto 0.1911x, 0.9957 / 0.9932
    assert auto.metrics["fidelity"]["cosine"] >= uniform.metrics["fidelity"]["cosine"] + 0.03
    assert auto.metrics["fidelity"]["cosine_min"] > uniform.metrics["fidelity"]["cosine_min"]
    rows = auto.report["onnx_weight_only"]["bits_auto"]["layers"]
    assert {row["bits"] for row in rows} == {4, 8} and all(row["why"] for row in rows)
