"""Per-layer sensitivity and accuracy targets on ONNX static and dynamic, on a CNN per-tensor int8 breaks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import models
from worker import engine
from worker.engine import sensitivity
from worker.engine.config import MethodConfig, StaticConfig, TargetConfig
from worker.engine.registry import SPECS, resolve


@pytest.fixture(scope="module")
def spread(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("spread")
    x_train, _, x_test, y_test = models.digits_data()
    return {"model": models.export_onnx(models.spread_digits_cnn(), torch.zeros(2, 1, 8, 8), tmp / "spread.onnx"),
            "calibration": models.save_npz(tmp / "cal.npz", x=x_train[:128]),
            "evaluation": models.save_npz(tmp / "eval.npz", x=x_test, labels=y_test)}


def _static(spread: dict[str, Path], tmp_path: Path, **config: object) -> engine.QuantizeResult:
    # minmax: the scenario is PTQ that loses points; "auto" now picks entropy, which holds these ranges per-tensor
    config = {"granularity": "per_tensor", "calibration": {"algorithm": "minmax"}, **config}
    return engine.quantize(spread["model"], "onnx", "static", config, tmp_path,
                           calibration_path=spread["calibration"], evaluation_path=spread["evaluation"])


def test_sensitivity_ranks_the_spread_layers_first_and_suggests_an_exclude_that_round_trips(
        spread: dict[str, Path], tmp_path: Path) -> None:
    result = _static(spread, tmp_path / "plain")
    accuracy, report = result.metrics["accuracy"], result.metrics["sensitivity"]
    assert accuracy["delta"] < -0.05  # per-tensor static loses more than 5 points here
    assert report["goal"]["source"] == "default" and report["goal"]["metric"] == "accuracy"
    ranked = [layer["name"] for layer in report["layers"]]
    assert set(ranked[:2]) == {"bn1", "bn2"} and ranked[-1] == "head"  # the two convs around the spread channels
    assert report["layers"][0]["drop"] > report["layers"][-1]["drop"]
    suggested = report["suggested_exclude"]
    assert report["suggested_reaches_goal"] and suggested and set(suggested) <= {"^bn1$", "^bn2$"}
    assert result.error is None and "target" not in result.metrics  # no target: the artifact is as asked
    # resubmitted as config.exclude, the suggestion reaches the default goal (1% relative top-1)
    again = _static(spread, tmp_path / "again", exclude=suggested)
    assert again.metrics["accuracy"]["quantized"] >= 0.99 * again.metrics["accuracy"]["float"]
    kept = {layer["name"] for layer in again.metrics["layers"] if layer["weight_dtype"] == "float32"}
    assert set(suggested) <= {f"^{name}$" for name in kept}  # the job may keep more float for speed


def test_a_target_keeps_the_fewest_sensitive_layers_float_and_reports_the_cost(spread: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    result = _static(spread, tmp_path, target={"metric": "accuracy", "max_drop": 0.01})
    accuracy, target = result.metrics["accuracy"], result.metrics["target"]
    assert result.error is None and target["met"]
    assert accuracy["quantized"] >= accuracy["float"] - 0.01
    assert target["kept_float"] and set(target["kept_float"]) <= {"bn1", "bn2"}
    assert target["before"]["accuracy"] < accuracy["float"] - 0.05
    assert target["cost"]["bytes_after"] > target["cost"]["bytes_before"]
    assert result.artifacts[0].path.stat().st_size == target["cost"]["bytes_after"]
    assert result.metrics["size"]["ratio"] < 0.9  # the head is still int8


def test_a_target_out_of_reach_fails_as_target_not_met_with_its_best_candidate(spread: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    # cosine may not drop at all: even with both convs float, the int8 head moves the logits a little
    result = _static(spread, tmp_path, target={"metric": "cosine", "max_drop": 0.0})
    assert result.error is not None and result.error["code"] == "target_not_met"
    target = result.metrics["target"]
    assert not target["met"] and target["after"]["cosine"] > target["before"]["cosine"]
    assert result.artifacts[0].path.is_file()  # the best candidate is still delivered
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(("sensitivity_", ".confined"))]


def test_dynamic_reports_sensitivity_of_its_matmuls(tmp_path: Path) -> None:
    _, _, x_test, y_test = models.digits_data()
    path = models.export_onnx(models.train_digits_mlp(), torch.zeros(2, 1, 8, 8), tmp_path / "mlp.onnx")
    evaluation = models.save_npz(tmp_path / "eval.npz", x=x_test, labels=y_test)
    result = engine.quantize(path, "onnx", "dynamic", {}, tmp_path / "out", evaluation_path=evaluation)
    report = result.metrics["sensitivity"]
    assert {layer["op"] for layer in report["layers"]} <= {"MatMul", "Gemm"} and len(report["layers"]) == 3
    assert report["suggested_reaches_goal"] and report["suggested_exclude"] == []  # int8 holds on this MLP


def test_target_config_is_strict_every_method_takes_one_and_perplexity_only_where_measured() -> None:
    with pytest.raises(ValueError):
        StaticConfig.model_validate({"target": {"metric": "accuracy", "max_drop": 0.01, "tolerance": 1}})
    with pytest.raises(ValueError):
        StaticConfig.model_validate({"target": {"metric": "bleu"}})
    config = StaticConfig(target=TargetConfig(metric="perplexity"))
    assert [f for f, _ in resolve("onnx", "static").config_problems(config, "cpu")] == ["target.metric"]
    # issue 14: `target` in every method's config; perplexity only where it is measured (hf causal LMs)
    assert all(spec.supports_target for spec in SPECS.values())
    assert {f"{f}/{m}" for (f, m), spec in SPECS.items() if "perplexity" in spec.target_metrics} == \
        {"hf/weight_only", "hf/auto"}


@pytest.mark.parametrize("name", ["bn1", "blocks.0.attn/q_proj", "node_Conv_20", "a+b (x)[1]"])
def test_suggested_patterns_match_exactly_their_layer(name: str) -> None:
    (pattern,) = sensitivity.exclude_patterns([name])
    config = MethodConfig(exclude=(pattern,))
    assert config.excludes(name)
    assert not config.excludes(f"{name}x") and not config.excludes(f"x{name}") and not config.excludes(f"{name}.weight")
    assert re.fullmatch(pattern, name)


def test_default_goal_prefers_labels_then_class_scores_then_cosine() -> None:
    assert sensitivity.goal(None, 0.9, True).metric == "accuracy"
    assert sensitivity.goal(None, None, True).metric == "top1_agreement"
    cosine = sensitivity.goal(None, None, False)
    assert cosine.metric == "cosine" and cosine.met(sensitivity.Figures(0.9951, None, None))
    assert not cosine.met(sensitivity.Figures(0.9949, None, None))
    relative = sensitivity.goal(TargetConfig(max_drop=0.05, relative=True), 0.8, True)
    assert relative.met(sensitivity.Figures(1.0, None, 0.761))
    assert not relative.met(sensitivity.Figures(1.0, None, 0.759))
    assert np.isinf(relative.drop(sensitivity.Figures(1.0, None, None)))
