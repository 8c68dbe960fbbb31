"""ONNX static int8 on real small models: integer QDQ artifacts, faithful, and honest about what stayed float."""

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


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Training and HQQ/GPTQ use torch; on a busy 2-core machine two OpenMP threads made setup 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx_static")


@pytest.fixture(scope="module")
def digits_calibration(onnx_dir: Path) -> Path:
    return models.save_npz(onnx_dir / "digits_cal.npz", x=models.digits_data()[0][:256])


@pytest.fixture(scope="module")
def digits_eval(onnx_dir: Path) -> Path:
    _, _, x_test, y_test = models.digits_data()
    return models.save_npz(onnx_dir / "digits_eval.npz", x=x_test, labels=y_test)


@pytest.fixture(scope="module")
def cnn_onnx(onnx_dir: Path) -> Path:
    example = torch.from_numpy(models.digits_data()[2][:2])
    return models.export_onnx(models.train_wide_digits_cnn(), example, onnx_dir / "cnn.onnx")


@pytest.fixture(scope="module")
def lstm_onnx(onnx_dir: Path) -> Path:
    example = torch.from_numpy(models.digits_data()[2][:2])
    return models.export_onnx(models.train_digits_lstm(), example, onnx_dir / "lstm.onnx")


@pytest.fixture(scope="module")
def cnn_minmax(cnn_onnx: Path, digits_calibration: Path, digits_eval: Path, onnx_dir: Path):
    return quantize(cnn_onnx, "onnx", "static", {}, onnx_dir / "minmax", calibration_path=digits_calibration,
                    evaluation_path=digits_eval, model_name="digits_cnn")


def _run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _integer_weights(path: Path) -> set[str]:
    return {t.name for t in onnx.load(str(path)).graph.initializer
            if t.data_type in (TensorProto.INT8, TensorProto.UINT8) and np.prod(t.dims) > 64}


def _top1(path: Path) -> float:
    _, _, x_test, y_test = models.digits_data()
    return float(np.mean(_run(path, {"x": x_test}).argmax(1) == y_test))


def test_cnn_becomes_int8_qdq_within_one_point_of_float_at_under_030_size(cnn_onnx: Path, cnn_minmax) -> None:
    [artifact] = cnn_minmax.artifacts
    assert artifact.filename == "digits_cnn.int8.onnx" and artifact.kind == "model"
    ops = _ops(artifact.path)
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and ops.count("Conv") == 2
    assert _top1(artifact.path) >= _top1(cnn_onnx) - 0.01
    assert artifact.path.stat().st_size / cnn_onnx.stat().st_size <= 0.30
    metrics = cnn_minmax.metrics
    assert metrics["size"]["ratio"] <= 0.30 and metrics["accuracy"]["delta"] >= -0.01
    assert [(layer["op"], layer["weight_dtype"], layer["activation_dtype"]) for layer in metrics["layers"]] == [
        ("Conv", "int8", "uint8"), ("Conv", "int8", "uint8"), ("Gemm", "int8", "uint8"), ("Gemm", "int8", "uint8")]
    assert all(layer["sqnr_db"] > 25 for layer in metrics["layers"])
    summary = cnn_minmax.report["onnx_static"]
    # no algorithm named: the one most faithful on a held-out quarter of the calibration set
    selection = summary["calibration_selection"]
    assert set(selection["held_out_cosine"]) == {"minmax", "percentile", "entropy"}
    assert selection["held_out_cosine"][selection["chosen"]] == max(selection["held_out_cosine"].values())
    assert selection["fit_samples"] == 192 and selection["held_out_samples"] == 64
    assert summary["calibration_method"] == {"minmax": "MinMax", "percentile": "Percentile",
                                             "entropy": "Entropy"}[selection["chosen"]]
    assert summary["calibration_samples"] == 256
    assert (summary["activation_type"], summary["weight_type"], summary["format"]) == ("uint8", "int8", "QDQ")
    assert summary["reduce_range"] == (cnn_minmax.report["host"]["vnni"] is False)
    assert {"versions", "host"} <= set(cnn_minmax.report)


