"""method auto's bookkeeping on plain numbers: which candidates run, the Pareto front, and the pick with its why."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from worker.engine import report_html, sweep
from worker.engine.config import AutoConfig, TargetConfig
from worker.engine.registry import SPECS
from worker.engine.sensitivity import goal
from worker.engine.types import Device, Method, ModelFormat

COSINE = goal(None, None, has_top1=False)  # the default without labels or class scores: cosine 0.995


def _row(name: str, size: float, cosine: float, ms: float, **extra: Any) -> dict[str, Any]:
    planned = sweep.Planned(name, Method.dynamic, {})
    metrics = {"size": {"ratio": size, "quantized_bytes": int(size * 1000)},
               "fidelity": {"cosine": cosine, "top1_agreement": None}, "accuracy": None, "warnings": []}
    row = sweep.measured_row(planned, metrics, 1.0)
    row["latency"] = {"ms_p50": ms, "speedup": round(10.0 / ms, 3)}
    return {**row, **extra}


def test_the_fastest_candidate_meeting_the_goal_is_recommended_not_the_most_faithful() -> None:
    rows = [_row("faithful_slow", 0.26, 0.9999, 8.0), _row("fast", 0.25, 0.996, 5.0),
            _row("fastest_unfaithful", 0.14, 0.95, 4.0)]
    choice = sweep.choose(rows, COSINE)
    assert choice.recommended == "fast" and choice.met and not choice.warnings
    assert [r["meets_target"] for r in rows] == [True, True, False]
    assert [r["recommended"] for r in rows] == [False, True, False]
    assert "fast is the fastest of the 2 candidate(s) meeting the default goal" in choice.why


def test_pareto_marks_exactly_the_undominated_candidates() -> None:
    rows = [_row("a", 0.25, 0.999, 5.0), _row("dominated", 0.26, 0.998, 5.5), _row("small", 0.14, 0.95, 6.0),
            _row("twin_of_a", 0.25, 0.999, 5.0)]
    sweep.choose(rows, COSINE)
    assert {r["name"]: r["pareto"] for r in rows} == {"a": True, "dominated": False, "small": True,
                                                      "twin_of_a": True}
    assert sweep.pareto([(1, 1), (2, 2), (0, 3)]) == [True, False, True]


def test_a_latency_tie_goes_to_the_smaller_file() -> None:
    rows = [_row("big", 0.77, 0.9999, 1.00), _row("small", 0.39, 0.999, 1.03), _row("slower", 0.2, 0.999, 1.2)]
    choice = sweep.choose(rows, COSINE)
    assert choice.recommended == "small" and "within 5% of the fastest" in choice.why


def test_without_a_candidate_meeting_the_default_the_most_faithful_is_delivered_with_a_warning() -> None:
    rows = [_row("fast", 0.25, 0.98, 3.0), _row("faithful", 0.26, 0.99, 6.0)]
    choice = sweep.choose(rows, COSINE)
    assert choice.recommended == "faithful" and not choice.met
    assert "no candidate meets the default goal" in choice.why and "most faithful" in choice.why
    assert len(choice.warnings) == 1 and "config.target" in choice.warnings[0]


def test_an_explicit_target_judges_and_failed_rows_are_left_out() -> None:
    target = goal(TargetConfig(metric="cosine", max_drop=0.02), None, has_top1=False)
    failed = sweep.failed_row(sweep.Planned("static_minmax", Method.static, {}),
                              sweep.skipped("needs_calibration", "static needs calibration_dataset_id"))
    rows = [_row("fast", 0.25, 0.981, 3.0), failed, _row("slow", 0.26, 0.999, 6.0)]
    choice = sweep.choose(rows, target)
    assert choice.recommended == "fast" and "the target" in choice.why
    assert failed["pareto"] is False and failed["meets_target"] is None and failed["recommended"] is False
    with pytest.raises(ValueError):
        sweep.choose([failed], target)


def test_the_plan_skips_static_without_calibration_and_weight_only_without_matmuls() -> None:
    planned = sweep.plan(ModelFormat.onnx, AutoConfig(exclude=("^head$",)), device=Device.cpu,
                         has_calibration=False, has_linear_weights=False)
    assert [p.name for p in planned] == ["dynamic", "static_minmax", "static_entropy", "weight_only_int8",
                                         "weight_only_int4"]
    assert [p.skip and p.skip["code"] for p in planned] == [None, "needs_calibration", "needs_calibration",
                                                            "nothing_to_quantize", "nothing_to_quantize"]
    assert planned[0].config["exclude"] == ["^head$"] and planned[4].config["dtype"] == "int4"


def test_a_target_reaches_the_methods_that_take_one_and_candidates_can_be_chosen() -> None:
    config = AutoConfig(candidates=("weight_only_int4", "static_entropy"), target=TargetConfig(metric="cosine"))
    planned = sweep.plan(ModelFormat.onnx, config, device=Device.cpu, has_calibration=True, has_linear_weights=True)
    assert [(p.name, p.skip) for p in planned] == [("weight_only_int4", None), ("static_entropy", None)]
    assert planned[1].config["target"]["metric"] == "cosine" and planned[1].config["calibration"]["algorithm"] == \
        "entropy"
    # each method that takes a target searches for it itself (SPECS says which); the others are only judged by it
    takes = {p.name: SPECS[(ModelFormat.onnx, p.method)].supports_target for p in planned}
    assert {p.name: p.config.get("target") is not None for p in planned} == takes
    assert config.required_datasets() == {"calibration"}
    assert AutoConfig().required_datasets() == set()
    with pytest.raises(ValidationError):
        AutoConfig(candidates=("dynamic", "dynamic"))
    with pytest.raises(ValidationError):
        AutoConfig(candidates=("int2",))


def test_the_torch_formats_sweep_a_histogram_static_and_hf_its_two_weight_only_widths() -> None:
    pt2 = sweep.plan(ModelFormat.torch_export, AutoConfig(), device=Device.cpu, has_calibration=True,
                     has_linear_weights=False)
    assert [(p.name, p.skip and p.skip["code"]) for p in pt2] == [
        ("dynamic", None), ("static_minmax", None), ("static_histogram", None),
        ("weight_only_int8", "nothing_to_quantize"), ("weight_only_int4", "nothing_to_quantize")]
    assert "Linear/Embedding" in pt2[3].skip["message"] and pt2[2].config["calibration"]["algorithm"] == "histogram"
    # named anyway: torch has no entropy observer, and TorchScript no weight_only; each row says why
    named = sweep.plan(ModelFormat.torchscript, AutoConfig(candidates=("static_entropy", "weight_only_int8")),
                       device=Device.cpu, has_calibration=True, has_linear_weights=True)
    assert [p.skip["code"] for p in named] == ["unsupported", "unsupported"]
    assert "histogram" in named[0].skip["message"] and "not offered" in named[1].skip["message"]
    hf = sweep.plan(ModelFormat.hf, AutoConfig(), device=Device.cpu, has_calibration=False, has_linear_weights=True)
    assert [(p.name, p.skip) for p in hf] == [("weight_only_int8", None), ("weight_only_int4", None)]
    assert AutoConfig(candidates=("static_histogram",)).required_datasets() == {"calibration"}


def test_report_html_shows_the_sweep_table_with_names_as_text() -> None:
    rows = [_row("fast<script>", 0.25, 0.996, 5.0), _row("slow", 0.26, 0.9999, 8.0)]
    choice = sweep.choose(rows, COSINE)
    page = report_html.render({"format": "onnx", "method": "auto", "metrics": {
        "sweep": {"candidates": rows, "target": COSINE.to_dict(), "recommended": choice.recommended,
                  "why": choice.why}}})
    assert 'id="sweep"' in page and "fast&lt;script&gt;" in page and "<script>" not in page
    assert page.count("<tr class=recommended>") == 1
