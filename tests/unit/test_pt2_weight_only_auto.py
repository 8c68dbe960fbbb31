"""torch.export weight-only bits auto (issue 14, item 3): Hessian traces by Hutchinson's estimator, bits per layer
by loss saved per byte under max_size_ratio."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import models
from worker import engine
from worker.engine.config import TargetConfig, WeightOnlyConfig
from worker.engine.errors import EngineError
from worker.engine.registry import resolve
from worker.engine.torch_export.weight_only_auto import hessian_traces


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pt2_auto")
    x_train, _, x_test, y_test = models.digits_data()
    return {"model": models.save_torch_export(models.train_digits_mlp(), torch.from_numpy(x_test[:2]), tmp / "m.pt2"),
            "calibration": models.save_npz(tmp / "cal.npz", x=x_train[:128]),
            "evaluation": models.save_npz(tmp / "eval.npz", x=x_test, labels=y_test)}


def _run(mlp: dict[str, Path], tmp_path: Path, **config: object) -> engine.QuantizeResult:
    return engine.quantize(mlp["model"], "torch_export", "weight_only", config, tmp_path,
                           calibration_path=mlp["calibration"], evaluation_path=mlp["evaluation"])


def test_hutchinson_matches_the_exact_trace_of_a_linear_layer() -> None:
    # f(x) = W x + b: the Gauss-Newton Hessian of 0.5 * ||f - f0||^2 / B over W is I_out (x) (X^T X / B), whose
    # trace is out_features * sum ||x||^2 / B; the bias's would be out_features
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 5)
    x = torch.randn(8, 12)
    gm = torch.export.export(layer, (x,)).module()
    traces = hessian_traces(gm, {"fc": "weight"}, [(x,)], probes=200)
    exact = 5 * float((x**2).sum()) / 8
    assert traces["fc"] == pytest.approx(exact, rel=0.1)


def test_auto_beats_uniform_int4_at_a_smaller_size_and_says_why(mlp: dict[str, Path], tmp_path: Path) -> None:
    uniform = _run(mlp, tmp_path / "int4", dtype="int4", group_size=32)  # the finest int4 groups there are
    ratio, fidelity = uniform.metrics["size"]["ratio"], uniform.metrics["fidelity"]
    auto = _run(mlp, tmp_path / "auto", bits="auto", group_size=128, max_size_ratio=ratio)
    assert auto.metrics["size"]["ratio"] <= ratio
    assert auto.metrics["fidelity"]["sqnr_db"] > fidelity["sqnr_db"] + 3.0
    assert auto.metrics["fidelity"]["cosine"] > fidelity["cosine"]
    plan = auto.report["torch_export_weight_only"]["bits_auto"]
    assert plan["size_ratio"] == auto.metrics["size"]["ratio"] and plan["probes"] >= 1
    assert plan["all_4bit"]["size_ratio"] < plan["size_ratio"] <= ratio
    dtypes = {layer["name"]: layer["weight_dtype"] for layer in auto.metrics["layers"]}
    bits = {layer["name"]: layer["bits"] for layer in plan["layers"]}
    assert bits.keys() == dtypes.keys() and {dtypes[n] for n, b in bits.items() if b == 8} == {"int8"}
    assert {4, 8} == set(bits.values())  # the budget is between all-int4 and all-int8: a real mix
    assert all(layer["why"] and layer["hessian_trace"] > 0 for layer in plan["layers"])
    assert plan["predicted_loss"]["chosen"] < plan["predicted_loss"]["all_4bit"]


def test_a_budget_all_int4_already_misses_fails_as_budget_not_met(mlp: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(EngineError) as failed:
        _run(mlp, tmp_path, bits="auto", max_size_ratio=0.01)
    assert failed.value.code == "budget_not_met" and "4 bits" in str(failed.value)


def test_registry_offers_auto_bits_on_cpu_with_a_size_budget_only() -> None:
    spec = resolve("torch_export", "weight_only")
    assert spec.supports_auto_bits
    fine = WeightOnlyConfig(bits="auto", max_size_ratio=0.2)
    assert spec.config_problems(fine, "cpu") == []
    assert "bits" in [f for f, _ in spec.config_problems(fine, "cuda")]
    latency = WeightOnlyConfig(bits="auto", max_latency_ms=1.0)
    assert [f for f, _ in spec.config_problems(latency, "cpu")] == ["max_latency_ms"]
    both = WeightOnlyConfig(bits="auto", max_size_ratio=0.2, target=TargetConfig())
    assert [f for f, _ in spec.config_problems(both, "cpu")] == ["target"]