def _activation_scales(path: Path) -> dict[str, float]:
    """QuantizeLinear input -> its scale: what calibration decided (weights are DequantizeLinear-only)."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in inits}


def test_entropy_chooses_its_own_ranges_not_min_max(cnn_onnx: Path, digits_calibration: Path, tmp_path: Path) -> None:
    """onnxruntime's Entropy defaults (128 bins, 128 quantized bins) leave its KL search one threshold, the full
    span: entropy artifacts were byte-identical to minmax's. With more bins it clips some long tails."""
    scales = {}
    for algorithm in ("minmax", "entropy"):
        config = {"calibration": {"algorithm": algorithm, "num_samples": 128}}
        result = quantize(cnn_onnx, "onnx", "static", config, tmp_path / algorithm,
                          calibration_path=digits_calibration)
        scales[algorithm] = _activation_scales(result.artifacts[0].path)
    assert scales["minmax"].keys() == scales["entropy"].keys() and scales["minmax"]
    clipped = [t for t in scales["minmax"] if scales["entropy"][t] < scales["minmax"][t] * 0.99]
    assert clipped, f"entropy chose min-max ranges everywhere: {scales}"
    assert all(scales["entropy"][t] <= scales["minmax"][t] * 1.0001 for t in scales["minmax"])  # it only clips


@pytest.mark.parametrize(("algorithm", "method"),
                         [("entropy", "Entropy"), ("percentile", "Percentile"), ("histogram", "Distribution")])
def test_every_calibration_algorithm_keeps_top1_within_one_point(
        algorithm: str, method: str, cnn_onnx: Path, digits_calibration: Path, digits_eval: Path,
        tmp_path: Path) -> None:
    config = {"calibration": {"algorithm": algorithm, "percentile": 99.99, "num_samples": 128}}
    result = quantize(cnn_onnx, "onnx", "static", config, tmp_path, calibration_path=digits_calibration,
                      evaluation_path=digits_eval)
    assert result.report["onnx_static"]["calibration_method"] == method
    assert result.report["onnx_static"]["calibration_samples"] == 128
    # histogram = onnxruntime's Distribution, whose symmetric range needs the Relus kept (else 0.94 -> 0.89)
    assert _top1(result.artifacts[0].path) >= _top1(cnn_onnx) - 0.01
    assert result.metrics["size"]["ratio"] <= 0.30


def test_lstm_weights_become_int8_through_dynamic_lstm(lstm_onnx: Path, digits_calibration: Path,
                                                        digits_eval: Path, tmp_path: Path) -> None:
    result = quantize(lstm_onnx, "onnx", "static", {}, tmp_path, calibration_path=digits_calibration,
                      evaluation_path=digits_eval)
    ops = _ops(result.artifacts[0].path)
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops and "QuantizeLinear" in ops
    assert result.metrics["size"]["ratio"] <= 0.35
    assert ("LSTM", "int8") in {(layer["op"], layer["weight_dtype"]) for layer in result.metrics["layers"]}
    assert any("quantized dynamically" in w for w in result.metrics["warnings"])
    assert result.report["onnx_static"]["lstms_dynamic_int8"] == 1
    assert result.metrics["fidelity"]["top1_agreement"] >= 0.97


def test_transformer_is_limited_to_matmul_gemm_gather_and_stays_faithful(onnx_dir: Path, tmp_path: Path) -> None:
    path = models.export_onnx(models.tiny_transformer(), torch.from_numpy(models.token_ids(2)),
                              onnx_dir / "transformer.onnx")
    calibration = models.save_npz(tmp_path / "cal.npz", input_ids=models.token_ids(64, seed=3))
    result = quantize(path, "onnx", "static", {}, tmp_path / "job", calibration_path=calibration)
    artifact = result.artifacts[0].path
    ids = models.token_ids(32, seed=1)
    f, q = _run(path, {"input_ids": ids}), _run(artifact, {"input_ids": ids})
    assert np.min((f * q).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1))) >= 0.9
    assert result.report["onnx_static"]["op_types"] == ["MatMul", "Gemm", "Gather"]
    assert result.report["onnx_static"]["transformer_like"] is True
    assert any("'dynamic'" in w and "transformer" in w for w in result.metrics["warnings"])
    quantized = onnx.load(str(artifact))
    producers = {o: n.op_type for n in quantized.graph.node for o in n.output}
    quantized_from = {producers.get(n.input[0]) for n in quantized.graph.node if n.op_type == "QuantizeLinear"}
    assert "Softmax" not in quantized_from  # attention probabilities stay float
    assert not any(producers.get(n.input[0]) == "DequantizeLinear" for n in quantized.graph.node
                   if n.op_type in ("Softmax", "LayerNormalization"))
    layers = {layer["name"]: layer["weight_dtype"] for layer in result.metrics["layers"]}
    assert all(layers[f"blocks.{b}.{p}"] == "int8" for b in (0, 1) for p in ("q", "k", "v", "o", "ff1", "ff2"))


