"""ONNX weight-only int4/int8 on real small models: MatMulNBits everywhere it should be, Gemm included."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tests import models
from worker.engine import EngineError, quantize
from worker.engine.config import WeightOnlyConfig
from worker.engine.onnx import rewrite as onnx_rewrite


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Training and HQQ/GPTQ use torch; on a busy 2-core machine two OpenMP threads made setup 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx_weight_only")


@pytest.fixture(scope="module")
def transformer_onnx(onnx_dir: Path) -> Path:
    example = torch.from_numpy(models.token_ids(2))
    return models.export_onnx(models.linear_heavy_transformer(), example, onnx_dir / "transformer.onnx")


@pytest.fixture(scope="module")
def ids_npz(onnx_dir: Path) -> Path:
    return models.save_npz(onnx_dir / "ids.npz", input_ids=models.token_ids(32, seed=1))


@pytest.fixture(scope="module")
def gemm_onnx(onnx_dir: Path) -> Path:
    return models.export_onnx(models.wide_mlp(), torch.from_numpy(models.digits_data()[2][:2]), onnx_dir / "mlp.onnx")


def _run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.min((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _nodes(path: Path, op: str) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op]


def test_int4_transformer_is_matmulnbits_at_under_020_size_and_faithful(transformer_onnx: Path, ids_npz: Path,
                                                                         tmp_path: Path) -> None:
    result = quantize(transformer_onnx, "onnx", "weight_only", {"dtype": "int4"}, tmp_path, evaluation_path=ids_npz,
                      model_name="encoder")
    [artifact] = result.artifacts
    assert artifact.filename == "encoder.int4.onnx"
    nbits = _nodes(artifact.path, "MatMulNBits")
    assert len(nbits) == 12  # q, k, v, o, ff1, ff2 in both blocks
    weights = {t.name for t in onnx.load(str(artifact.path)).graph.initializer}
    assert not any(n.input[1] in weights for n in _nodes(artifact.path, "MatMul"))  # only attention's remain
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nbits)
    assert _nodes(artifact.path, "GatherBlockQuantized")  # the embedding shrinks too
    assert artifact.path.stat().st_size / transformer_onnx.stat().st_size <= 0.20
    ids = models.token_ids(32, seed=2)
    assert _min_cosine(_run(transformer_onnx, {"input_ids": ids}), _run(artifact.path, {"input_ids": ids})) >= 0.95
    layers = {layer["name"]: layer for layer in result.metrics["layers"]}
    assert layers["embed"]["weight_dtype"] == "int4" and layers["blocks.1.ff2"]["weight_dtype"] == "int4"
    assert layers["blocks.0.q"]["activation_dtype"] == "int8" and layers["blocks.0.q"]["sqnr_db"] > 10
    summary = result.report["onnx_weight_only"]
    assert (summary["bits"], summary["block_size"], summary["accuracy_level"]) == (4, 128, 4)


def test_gemm_model_is_rewritten_and_covered(gemm_onnx: Path, tmp_path: Path) -> None:
    assert len(_nodes(gemm_onnx, "Gemm")) == 3  # the premise: Linear on flat inputs exports as Gemm
    result = quantize(gemm_onnx, "onnx", "weight_only", {"dtype": "int4", "group_size": 32}, tmp_path)
    artifact = result.artifacts[0].path
    assert len(_nodes(artifact, "MatMulNBits")) == 3 and not _nodes(artifact, "Gemm")
    assert result.metrics["size"]["ratio"] <= 0.25
    assert result.report["onnx_weight_only"]["gemm_rewritten"] == 3
    assert {layer["weight_dtype"] for layer in result.metrics["layers"]} == {"int4"}  # symmetric: no zero points
    x = models.digits_data()[2]
    assert _min_cosine(_run(gemm_onnx, {"x": x}), _run(artifact, {"x": x})) >= 0.95


def test_int8_is_8bit_matmulnbits_with_an_int8_embedding(transformer_onnx: Path, ids_npz: Path,
                                                         tmp_path: Path) -> None:
    result = quantize(transformer_onnx, "onnx", "weight_only", {"dtype": "int8"}, tmp_path, evaluation_path=ids_npz)
    artifact = result.artifacts[0].path
    assert artifact.name == "model.int8.onnx"
    nbits = _nodes(artifact, "MatMulNBits")
    assert len(nbits) == 12 and all({a.name: a.i for a in n.attribute}["bits"] == 8 for n in nbits)
    layers = {layer["name"]: layer["weight_dtype"] for layer in result.metrics["layers"]}
    # onnxruntime stores a dynamically quantized embedding table as asymmetric uint8, whatever weight_type says
    assert layers["embed"] == "uint8" and layers["blocks.0.ff1"] == "int8"
    assert result.metrics["size"]["ratio"] <= 0.30
    assert result.metrics["fidelity"]["cosine"] >= 0.999


@pytest.mark.parametrize("algorithm", ["hqq", "gptq"])
def test_hqq_and_gptq_run_and_stay_faithful(algorithm: str, transformer_onnx: Path, tmp_path: Path) -> None:
    calibration = models.save_npz(tmp_path / "cal.npz", input_ids=models.token_ids(8, seed=4))
    result = quantize(transformer_onnx, "onnx", "weight_only", {"dtype": "int4", "algorithm": algorithm},
                      tmp_path / "job", calibration_path=calibration)
    artifact = result.artifacts[0].path
    assert len(_nodes(artifact, "MatMulNBits")) == 12 and _nodes(artifact, "GatherBlockQuantized")
    assert result.metrics["fidelity"]["cosine"] >= 0.95 and result.metrics["size"]["ratio"] <= 0.20
    assert result.report["onnx_weight_only"]["algorithm"] == algorithm


def test_exclude_keeps_the_named_layer_float(transformer_onnx: Path, tmp_path: Path) -> None:
    result = quantize(transformer_onnx, "onnx", "weight_only", {"dtype": "int4", "exclude": [r"blocks\.0\.ff1$"]},
                      tmp_path)
    layers = {layer["name"]: layer["weight_dtype"] for layer in result.metrics["layers"]}
    assert layers["blocks.0.ff1"] == "float32" and layers["blocks.0.ff2"] == "int4"
    assert len(_nodes(result.artifacts[0].path, "MatMulNBits")) == 11


@pytest.mark.parametrize(("config", "message"), [
    ({"group_size": -1}, "per-channel"),
    ({"granularity": "per_channel"}, "per-channel"),
    ({"algorithm": "awq", "dtype": "int4"}, "awq"),
    ({"algorithm": "hqq", "dtype": "int8"}, "4-bit only"),
])
def test_what_onnxruntime_cannot_do_is_refused_as_unsupported(config: dict, message: str, gemm_onnx: Path,
                                                              tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=message) as caught:
        quantize(gemm_onnx, "onnx", "weight_only", config, tmp_path / "job")
    assert caught.value.code == "unsupported"
    assert not (tmp_path / "job").exists() or not list((tmp_path / "job").iterdir())


def test_gptq_and_awq_require_calibration_data() -> None:
    assert WeightOnlyConfig(algorithm="gptq").required_datasets() == {"calibration"}
    assert WeightOnlyConfig(algorithm="awq").required_datasets() == {"calibration"}
    assert WeightOnlyConfig(algorithm="hqq").required_datasets() == set()
    assert WeightOnlyConfig().required_datasets() == set()


def test_gptq_without_calibration_is_refused(gemm_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="calibration dataset"):
        quantize(gemm_onnx, "onnx", "weight_only", {"dtype": "int4", "algorithm": "gptq"}, tmp_path)


def _conv_only(path: Path) -> Path:
    weight = np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_model_without_matmul_weights_fails_with_nothing_to_quantize(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="nothing to quantize") as caught:
        quantize(_conv_only(tmp_path / "conv.onnx"), "onnx", "weight_only", {"dtype": "int4"}, tmp_path / "job")
    assert caught.value.code == "nothing_to_quantize"


def test_gemm_rewrite_keeps_outputs_and_leaves_what_it_cannot_fold(gemm_onnx: Path) -> None:
    model = onnx.load(str(gemm_onnx))
    scaled = next(n for n in model.graph.node if n.op_type == "Gemm")
    alpha = next(a for a in scaled.attribute if a.name == "alpha")
    alpha.f = 0.5  # alpha != 1: left as Gemm, and counted as such
    expected = _run_model(model)
    assert onnx_rewrite.gemm_to_matmul(model) == (2, 1)
    onnx.checker.check_model(model)
    np.testing.assert_allclose(_run_model(model), expected, rtol=1e-5, atol=1e-5)
    assert [n.op_type for n in model.graph.node].count("MatMul") == 2


def _run_model(model: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": models.digits_data()[2]})[0]
