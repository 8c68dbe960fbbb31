"""Weight-only int8/int4 on torch.export programs: smaller, faithful, and loadable with plain torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests import models
from worker.engine import EngineError, quantize
from worker.engine.registry import resolve


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("torch_weight_only")


@pytest.fixture(scope="module")
def digits_eval(workdir: Path) -> Path:
    _, _, x_test, y_test = models.digits_data()
    return models.save_npz(workdir / "digits_eval.npz", x=x_test, labels=y_test)


@pytest.fixture(scope="module")
def mlp_file(workdir: Path) -> Path:
    mlp, example = models.train_digits_mlp(), torch.from_numpy(models.digits_data()[2][:2])
    return models.save_torch_export(mlp, example, workdir / "mlp.pt2")


@pytest.mark.parametrize(("dtype", "max_ratio", "min_agreement"), [("int8", 0.35, 0.95), ("int4", 0.22, 0.9)])
def test_digits_mlp_shrinks_loads_with_plain_torch_and_agrees(dtype: str, max_ratio: float, min_agreement: float,
                                                              mlp_file: Path, digits_eval: Path,
                                                              workdir: Path) -> None:
    result = quantize(mlp_file, "torch_export", "weight_only", {"dtype": dtype, "group_size": 32},
                      workdir / f"work-{dtype}", evaluation_path=digits_eval, model_name="digits-mlp")
    (artifact,) = result.artifacts
    assert artifact.filename == f"digits-mlp.{dtype}.pt2" and artifact.format == "torch_export"
    ratio = artifact.path.stat().st_size / mlp_file.stat().st_size
    assert ratio <= max_ratio, ratio

    program = torch.export.load(str(artifact.path))
    assert not [n for n in program.graph.nodes if n.op == "call_function" and "torchao" in str(n.target)]
    tensors = {**program.state_dict, **program.constants}
    weight_shapes = {(256, 64), (256, 256), (10, 256)}
    assert not [n for n, t in tensors.items() if t.is_floating_point() and tuple(t.shape) in weight_shapes]
    x = torch.from_numpy(models.digits_data()[2])
    with torch.no_grad():
        reference = models.train_digits_mlp()(x).numpy()
        quantized = program.module()(x).numpy()
    assert np.mean(quantized.argmax(1) == reference.argmax(1)) >= min_agreement

    metrics = result.metrics
    assert metrics["size"]["ratio"] == pytest.approx(ratio, abs=1e-3)
    assert metrics["fidelity"]["top1_agreement"] >= min_agreement
    assert metrics["latency"]["runtime"] == f"torch {torch.__version__} (eager, torchao)"
    assert {layer["name"]: layer["weight_dtype"] for layer in metrics["layers"]} == {
        "fc1": dtype, "fc2": dtype, "head": dtype}
    if metrics["latency"]["speedup"] < 1.0:
        assert any("slower" in w for w in metrics["warnings"])


def test_exclude_keeps_a_layer_float_and_default_group_falls_back_per_channel(mlp_file: Path, digits_eval: Path,
                                                                              tmp_path: Path) -> None:
    result = quantize(mlp_file, "torch_export", "weight_only", {"exclude": ["^head$"]}, tmp_path,
                      evaluation_path=digits_eval)
    dtypes = {layer["name"]: layer["weight_dtype"] for layer in result.metrics["layers"]}
    assert dtypes == {"fc1": "int8", "fc2": "int8", "head": "float32"}
    assert result.metrics["fidelity"]["top1_agreement"] >= 0.95
    assert any("fc1" in w and "per output channel" in w for w in result.metrics["warnings"])  # 64 inputs < 128
    program = torch.export.load(str(result.artifacts[0].path))
    assert [t.dtype for n, t in program.state_dict.items() if t.shape == (10, 256)] == [torch.float32]


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_transformer_linears_and_embedding(dtype: str, tmp_path: Path) -> None:
    model, ids = models.tiny_transformer(), models.token_ids(48)
    path = models.save_torch_export(model, torch.from_numpy(ids[:2]), tmp_path / "tiny.pt2")
    data = models.save_npz(tmp_path / "ids.npz", input_ids=ids)
    result = quantize(path, "torch_export", "weight_only", {"dtype": dtype, "group_size": 32, "symmetric": False},
                      tmp_path / "work", evaluation_path=data)
    dtypes = {layer["name"]: layer["weight_dtype"] for layer in result.metrics["layers"]}
    assert set(dtypes.values()) == {dtype} and len(dtypes) == 13 and "embed" in dtypes
    assert result.metrics["size"]["ratio"] <= (0.35 if dtype == "int8" else 0.25)
    assert result.metrics["fidelity"]["cosine_min"] >= (0.999 if dtype == "int8" else 0.98)
    out = torch.export.load(str(result.artifacts[0].path)).module()(torch.from_numpy(ids[:3]))
    with torch.no_grad():
        reference = model(torch.from_numpy(ids[:3]))
    assert out.shape == (3, 64) and torch.nn.functional.cosine_similarity(out, reference).min() > 0.98


def test_only_rtn_is_offered(mlp_file: Path, tmp_path: Path) -> None:
    spec = resolve("torch_export", "weight_only")
    assert spec.dtypes == ("int8", "int4")
    config = spec.config_model(algorithm="hqq")
    assert spec.config_problems(config, "cpu") == [
        ("algorithm", "'hqq' is not available: only rtn for torch.export on cpu")]
    assert spec.config_problems(spec.config_model(), "cpu") == []
    with pytest.raises(EngineError, match="only rtn for torch.export on cpu"):
        quantize(mlp_file, "torch_export", "weight_only", {"algorithm": "hqq"}, tmp_path)
