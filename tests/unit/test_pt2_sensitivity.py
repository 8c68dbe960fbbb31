"""Per-layer sensitivity and accuracy targets on torch.export static, dynamic and weight-only (issue 14, items 1-2).

The cases are trained digits models whose channel ranges were spread (the same function, harder ranges), so
per-tensor quantization loses many points and the layers to blame are known. AOTInductor is switched off (as in
test_torch_static.py): the probes measure the eager program, and so does the delivered metric.
"""

from __future__ import annotations

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
            "calibration": models.save_npz(tmp / "cal.npz", x=x_train[:128]),
            "evaluation": models.save_npz(tmp / "eval.npz", x=x_test, labels=y_test)}


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
