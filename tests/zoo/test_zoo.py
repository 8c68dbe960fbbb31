"""Issue 12's acceptance on real third-party models: every (model, method) the registry offers for the
model's format ends in a valid, faithful artifact or a clear refusal, and the report tells the truth.

`make test-zoo` (fetches the corpus first). Each pair is quantized once, in a child process with its own
empty CWD and TMPDIR (tests/zoo/run_pair.py), and the outcome is cached under
$QUANTSERVE_ZOO_CACHE/runs: delete that folder (or a pair's) to quantize again after an engine change.
Every figure the engine reports is checked against what tests/zoo/measure.py measures on the artifact.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.zoo import corpus, fetch, measure, run_pair
from tests.zoo.corpus import MODELS, ZooModel
from worker import engine

pytestmark = pytest.mark.zoo

# An expected "no": the method does not apply to this model (API: 422 or code `unsupported`).
REFUSAL_CODES = {"unsupported", "nothing_to_quantize"}
# Engine codes the job API folds into `invalid_input` (worker/engine/runner.py): "your upload is bad".
INVALID_INPUT_CODES = {"invalid_input", "dataset_mismatch", "evaluation_failed", "unsupported_format"}
COSINE_TOLERANCE = 0.01  # reported vs measured: same data, same runtime; more is a different measurement
CNN_KINDS = {"cnn", "detector"}
# A library's exception passed on (`... failed: ValueError: The truth value ...`) is not a reason a user can act on.
RELAYED_EXCEPTION = re.compile(r"\b[A-Z]\w*(?:Error|Exception): ")

PAIRS = [(name, str(method)) for name, model in MODELS.items() for (fmt, method) in engine.SPECS
         if fmt == model.format]


def _ids(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"{name}-{method}" for name, method in pairs]


@pytest.fixture(scope="session", autouse=True)
def _corpus() -> None:
    """The models and their input sets in the cache (`python -m tests.zoo.fetch` does the same)."""
    for model in MODELS.values():
        fetch.fetch_model(model)
        fetch.fetch_inputs(model)


def _error_text(outcome: dict[str, Any]) -> str:
    error = outcome.get("error") or {}
    return f"{error.get('type')} (code {error.get('code')!r}): {error.get('message')}"


def _model_artifact(outcome: dict[str, Any]) -> Path | None:
    for artifact in outcome.get("artifacts", []):
        if artifact["kind"] == "model":
            return Path(artifact["path"])
    return None


@functools.cache
def _float(name: str) -> tuple[list[dict], list[list[np.ndarray]], list[str]]:
    model = MODELS[name]
    runner = measure.load_runner(corpus.model_path(model), model.format)
    feeds = measure.sample_feeds(corpus.evaluation_path(model), runner.ranks)
    outs = measure.run_all(runner, feeds)
    return feeds, outs, list(runner.output_names)


@functools.cache
def _measured(name: str, variant: str, *, required: bool = False) -> tuple[measure.Fidelity, measure.TaskCheck]:
    """Fidelity and task check of a pair's artifact, measured here on the evaluation set. Without an
    artifact: a failure where the acceptance requires one, else a skip (the pair's own test fails)."""
    model = MODELS[name]
    outcome = run_pair.outcome(model, variant)
    artifact = _model_artifact(outcome)
    if not outcome["ok"] or artifact is None:
        why = f"no {variant} artifact for {name}: {_error_text(outcome)}"
        if required:
            pytest.fail(why)
        pytest.skip(f"{why}; see test_pair_ends_in_valid_artifact_or_clear_refusal")
    feeds, float_outs, names = _float(name)
    quant_outs = measure.run_all(measure.load_runner(artifact, model.format), feeds)
    return measure.fidelity(names, feeds, float_outs, quant_outs), measure.task_check(model, feeds, float_outs,
                                                                                     quant_outs)


def _reported_per_output(fidelity: dict[str, Any]) -> dict[str, dict[str, float]] | None:
    """The engine's per-output figures, whichever of the plausible shapes it uses."""
    table = fidelity.get("outputs", fidelity.get("per_output"))
    if isinstance(table, dict):
        table = [{"name": k, **v} for k, v in table.items()]
    if not isinstance(table, list):
        return None
    return {str(row.get("name", row.get("output"))): {"cosine": row.get("cosine", row.get("cosine_mean")),
                                                      "cosine_min": row.get("cosine_min")} for row in table}


# ---- the models themselves ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_upload_is_detected_and_inspected(name: str) -> None:
    model = MODELS[name]
    path = corpus.model_path(model)
    measure.load_runner(path, model.format)  # the runtime loads it: so it is a valid upload
    assert corpus.detect_format(path) == model.format
    try:
        info = engine.inspect_model(path, model.format)
    except engine.EngineError as exc:
        pytest.fail(f"inspect_model refuses a model {model.format} loads: code {exc.code!r}: {exc}")
    assert info.inputs and info.outputs


# ---- every pair ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "method"), PAIRS, ids=_ids(PAIRS))
def test_pair_ends_in_valid_artifact_or_clear_refusal(name: str, method: str) -> None:
    model = MODELS[name]
    outcome = run_pair.outcome(model, method)
    if not outcome["ok"]:
        error = outcome["error"]
        is_config_problem = error["type"] == "ValidationError"  # pydantic: the API's 422
        assert error["code"] in REFUSAL_CODES or is_config_problem, \
            f"{method} on {name} failed instead of delivering or refusing clearly: {_error_text(outcome)}"
        assert len(error["message"]) >= 20, f"the refusal does not say why: {error['message']!r}"
        before_relayed = RELAYED_EXCEPTION.split(error["message"])[0].strip()
        assert not re.search(r"failed( on this model)?:?$", before_relayed), \
            f"the refusal relays a library exception instead of saying why: {_error_text(outcome)}"
        return
    artifact = _model_artifact(outcome)
    assert artifact is not None and artifact.is_file(), f"no model artifact among {outcome['artifacts']}"
    if model.format == "onnx":
        import onnx

        onnx.checker.check_model(str(artifact))
    feeds, _, names = _float(name)
    runner = measure.load_runner(artifact, model.format)
    outs = measure.run_all(runner, feeds)
    assert len(outs[0]) == len(names), f"the artifact has {len(outs[0])} outputs, the upload {len(names)}"
    fidelity = outcome["metrics"].get("fidelity") or {}
    for key in ("cosine", "cosine_min"):
        assert isinstance(fidelity.get(key), float) and math.isfinite(fidelity[key]), \
            f"metrics.fidelity.{key} missing: {fidelity}"


@pytest.mark.parametrize(("name", "method"), PAIRS, ids=_ids(PAIRS))
def test_no_invalid_input_for_a_model_the_runtime_loads(name: str, method: str) -> None:
    model = MODELS[name]
    measure.load_runner(corpus.model_path(model), model.format)
    outcome = run_pair.outcome(model, method)
    if not outcome["ok"]:
        assert outcome["error"]["code"] not in INVALID_INPUT_CODES, \
            f"the upload loads and runs, yet the job blames it: {_error_text(outcome)}"


@pytest.mark.parametrize(("name", "method"), PAIRS, ids=_ids(PAIRS))
def test_no_temp_files_left_outside_work_dir(name: str, method: str) -> None:
    outcome = run_pair.outcome(MODELS[name], method)
    assert outcome["leftovers"] == [], f"left in the job's CWD/TMPDIR: {outcome['leftovers'][:20]}"


@pytest.mark.parametrize(("name", "method"), PAIRS, ids=_ids(PAIRS))
def test_reported_fidelity_matches_measured_per_output(name: str, method: str) -> None:
    measured, _ = _measured(name, method)
    fidelity = run_pair.outcome(MODELS[name], method)["metrics"].get("fidelity") or {}
    reported = _reported_per_output(fidelity)
    assert reported is not None, f"metrics.fidelity has no per-output figures (keys: {sorted(fidelity)})"
    assert set(reported) == set(measured.per_output), \
        f"reported outputs {sorted(reported)}, the model's {sorted(measured.per_output)}"
    for output, figures in measured.per_output.items():
        for key in ("cosine", "cosine_min"):
            assert reported[output][key] == pytest.approx(figures[key], abs=COSINE_TOLERANCE), \
                f"{output}: reported {key} {reported[output][key]}, measured {figures[key]:.4f}"


@pytest.mark.parametrize(("name", "method"), PAIRS, ids=_ids(PAIRS))
def test_report_never_looks_better_than_the_worst_output(name: str, method: str) -> None:
    measured, _ = _measured(name, method)
    fidelity = run_pair.outcome(MODELS[name], method)["metrics"]["fidelity"]
    output, mean, minimum = measured.worst
    assert fidelity["cosine"] <= mean + COSINE_TOLERANCE, \
        f"headline cosine {fidelity['cosine']}, but output {output!r} measures {mean:.4f}"
    assert fidelity["cosine_min"] <= minimum + COSINE_TOLERANCE, \
        f"headline cosine_min {fidelity['cosine_min']}, but output {output!r} measures {minimum:.4f}"


# ---- per method ---------------------------------------------------------------------------------------

DYNAMIC = [m for m in MODELS.values() if (m.format, "dynamic") in {(str(f), str(x)) for f, x in engine.SPECS}]
STATIC_CNNS = [m for m in MODELS.values() if m.kind in CNN_KINDS and m.format == "onnx"]
TRANSFORMERS = [m for m in MODELS.values() if m.kind == "transformer" and m.format == "onnx"]


@pytest.mark.parametrize("model", DYNAMIC, ids=lambda m: m.name)
def test_dynamic_int8_never_larger_than_the_upload(model: ZooModel) -> None:
    outcome = run_pair.outcome(model, "dynamic")
    artifact = _model_artifact(outcome)
    if not outcome["ok"] or artifact is None:
        pytest.skip(f"no artifact ({_error_text(outcome)})")
    upload = corpus.model_path(model).stat().st_size
    assert artifact.stat().st_size <= upload, \
        f"dynamic int8 wrote {artifact.stat().st_size} bytes for a {upload}-byte upload"


@pytest.mark.parametrize("model", STATIC_CNNS, ids=lambda m: m.name)
def test_static_int8_on_cnn_at_least_as_faithful_as_onnxruntime_best_variant(model: ZooModel) -> None:
    engine_fidelity, engine_task = _measured(model.name, "static", required=True)
    best = run_pair.outcome(model, "ort_best")
    try:
        best_fidelity, best_task = _measured(model.name, "ort_best")
    except pytest.skip.Exception:
        return  # onnxruntime's best variant gives nothing usable here: a valid artifact already beats it
    except Exception as exc:  # noqa: BLE001 - its artifact does not load or run: same
        print(f"ort_best on {model.name} is invalid: {exc}; {best.get('notes')}")
        return
    assert engine_fidelity.worst[2] >= best_fidelity.worst[2] - COSINE_TOLERANCE, \
        f"worst-output cosine min {engine_fidelity.worst[2]:.4f} < onnxruntime's {best_fidelity.worst[2]:.4f}"
    if engine_task.value is not None and best_task.value is not None:
        assert engine_task.value >= best_task.value - 0.02, \
            f"{engine_task.label} {engine_task.value:.3f} < onnxruntime's {best_task.value:.3f}"


@pytest.mark.parametrize("model", STATIC_CNNS, ids=lambda m: m.name)
def test_static_int8_on_cnn_is_faster_or_says_so(model: ZooModel) -> None:
    outcome = run_pair.outcome(model, "static")
    if not outcome["ok"]:
        pytest.fail(f"no static artifact: {_error_text(outcome)}")
    speedup = outcome["metrics"]["latency"]["speedup"]
    warnings = outcome["metrics"].get("warnings", [])
    # the issue: "says plainly that it is not and names the fastest alternative it measured"
    named = [w for w in warnings if "slower" in w and any(k in w for k in ("faster", "fastest", "alternative"))]
    assert speedup >= 1.0 or named, f"speed-up {speedup} and no warning naming a faster alternative: {warnings}"


@pytest.mark.parametrize("model", TRANSFORMERS, ids=lambda m: m.name)
def test_weight_only_int4_keeps_transformer_cosine(model: ZooModel) -> None:
    fidelity, task = _measured(model.name, "weight_only", required=True)
    output, mean, _ = fidelity.worst
    assert mean >= 0.98, f"int4 weight-only: {output} cosine {mean:.4f} < 0.98 ({task.label} {task.value})"
