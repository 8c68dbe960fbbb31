"""method auto beyond ONNX (issue 14 item 4): torch.export, TorchScript and hf sweeps at the engine.

Each candidate runs through its own method's handler and is measured alike; the fastest meeting the goal is the
model, the others stay as `candidate` files, and an explicit target no candidate meets is target_not_met with the
most faithful delivered. AOTInductor is switched off (as in test_torch_static.py): the static .pt2 candidates are
timed in eager torch, and the compile would cost 12-45 s per static candidate here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests import hf_models, models
from worker import engine
from worker.engine import auto_runner
from worker.engine.auto_runner import artifact_name
from worker.engine.hf.auto import LATENCY_WARNING
from worker.engine.sweep import LATENCY_TIE
from worker.engine.torch_export import common as pt2_common
from worker.engine.torch_export.aoti import AOTI_ENV

EVALUATED = 256  # evaluate.load_samples' cap: the fidelity figures are over the first 256 held-out digits


@pytest.fixture(autouse=True)
def _no_aoti(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AOTI_ENV, "0")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("auto_torch")
    x_train, _, x_test, y_test = models.digits_data()
    example = torch.from_numpy(x_test[:2])
    cnn = models.train_digits_cnn()
    return {"pt2": models.save_torch_export(cnn, example, tmp / "digits-cnn.pt2"),
            "ts": models.save_torchscript(cnn, example, tmp / "digits-cnn.pt"),
            "calibration": models.save_npz(tmp / "cal.npz", x=x_train[:128]),
            "evaluation": models.save_npz(tmp / "eval.npz", x=x_test, labels=y_test)}


def _sweep(data: dict[str, Path], which: str, fmt: str, work: Path, **config: Any) -> engine.QuantizeResult:
    return engine.quantize(data[which], fmt, "auto", config, work, calibration_path=data["calibration"],
                           evaluation_path=data["evaluation"])


def check_pick(result: engine.QuantizeResult, work: Path, suffix: str, *, whole_file: bool = True) -> dict[str, Any]:
    """The table's invariants: one recommended row, the fastest meeting the goal (a tie within LATENCY_TIE taken by
    the smaller file), else the most faithful; its file is the model and its metrics the job's, every other measured
    candidate is a `candidate` file, and the work folder holds nothing else. Returns the recommended row.
    whole_file=False: the size counts the weights alone (hf: the safetensors inside the zip)."""
    sweep = result.metrics["sweep"]
    measured = [c for c in sweep["candidates"] if c["error"] is None]
    chosen = [c for c in sweep["candidates"] if c["recommended"]]
    assert [c["name"] for c in chosen] == [sweep["recommended"]]
    meeting = [c for c in measured if c["meets_target"]]
    if meeting:
        assert chosen[0]["meets_target"]
        assert chosen[0]["latency"]["ms_p50"] <= min(c["latency"]["ms_p50"] for c in meeting) * (1 + LATENCY_TIE)
    else:
        assert chosen[0]["drop"] == min(c["drop"] for c in measured)
    assert any(c["pareto"] for c in measured)
    assert sweep["why"].startswith(sweep["recommended"] if meeting else "no candidate meets")
    kinds = {a.filename: a.kind for a in result.artifacts}
    assert kinds == {f"model.{c['name']}{suffix}": "model" if c["recommended"] else "candidate" for c in measured}
    assert result.artifacts[0].kind == "model"
    assert sorted(p.name for p in work.rglob("*")) == sorted(kinds)  # no candidate folder or stray file left
    model_file = next(a.path for a in result.artifacts if a.kind == "model")
    assert chosen[0]["quantized_bytes"] == result.metrics["size"]["quantized_bytes"]
    assert model_file.stat().st_size == chosen[0]["quantized_bytes"] or not whole_file
    return chosen[0]


def _accuracy(run: Any, count: int = EVALUATED) -> float:
    """Top-1 of a delivered model on the held-out digits, one sample a call as the sweep measured it."""
    _, _, x_test, y_test = models.digits_data()
    with torch.no_grad():
        picks = [int(np.argmax(run(torch.from_numpy(x_test[i : i + 1])).numpy())) for i in range(count)]
    return float(np.mean(np.array(picks) == y_test[:count]))


def test_torch_export_auto_delivers_the_fastest_candidate_meeting_the_default_goal(
        digits: dict[str, Path], tmp_path: Path) -> None:
    result = _sweep(digits, "pt2", "torch_export", tmp_path)
    assert result.error is None
    sweep = result.metrics["sweep"]
    assert [c["name"] for c in sweep["candidates"]] == ["dynamic", "static_minmax", "static_histogram",
                                                         "weight_only_int8", "weight_only_int4"]
    assert all(c["error"] is None for c in sweep["candidates"])  # five measured: at least four, as issue 14 asks
    assert sweep["target"]["source"] == "default" and sweep["target"]["metric"] == "accuracy"
    assert "AOTInductor" in sweep["latency"]["how"] and result.report["torch_export_auto"]["recommended"] == \
        sweep["recommended"]
    chosen = check_pick(result, tmp_path, ".pt2")
    # the delivered file is that candidate's: loaded back as a user would, it scores what its row says
    model_file = next(a.path for a in result.artifacts if a.kind == "model")
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - the ops a quantized .pt2 calls (deliver.LOAD_NOTE)

    program = pt2_common.load_program(model_file, scratch=tmp_path.parent)
    assert abs(_accuracy(program.module()) - chosen["fidelity"]["accuracy"]) < 1e-3
    # static weights are int8 conv and Linear: the smallest files of the sweep
    sizes = {c["name"]: c["size_ratio"] for c in sweep["candidates"]}
    assert max(sizes["static_minmax"], sizes["static_histogram"]) < min(sizes["dynamic"], sizes["weight_only_int8"])


@pytest.mark.slow  # two AOTInductor compiles: ~90 s here
def test_torch_export_static_candidates_are_timed_by_their_compiled_packages(
        digits: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AOTI_ENV, "1")
    result = _sweep(digits, "pt2", "torch_export", tmp_path)
    sweep = result.metrics["sweep"]
    rows = {c["name"]: c for c in sweep["candidates"]}
    assert all(c["error"] is None for c in rows.values())
    kinds = {a.filename: a.kind for a in result.artifacts}
    for name in ("static_minmax", "static_histogram"):  # each static candidate delivered its package too
        package = "compiled_model" if rows[name]["recommended"] else "candidate"
        assert kinds[f"model.{name}.aoti.pt2"] == package
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(kinds)
    chosen = rows[sweep["recommended"]]
    meeting = [c for c in rows.values() if c["meets_target"]]
    assert chosen["meets_target"]
    assert chosen["latency"]["ms_p50"] <= min(c["latency"]["ms_p50"] for c in meeting) * (1 + LATENCY_TIE)
    # compiled int8 kernels against eager float and eager Q/DQ: the static packages are the fast ones here
    slowest_static = max(rows[n]["latency"]["ms_p50"] for n in ("static_minmax", "static_histogram"))
    assert slowest_static < min(rows[n]["latency"]["ms_p50"] for n in ("dynamic", "weight_only_int8"))


def test_torchscript_auto_sweeps_dynamic_and_both_static_observers(digits: dict[str, Path], tmp_path: Path) -> None:
    result = _sweep(digits, "ts", "torchscript", tmp_path)
    assert result.error is None
    rows = result.metrics["sweep"]["candidates"]
    assert [c["name"] for c in rows] == ["dynamic", "static_minmax", "static_histogram"]
    assert all(c["error"] is None and c["latency"]["ms_p50"] > 0 for c in rows)
    assert [c["config"]["calibration"]["algorithm"] for c in rows[1:]] == ["minmax", "histogram"]
    chosen = check_pick(result, tmp_path, ".pt")
    delivered = torch.jit.load(str(next(a.path for a in result.artifacts if a.kind == "model")))
    assert abs(_accuracy(delivered) - chosen["fidelity"]["accuracy"]) < 1e-3


def test_a_torchscript_target_no_candidate_meets_is_target_not_met_with_the_most_faithful_delivered(
        digits: dict[str, Path], tmp_path: Path) -> None:
    result = _sweep(digits, "ts", "torchscript", tmp_path, target={"metric": "cosine", "max_drop": 0.0})
    assert result.error is not None and result.error["code"] == "target_not_met"
    sweep = result.metrics["sweep"]
    measured = [c for c in sweep["candidates"] if c["error"] is None]
    assert len(measured) == 3 and not any(c["meets_target"] for c in measured)
    assert sweep["target"]["source"] == "target" and "no candidate meets the target" in sweep["why"]
    chosen = check_pick(result, tmp_path, ".pt")
    assert chosen["drop"] == min(c["drop"] for c in measured) > 0.0
    assert "it is delivered as the job's artifact" in result.error["message"]


def test_a_candidate_whose_file_does_not_load_back_is_a_row_with_its_reason_and_leaves_no_file(
        digits: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = auto_runner.model_file

    def broken(result: engine.QuantizeResult, kind: str = "model") -> Path | None:
        path = real(result, kind)
        if path is not None and path.parent.name == "static_minmax":
            raise RuntimeError("truncated archive")
        return path

    monkeypatch.setattr(auto_runner, "model_file", broken)
    result = _sweep(digits, "ts", "torchscript", tmp_path)
    rows = {c["name"]: c for c in result.metrics["sweep"]["candidates"]}
    assert rows["static_minmax"]["error"]["code"] == "engine_error"
    assert "did not load back" in rows["static_minmax"]["error"]["message"]
    assert not rows["static_minmax"]["recommended"] and rows["static_minmax"]["latency"] is None
    check_pick(result, tmp_path, ".pt")  # the two others delivered, and nothing of static_minmax is left


def test_hf_auto_on_a_tiny_llama_judges_a_perplexity_target_and_says_its_latency_is_float_like(
        tmp_path: Path) -> None:
    llama = hf_models.tiny_llama_zip(tmp_path)
    texts = hf_models.write_text_dataset(tmp_path / "texts.jsonl", 24)
    work = tmp_path / "out"
    result = engine.quantize(llama, "hf", "auto", {"target": {"metric": "perplexity", "max_drop": 0.02,
                                                             "relative": True}}, work, evaluation_path=texts)
    sweep = result.metrics["sweep"]
    rows = {c["name"]: c for c in sweep["candidates"]}
    assert list(rows) == ["weight_only_int8", "weight_only_int4"] and all(r["error"] is None for r in rows.values())
    assert sweep["target"]["metric"] == "perplexity" and sweep["target"]["source"] == "target"
    # the float perplexity the sweep judges by is the one each candidate's own job measured on the same texts
    assert sweep["target"]["float"] == pytest.approx(result.metrics["perplexity"]["float"], rel=1e-4)
    for row in rows.values():
        rise = (row["fidelity"]["perplexity"] - sweep["target"]["float"]) / sweep["target"]["float"]
        assert row["drop"] == pytest.approx(rise, abs=1e-4) and row["meets_target"] == (rise <= 0.02)
    assert rows["weight_only_int8"]["fidelity"]["cosine"] > rows["weight_only_int4"]["fidelity"]["cosine"]
    assert rows["weight_only_int4"]["size_ratio"] < rows["weight_only_int8"]["size_ratio"]
    assert LATENCY_WARNING in result.metrics["warnings"]
    assert (result.error is None) == any(r["meets_target"] for r in rows.values())
    check_pick(result, work, ".zip", whole_file=False)  # also: the unpacked float and candidate folders are gone


@pytest.mark.slow  # two llm-compressor passes and four loads of the real MiniLM: 25-80 s here
def test_hf_auto_on_minilm_delivers_int8_where_int4_misses_cosine_0995(tmp_path: Path) -> None:
    texts = hf_models.write_text_dataset(tmp_path / "texts.jsonl", 24)
    work = tmp_path / "out"
    result = engine.quantize(hf_models.minilm_zip(tmp_path), "hf", "auto", {}, work, evaluation_path=texts)
    sweep = result.metrics["sweep"]
    assert sweep["target"]["metric"] == "cosine" and sweep["target"]["max_drop"] == pytest.approx(0.005)
    assert all((c["fidelity"]["cosine"] >= 0.995) == c["meets_target"] for c in sweep["candidates"])
    chosen = check_pick(result, work, ".zip", whole_file=False)
    assert chosen["meets_target"], sweep["why"]


def test_candidate_files_are_named_after_the_candidate() -> None:
    assert artifact_name("model", "static_minmax", "model.int8.aoti.pt2") == "model.static_minmax.aoti.pt2"
    assert artifact_name("digits-cnn", "dynamic", "digits-cnn.int8.onnx") == "digits-cnn.dynamic.onnx"
    assert artifact_name("m", "weight_only_int4", "other.zip") == "m.weight_only_int4.zip"
