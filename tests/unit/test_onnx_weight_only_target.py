"""ONNX weight-only sensitivity and targets (issue 14): the bookkeeping on plain values, then the engine on a
small MLP whose one outlier layer int4 ruins (test_onnx_weight_only_mixed): escalation int4 -> int8 -> float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import models
from tests.unit.test_onnx_weight_only_mixed import _cosines, _mlp_with_an_outlier_layer
from worker.engine import quantize
from worker.engine import sensitivity as s
from worker.engine.errors import EngineError
from worker.engine.onnx import weight_only_target as wt
from worker.engine.onnx.common import WeightNode
from worker.engine.types import no_log

COSINE_GOAL = s.Goal("cosine", 0.01, False, 1.0, 60.0, True)


def _figures(cosine: float) -> s.Figures:
    return s.Figures(cosine=cosine, top1_agreement=None, accuracy=None)


def _file(path: Path, size: int) -> Path:
    path.write_bytes(b"x" * size)
    return path


class _Ctx:
    log = staticmethod(no_log)


def _job(nodes: list[WeightNode], candidates: dict[str, int]) -> wt.Job:
    return wt.Job(_Ctx(), lambda kept, eight: Path(), candidates, nodes, None, 4)  # type: ignore[arg-type]


def test_best_keeps_the_smallest_file_that_meets_else_the_smallest_drop_and_never_removes_plain(tmp_path: Path) -> None:
    plain = _file(tmp_path / "plain", 10)
    job = _job([], {})
    best = wt.Best(COSINE_GOAL, wt.Candidate(plain, frozenset(), frozenset(), _figures(0.95), "plain"), plain)
    closer = _file(tmp_path / "closer", 30)
    assert not best.offer(job, wt.Candidate(closer, frozenset({"a"}), frozenset(), _figures(0.97), "int8"))
    assert best.current.path == closer and plain.exists()  # the plain file is the caller's
    worse = _file(tmp_path / "worse", 20)
    assert not best.offer(job, wt.Candidate(worse, frozenset({"b"}), frozenset(), _figures(0.96), "int8"))
    assert best.current.path == closer and not worse.exists()
    big = _file(tmp_path / "big", 50)
    assert best.offer(job, wt.Candidate(big, frozenset({"a", "b"}), frozenset(), _figures(0.995), "int8"))
    assert best.current.path == big and not closer.exists()
    small = _file(tmp_path / "small", 40)  # meets with less: it wins over the more faithful but bigger one
    assert best.offer(job, wt.Candidate(small, frozenset({"a"}), frozenset({"a"}), _figures(0.991), "float"))
    assert best.current.path == small and not big.exists() and best.met()
    missing = _file(tmp_path / "missing", 1)  # smaller, but short of the goal: never preferred to one that meets
    assert not best.offer(job, wt.Candidate(missing, frozenset(), frozenset(), _figures(0.9), "int8"))
    assert best.current.path == small and not missing.exists()
    assert [t["step"] for t in best.tried] == ["int8", "int8", "int8", "float", "int8"]


def test_ranked_puts_lossy_layers_first_then_the_unmeasured_and_never_every_layer() -> None:
    ranking = s.Ranking(layers=[{"node": "a", "drop": 0.2, "cosine": 0.9}, {"node": "b", "drop": 0.0, "cosine": 0.99},
                                {"node": "c", "drop": 0.0, "cosine": 1.0}], not_measured=["d"], stopped_by="budget")
    assert wt.ranked(ranking, 4) == ["a", "b", "d"]
    assert wt.ranked(ranking, 2) == ["a"]
    assert wt.ranked(s.Ranking(), 0) == []


def test_probes_run_largest_gain_first_then_largest_layer() -> None:
    candidates = {"small": 10, "big": 1000, "gained": 10, "mid": 100}
    assert wt.probe_order(candidates, {"gained": 0.01, "small": 0.0}) == ["gained", "small", "big", "mid"]
    assert wt.probe_order(candidates, {}) == ["big", "mid", "small", "gained"]


def test_suggested_exclude_names_the_upload_layers_and_round_trips_through_a_gemm_rewrite() -> None:
    nodes = [WeightNode("fc/Gemm", "Gemm", ("w1",), "fc", 64), WeightNode("m1", "MatMul", ("w2",), "block", 64),
             WeightNode("m2", "MatMul", ("w3",), "block", 64), WeightNode("emb", "Gather", ("t",), "emb", 64)]
    job = _job(nodes, {"fc/Gemm_MatMul": 64, "m1": 64, "m2": 64, "emb": 64})
    assert job.upload_node("fc/Gemm_MatMul").node == "fc/Gemm"
    assert job.names(["fc/Gemm_MatMul", "m1", "emb"]) == ["fc", "m1", "emb"]  # "block" is two nodes: node names
    patterns = job.suggested(["fc/Gemm_MatMul", "m1"])
    assert patterns == ["^fc$", "^m1$"]
    layers = {n.node: (n.node, n.layer, *n.weights) for n in nodes}
    assert s.round_trips(patterns, layers, {"fc/Gemm", "m1"})


@pytest.fixture(scope="module")
def outlier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("wo-target")
    rng = np.random.default_rng(1)
    evaluation = models.save_npz(tmp / "ev.npz", x=rng.standard_normal((16, 8, 64)).astype(np.float32))
    return _mlp_with_an_outlier_layer(tmp / "mlp.onnx"), evaluation


def _quantize(outlier: tuple[Path, Path], config: dict, work: Path):  # noqa: ANN202
    model, evaluation = outlier
    return quantize(model, "onnx", "weight_only", {"dtype": "int4", "group_size": 32, **config}, work,
                    evaluation_path=evaluation)


def test_int4_missing_a_cosine_target_keeps_the_outlier_layer_at_8_bits_and_meets_it(
        outlier: tuple[Path, Path], tmp_path: Path) -> None:
    result = _quantize(outlier, {"target": {"metric": "cosine", "max_drop": 0.01}}, tmp_path / "job")
    assert result.error is None
    target = result.metrics["target"]
    assert target["met"] and target["before"]["cosine"] < 0.99 <= target["after"]["cosine"]
    assert target["kept"] == [{"name": "fc2", "bits": 8}] and target["kept_float"] == []
    assert target["cost"]["bytes_after"] > target["cost"]["bytes_before"]
    layers = {layer["name"]: layer["weight_dtype"] for layer in result.metrics["layers"]}
    assert layers == {"fc1": "int4", "fc2": "int8", "fc3": "int4"}
    # what the target says is what the delivered file does
    measured = _cosines(outlier[0], result.artifacts[0].path, np.load(str(outlier[1]))["x"])
    assert float(measured.mean()) == pytest.approx(target["after"]["cosine"], abs=1e-3)
    assert result.report["onnx_weight_only"]["kept_8bit_for_fidelity"][0]["name"] == "fc2"


def test_a_target_8_bits_cannot_reach_keeps_layers_float_and_one_out_of_reach_is_target_not_met(
        outlier: tuple[Path, Path], tmp_path: Path) -> None:
    # int8 everywhere stays below cosine 0.99999: the escalation goes on to float layers
    result = _quantize(outlier, {"target": {"metric": "cosine", "max_drop": 0.00001}}, tmp_path / "job")
    target = result.metrics["target"]
    steps = {t["step"] for t in target["tried"]}
    assert {"int8", "float"} <= steps, target["tried"]
    assert not target["met"] and result.error is not None and result.error["code"] == "target_not_met"
    assert target["after"]["cosine"] > target["before"]["cosine"]
    assert result.artifacts[0].path.exists()  # the best candidate is still delivered
    assert [p.name for p in (tmp_path / "job").rglob("*.onnx")] == [result.artifacts[0].path.name]


def test_sensitivity_ranks_the_outlier_first_and_its_suggestion_round_trips_as_exclude(
        outlier: tuple[Path, Path], tmp_path: Path) -> None:
    plain = _quantize(outlier, {}, tmp_path / "plain")
    sensitivity = plain.metrics["sensitivity"]
    assert [layer["name"] for layer in sensitivity["layers"]][0] == "fc2" and "20 s" in sensitivity["bound"]
    assert sensitivity["goal"]["source"] == "default" and sensitivity["goal"]["metric"] == "cosine"
    # the job's own 8-bit keep of fc2 already reaches the default 0.995: nothing to exclude
    assert plain.metrics["fidelity"]["cosine"] >= 0.995 and sensitivity["suggested_exclude"] == []
    # with a target, the suggestion is for the plain int4 file: fc2 float
    target = {"target": {"metric": "cosine", "max_drop": 0.005}}
    aimed = _quantize(outlier, target, tmp_path / "aimed").metrics["sensitivity"]
    assert aimed["goal"]["source"] == "target" and aimed["suggested_exclude"] == ["^fc2$"]
    assert aimed["suggested_reaches_goal"] and aimed["quantized"]["cosine"] < 0.995
    again = _quantize(outlier, {**target, "exclude": aimed["suggested_exclude"]}, tmp_path / "again")
    assert again.report["onnx_weight_only"]["excluded_by_config"] == ["fc2"]
    assert again.metrics["target"]["met"] and again.metrics["target"]["kept"] == []  # no escalation needed
    assert again.metrics["fidelity"]["cosine"] >= 0.995


def test_bits_auto_and_a_target_together_are_refused(outlier: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="give one of them") as failure:
        _quantize(outlier, {"bits": "auto", "max_size_ratio": 0.5, "target": {"metric": "cosine"}}, tmp_path)
    assert failure.value.code == "unsupported"


def test_a_target_candidate_that_does_not_validate_falls_back_to_the_plain_file_and_says_so(tmp_path: Path) -> None:
    broken = _file(tmp_path / "candidate.onnx", 64)  # not an ONNX model: check_artifact refuses it
    outcome = wt.Outcome(report={}, path=broken, target={"met": True, "before": {"cosine": 0.9}, "after": {},
                                                         "kept_float": ["fc1"], "cost": {}})
    warnings: list[str] = []
    checked = wt.checked(outcome, {"x": np.zeros((1, 4), np.float32)}, False, warnings)
    assert checked.path is None and not broken.exists()
    assert checked.target == {"met": False, "before": {"cosine": 0.9}, "after": {"cosine": 0.9}, "kept": [],
                              "kept_8bit": [], "kept_float": [], "step": "plain"}
    assert checked.error is not None and checked.error["code"] == "target_not_met"
    assert len(warnings) == 1 and "the plain file is delivered" in warnings[0] and "4 bits" not in warnings[0]