def _masked_model(path: Path) -> Path:
    """x -> fc1 -> * scale -> + mask (-inf on a quarter of the units) -> Relu -> fc2: calibration sees -inf.

    The Mul keeps onnxruntime's pre-processing from fusing fc1 and the mask into one Gemm (it does).
    """
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 32), np.float32)
    mask[0, 24:] = -np.inf
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Mul", ["h", "scale"], ["scaled"], name="scale"),
         helper.make_node("Add", ["scaled", "mask"], ["masked"], name="mask_add"),
         helper.make_node("Relu", ["masked"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((32, 10)).astype(np.float32), "w2"),
         numpy_helper.from_array(mask, "mask"), numpy_helper.from_array(np.float32(0.5), "scale")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("algorithm", ["minmax", "entropy"])
def test_tensor_with_infinite_range_stays_float_and_is_named(algorithm: str, tmp_path: Path) -> None:
    path = _masked_model(tmp_path / "masked.onnx")
    x = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    calibration = models.save_npz(tmp_path / "cal.npz", x=x)
    result = quantize(path, "onnx", "static", {"calibration": {"algorithm": algorithm}}, tmp_path / "job",
                      calibration_path=calibration)
    artifact = result.artifacts[0].path
    quantized = onnx.load(str(artifact))
    assert "masked" not in {n.input[0] for n in quantized.graph.node if n.op_type == "QuantizeLinear"}
    f, q = _run(path, {"x": x}), _run(artifact, {"x": x})
    assert np.all(np.isfinite(q))
    assert np.min((f * q).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1))) >= 0.99
    assert result.report["onnx_static"]["non_finite_tensors"] == ["masked"]
    warnings = " | ".join(result.metrics["warnings"])
    assert "non-finite range" in warnings and "masked" in warnings
    if algorithm == "entropy":  # the histogram calibrators fail on inf: min-max stands in, and says so
        assert result.report["onnx_static"]["calibration_method"] == "MinMax" and "minmax instead" in warnings
    assert {layer["name"]: layer["weight_dtype"] for layer in result.metrics["layers"]} == {
        "fc1": "int8", "fc2": "int8"}


def test_exclude_keeps_the_named_layer_float(cnn_onnx: Path, digits_calibration: Path, tmp_path: Path) -> None:
    result = quantize(cnn_onnx, "onnx", "static", {"exclude": ["^fc$"]}, tmp_path,
                      calibration_path=digits_calibration)
    dtypes = {layer["name"]: layer["weight_dtype"] for layer in result.metrics["layers"]}
    assert dtypes["fc"] == "float32" and dtypes["head"] == "int8"
    assert list(dtypes.values()).count("int8") == 3
    integer = _integer_weights(result.artifacts[0].path)
    assert not any(name.startswith("fc.") for name in integer) and any(name.startswith("head.") for name in integer)
    assert result.report["onnx_static"]["excluded_by_config"] == ["fc"]


def test_cpu_without_vnni_quantizes_weights_to_7_bits(cnn_onnx: Path, digits_calibration: Path, digits_eval: Path,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.engine import report

    host = {**report.host_info(), "vnni": False}
    monkeypatch.setattr(report, "host_info", lambda: host)
    result = quantize(cnn_onnx, "onnx", "static", {}, tmp_path, calibration_path=digits_calibration,
                      evaluation_path=digits_eval)
    summary = result.report["onnx_static"]
    assert summary["reduce_range"] is True and summary["reduce_range_reason"] == "no VNNI on this CPU"
    assert result.report["host"]["vnni"] is False
    assert _top1(result.artifacts[0].path) >= _top1(cnn_onnx) - 0.01


def test_collapse_check_retries_with_reduce_range(cnn_onnx: Path, digits_calibration: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.engine.onnx import static as onnx_static

    monkeypatch.setattr(onnx_static, "COLLAPSE_COSINE", 1.01)  # treat any result as a collapse
    logs: list[str] = []
    result = quantize(cnn_onnx, "onnx", "static", {}, tmp_path, calibration_path=digits_calibration,
                      log=lambda level, message: logs.append(message))
    summary = result.report["onnx_static"]
    assert "retry" in summary and summary["retry"]["cosine"] > 0.99
    assert any("with reduce_range" in message for message in logs)
    assert result.metrics["fidelity"]["top1_agreement"] >= 0.97


def test_without_calibration_data_static_is_refused(cnn_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="calibration dataset"):
        quantize(cnn_onnx, "onnx", "static", {}, tmp_path / "job")


def test_job_folder_holds_only_the_artifact(lstm_onnx: Path, digits_calibration: Path, tmp_path: Path) -> None:
    work = tmp_path / "job"
    quantize(lstm_onnx, "onnx", "static", {}, work, calibration_path=digits_calibration, model_name="m")
    assert sorted(p.name for p in work.iterdir()) == ["m.int8.onnx"]
