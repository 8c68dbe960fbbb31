"""Per-layer sensitivity and accuracy targets on TorchScript dynamic and static (issue 14, items 1-2).

Trained digits models whose channel ranges were spread (the same function, harder ranges), so per-tensor
quantization loses many points and the layers to blame are known: the spread CNN (tests/models.py) for static with
min/max calibration, the spread MLP (test_pt2_sensitivity.py) for dynamic. Each job here takes 0.5-2 s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests import models
from tests.unit.test_pt2_sensitivity import spread_mlp
from worker import engine
from worker.engine import sensitivity

LOSSY_STATIC = {"granularity": "per_tensor", "calibration": {"algorithm": "minmax"}}
REPORT_KEYS = {"method", "source", "samples", "probe_samples", "goal", "kept_as", "quantized", "layers",
               "not_measured", "stopped_by", "suggested_exclude", "suggested_reaches_goal", "suggested_fidelity",
               "tried"}  # torch_export's analyse() report: the API and report.html read both alike


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ts_sensitivity")
    x_train, _, x_test, y_test = models.digits_data()
    example = torch.from_numpy(x_test[:2])
    return {"cnn": models.save_torchscript(models.spread_digits_cnn(), example, tmp / "spread-cnn.pt"),
            "mlp": models.save_torchscript(models.train_digits_mlp(), example, tmp / "mlp.pt"),
            "spread_mlp": models.save_torchscript(spread_mlp(), example, tmp / "spread-mlp.pt"),
            "calibration": models.save_npz(tmp / "cal.npz", x=x_train[:128]),
            "evaluation": models.save_npz(tmp / "eval.npz", x=x_test, labels=y_test)}


def _run(data: dict[str, Path], model: str, method: str, work: Path, evaluation: bool = True,
         **config: object) -> engine.QuantizeResult:
    return engine.quantize(data[model], "torchscript", method, config, work,
                           calibration_path=data["calibration"] if method == "static" else None,
                           evaluation_path=data["evaluation"] if evaluation else None)


def _float_layers(result: engine.QuantizeResult) -> set[str]:
    return {layer["name"] for layer in result.metrics["layers"] if layer["weight_dtype"] == "float32"}


def _held_out_top1(path: Path) -> float:
    _, _, x_test, y_test = models.digits_data()
    with torch.no_grad():
        logits = torch.jit.load(str(path))(torch.from_numpy(x_test)).numpy()
    return float(np.mean(logits.argmax(1) == y_test))


def test_static_ranks_the_spread_convs_first_and_its_suggested_exclude_round_trips(data: dict[str, Path],
                                                                                   tmp_path: Path) -> None:
    plain = _run(data, "cnn", "static", tmp_path / "plain", **LOSSY_STATIC)
    accuracy, report = plain.metrics["accuracy"], plain.metrics["sensitivity"]
    assert accuracy["delta"] < -0.05  # per-tensor static loses more than 5 points here
    assert set(report) == REPORT_KEYS and report["source"] == "evaluation" and report["stopped_by"] is None
    assert report["goal"]["source"] == "default" and report["goal"]["metric"] == "accuracy"
    ranked = [layer["name"] for layer in report["layers"]]
    assert set(ranked) == {"conv1", "conv2", "head"} and ranked[-1] == "head"  # the spread channels are in the convs
    drops = [layer["drop"] for layer in report["layers"]]
    assert drops == sorted(drops, reverse=True) and drops[0] > drops[-1]
    assert report["suggested_reaches_goal"] and report["suggested_exclude"][0] == f"^{ranked[0]}$"
    assert plain.error is None and "target" not in plain.metrics
    again = _run(data, "cnn", "static", tmp_path / "again", **LOSSY_STATIC, exclude=report["suggested_exclude"])
    assert again.metrics["accuracy"]["quantized"] >= 0.99 * again.metrics["accuracy"]["float"]
    assert {p.strip("^$") for p in report["suggested_exclude"]} == _float_layers(again)


def test_static_target_keeps_the_sensitive_convs_float_and_ends_within_one_point(data: dict[str, Path],
                                                                                 tmp_path: Path) -> None:
    result = _run(data, "cnn", "static", tmp_path, **LOSSY_STATIC, target={"metric": "accuracy", "max_drop": 0.01})
    accuracy, target = result.metrics["accuracy"], result.metrics["target"]
    assert result.error is None and target["met"] and target["before"]["accuracy"] < accuracy["float"] - 0.05
    assert accuracy["quantized"] >= accuracy["float"] - 0.01  # the delivered file, measured as any job
    assert target["kept_float"] and set(target["kept_float"]) <= {"conv1", "conv2"}
    assert _float_layers(result) == set(target["kept_float"])
    (artifact,) = result.artifacts
    cost = target["cost"]
    assert cost["bytes_after"] == artifact.path.stat().st_size > cost["bytes_before"]
    assert cost["ms_p50_before"] > 0 and cost["ms_p50_after"] > 0
    # the file loads with plain torch.jit.load and holds the held-out digits within a point of float
    assert _held_out_top1(artifact.path) >= _held_out_top1(data["cnn"]) - 0.01


def test_a_target_out_of_reach_delivers_its_best_candidate_and_nothing_else(data: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    # cosine may not drop at all: even with both convs float, the int8 head moves the logits a little
    result = _run(data, "cnn", "static", tmp_path, **LOSSY_STATIC, target={"metric": "cosine", "max_drop": 0.0})
    assert result.error is not None and result.error["code"] == "target_not_met", result.error
    target = result.metrics["target"]
    assert not target["met"] and target["after"]["cosine"] > target["before"]["cosine"]
    assert "head" not in target["kept_float"]  # every layer float would be no quantization at all
    (artifact,) = result.artifacts
    assert artifact.path.stat().st_size == result.metrics["size"]["quantized_bytes"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == [artifact.path.name]  # no probe or cost file left


def test_the_budget_and_the_probe_cap_say_which_bound_applied(data: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # a budget spent before the first probe: nothing ranked, the plain model delivered, target_not_met says why
    late = _run(data, "cnn", "static", tmp_path / "late", **LOSSY_STATIC,
                target={"metric": "accuracy", "max_drop": 0.01, "budget_s": 0.001})
    report = late.metrics["sensitivity"]
    assert report["stopped_by"] == "budget" and not report["layers"] and len(report["not_measured"]) == 3
    assert late.error["code"] == "target_not_met" and "time budget" in late.error["message"]
    assert not late.metrics["target"]["kept_float"] and not _float_layers(late)
    monkeypatch.setattr(sensitivity, "MAX_PROBES", 1)
    capped = _run(data, "cnn", "static", tmp_path / "capped", **LOSSY_STATIC)
    report = capped.metrics["sensitivity"]
    assert report["stopped_by"] == "cap" and len(report["layers"]) == 1 and len(report["not_measured"]) == 2


def test_dynamic_ranks_every_linear_and_suggests_nothing_where_int8_is_faithful(data: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    result = _run(data, "mlp", "dynamic", tmp_path)
    report = result.metrics["sensitivity"]
    assert {layer["name"] for layer in report["layers"]} == {"fc1", "fc2", "head"}
    assert report["suggested_exclude"] == [] and report["suggested_reaches_goal"]
    assert result.metrics["accuracy"]["delta"] >= -0.01 * result.metrics["accuracy"]["float"]


def test_dynamic_target_keeps_the_spread_linears_float(data: dict[str, Path], tmp_path: Path) -> None:
    plain = _run(data, "spread_mlp", "dynamic", tmp_path / "plain", granularity="per_tensor")
    report = plain.metrics["sensitivity"]
    assert plain.metrics["fidelity"]["cosine"] < 0.9 and report["layers"][0]["name"] == "fc1"
    result = _run(data, "spread_mlp", "dynamic", tmp_path / "target", granularity="per_tensor",
                  target={"metric": "cosine", "max_drop": 0.001})
    target = result.metrics["target"]
    assert result.error is None and target["met"] and result.metrics["fidelity"]["cosine"] >= 0.999
    assert target["kept_float"] and set(target["kept_float"]) <= {"fc1", "fc2"}
    assert _float_layers(result) == set(target["kept_float"])
    assert result.metrics["target"]["cost"]["bytes_after"] == result.artifacts[0].path.stat().st_size


def test_without_an_evaluation_set_the_probes_run_on_calibration_samples(data: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    result = _run(data, "cnn", "static", tmp_path, evaluation=False, **LOSSY_STATIC)
    report = result.metrics["sensitivity"]
    assert report["source"] == "calibration" and report["goal"]["metric"] == "top1_agreement"  # no labels there
    assert len(report["layers"]) == 3 and report["suggested_reaches_goal"]


def test_a_target_metric_the_data_cannot_measure_is_refused(data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(engine.EngineError) as caught:
        _run(data, "cnn", "static", tmp_path, evaluation=False, **LOSSY_STATIC,
             target={"metric": "accuracy", "max_drop": 0.01})
    assert caught.value.code == "dataset_mismatch"
