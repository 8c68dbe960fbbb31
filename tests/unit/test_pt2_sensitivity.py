"""Per-layer sensitivity and accuracy targets on torch.export static, dynamic and weight-only (issue 14, items 1-2).

The cases are trained digits models whose channel ranges were spread (the same function, harder ranges), so
per-tensor quantization loses many points and the layers to blame are known. AOTInductor is switched off (as in
test_torch_static.py): the probes measure the eager program, and so does the delivered metric.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests import models
from worker import engine
from worker.engine.torch_export.aoti import AOTI_ENV


@pytest.fixture(autouse=True)
def _no_aoti(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AOTI_ENV, "0")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pt2_sensitivity")
    x_train, _, x_test, y_test = models.digits_data()
    example = torch.from_numpy(x_test[:2])
    return {"cnn": models.save_torch_export(models.spread_digits_cnn(), example, tmp / "spread-cnn.pt2"),
            "mlp": models.save_torch_export(spread_mlp(), example, tmp / "spread-mlp.pt2"),
            "calibration": models.save_npz(tmp / "cal.npz", x=x_train[:128]),
            "evaluation": models.save_npz(tmp / "eval.npz", x=x_test, labels=y_test)}


def spread_mlp() -> torch.nn.Module:
    """The trained digits MLP with fc1's first two units 200x larger and fc2's weights from them 200x smaller:
    the same function, but one per-tensor int8 scale for fc1's weights, and one per-row activation scale for
    fc2's input, must cover both ranges."""
    model = copy.deepcopy(models.train_digits_mlp())
    with torch.no_grad():
        model.fc1.weight[:2] *= 200.0
        model.fc1.bias[:2] *= 200.0
        model.fc2.weight[:, :2] /= 200.0
    return model.eval()


def _run(data: dict[str, Path], model: str, method: str, tmp_path: Path, **config: object) -> engine.QuantizeResult:
    return engine.quantize(data[model], "torch_export", method, config, tmp_path,
                           calibration_path=data["calibration"], evaluation_path=data["evaluation"])


def test_static_ranks_conv1_first_and_its_suggested_exclude_round_trips(data: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    plain = _run(data, "cnn", "static", tmp_path / "plain", granularity="per_tensor", weight_bits=4)
    accuracy, report = plain.metrics["accuracy"], plain.metrics["sensitivity"]
    assert accuracy["delta"] < -0.05  # per-tensor int4 weights lose more than 5 points here
    assert report["goal"]["source"] == "default" and report["goal"]["metric"] == "accuracy"
    ranked = [layer["name"] for layer in report["layers"]]
    assert ranked[0] == "conv1" and set(ranked) == {"conv1", "conv2", "head"}  # conv1 holds the spread channels
    assert report["layers"][0]["drop"] > report["layers"][-1]["drop"]
    assert report["suggested_reaches_goal"] and report["suggested_exclude"][0] == "^conv1$"
    assert plain.error is None and "target" not in plain.metrics
    again = _run(data, "cnn", "static", tmp_path / "again", granularity="per_tensor", weight_bits=4,
                 exclude=report["suggested_exclude"])
    assert again.metrics["accuracy"]["quantized"] >= 0.99 * again.metrics["accuracy"]["float"]
    float_layers = {layer["name"] for layer in again.metrics["layers"] if layer["weight_dtype"] == "float32"}
    assert {p.strip("^$") for p in report["suggested_exclude"]} == float_layers


def test_dynamic_target_keeps_the_spread_linears_float_and_reports_the_cost(data: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    result = _run(data, "mlp", "dynamic", tmp_path, granularity="per_tensor",
                  target={"metric": "cosine", "max_drop": 0.001})
    target = result.metrics["target"]
    assert result.error is None and target["met"] and target["before"]["cosine"] < 0.9
    assert result.metrics["fidelity"]["cosine"] >= 0.999
    assert target["kept_float"] and set(target["kept_float"]) <= {"fc1", "fc2"}
    float_layers = {layer["name"] for layer in result.metrics["layers"] if layer["weight_dtype"] == "float32"}
    assert float_layers == set(target["kept_float"])
    cost = target["cost"]
    assert cost["bytes_after"] == result.artifacts[0].path.stat().st_size > cost["bytes_before"]
    assert cost["ms_p50_before"] > 0 and cost["ms_p50_after"] > 0


def test_weight_only_int4_target_keeps_layers_at_int8_not_float(data: dict[str, Path], tmp_path: Path) -> None:
    plain = _run(data, "mlp", "weight_only", tmp_path / "plain", dtype="int4", group_size=32)
    cosine = plain.metrics["fidelity"]["cosine"]
    assert plain.metrics["sensitivity"]["kept_as"].startswith("at int8")
    # a target halfway between what int4 reaches and float: some layers must move to int8
    result = _run(data, "mlp", "weight_only", tmp_path / "target", dtype="int4", group_size=32,
                  target={"metric": "cosine", "max_drop": (1.0 - cosine) / 2})
    target = result.metrics["target"]
    assert result.error is None and target["met"] and target["kept_int8"]
    dtypes = {layer["name"]: layer["weight_dtype"] for layer in result.metrics["layers"]}
    assert {dtypes[name] for name in target["kept_int8"]} == {"int8"} and "int4" in dtypes.values()
    assert result.metrics["fidelity"]["cosine"] >= 1.0 - (1.0 - cosine) / 2 - 1e-6
    assert plain.metrics["size"]["quantized_bytes"] < result.metrics["size"]["quantized_bytes"] \
        < 2 * plain.metrics["size"]["quantized_bytes"]
