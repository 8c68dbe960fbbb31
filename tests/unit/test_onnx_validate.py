"""Artifact validation on small graphs built here: each kind of broken artifact fails at its own stage and names
its node, a good one passes, and the final error blames quantserve (engine_error), never the upload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from worker.engine.onnx import common as onnx_common
from worker.engine.onnx import normalize, validate
from worker.engine.onnx.validate import ArtifactInvalidError

RNG = np.random.default_rng(0)
X = {"x": RNG.standard_normal((1, 4)).astype(np.float32)}


def _save(tmp: Path, name: str, nodes: list, *, opset: int, inits: list | None = None,
          input_type: int = TensorProto.FLOAT, domains: tuple[str, ...] = (),
          out_shape: list | None = None) -> Path:
    """Saved without onnx.checker: most of these models are broken on purpose."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", input_type, [1, 4])],
                              [helper.make_tensor_value_info("y", input_type, out_shape or [1, 4])],
                              initializer=inits or [])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 7
    path = tmp / f"{name}.onnx"
    onnx.save_model(model, str(path))
    return path


def _per_channel_dequantize(tmp: Path, opset: int) -> Path:
    """What per-channel QDQ writes below opset 13: a DequantizeLinear with `axis`, which opset 10 lacks."""
    inits = [numpy_helper.from_array(RNG.integers(-127, 127, (4, 4)).astype(np.int8), "w_q"),
             numpy_helper.from_array(np.array([0.01, 0.02, 0.03, 0.04], np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w_zero")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=1, name="fc_w_dq"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")]
    return _save(tmp, f"dq_axis_{opset}", nodes, opset=opset, inits=inits)


def test_per_channel_dequantize_below_opset_13_fails_at_the_checker_naming_the_node(tmp_path: Path) -> None:
    with pytest.raises(ArtifactInvalidError) as caught:
        validate.check_artifact(_per_channel_dequantize(tmp_path, 11), X)

    assert caught.value.stage == "checker" and caught.value.node == "fc_w_dq"
    assert "Unrecognized attribute: axis for operator DequantizeLinear" in caught.value.message


def test_the_same_artifact_at_opset_13_passes(tmp_path: Path) -> None:
    validate.check_artifact(_per_channel_dequantize(tmp_path, 13), X)


def test_a_node_onnxruntime_refuses_fails_at_the_session_stage(tmp_path: Path) -> None:
    path = _save(tmp_path, "bad_attribute",
                 [helper.make_node("FastGelu", ["x"], ["y"], name="gelu", domain="com.microsoft", bogus=1)],
                 opset=13, domains=("com.microsoft",))
    with pytest.raises(ArtifactInvalidError) as caught:
        validate.check_artifact(path, X)
    assert caught.value.stage == "session" and caught.value.node == "gelu"


def test_a_type_error_only_full_check_sees_fails_at_checker_or_session(tmp_path: Path) -> None:
    path = _save(tmp_path, "relu_int", [helper.make_node("Relu", ["x"], ["y"], name="act")], opset=11,
                 input_type=TensorProto.INT32)
    feeds = {"x": np.ones((1, 4), np.int32)}
    with pytest.raises(ArtifactInvalidError) as caught:
        validate.check_artifact(path, feeds)
    assert (caught.value.stage, caught.value.node) == ("checker", "act")
    with pytest.raises(ArtifactInvalidError) as caught:  # an upload that fails full_check lowers the bar
        validate.check_artifact(path, feeds, full_check=False)
    assert (caught.value.stage, caught.value.node) == ("session", "act")


def test_runtime_failures_and_non_finite_outputs_fail_at_the_run_stage(tmp_path: Path) -> None:
    reshape = _save(tmp_path, "reshape", [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")],
                    opset=13, inits=[numpy_helper.from_array(np.array([3, 2]), "shape")], out_shape=[3, 2])
    with pytest.raises(ArtifactInvalidError) as caught:
        validate.check_artifact(reshape, X)
    assert (caught.value.stage, caught.value.node) == ("run", "reshape")

    sqrt = _save(tmp_path, "sqrt", [helper.make_node("Sqrt", ["x"], ["y"], name="sqrt")], opset=13)
    negative = {"x": -np.ones((1, 4), np.float32)}
    with pytest.raises(ArtifactInvalidError, match="output 'y' has 4 non-finite") as caught:
        validate.check_artifact(sqrt, negative)
    assert caught.value.stage == "run"
    validate.check_artifact(sqrt, negative, reference=[np.full((1, 4), np.nan, np.float32)])  # float did too

    with pytest.raises(ArtifactInvalidError, match="1 outputs instead of the model's 2"):
        validate.check_artifact(sqrt, X, expected_outputs=2)
    with pytest.raises(ArtifactInvalidError, match="no value given for input"):
        validate.check_artifact(sqrt, {})


def test_find_offending_node_reads_each_library_message_and_ignores_unknown_names(tmp_path: Path) -> None:
    model = onnx.load(str(_per_channel_dequantize(tmp_path, 13)))
    messages = [
        "Load model failed:Node (fc_w_dq) Op (DequantizeLinear) [ShapeInferenceError] bad",
        'This is an invalid model. In Node, ("fc_w_dq", DequantizeLinear, "", -1) : ...',
        "Non-zero status code returned while running DequantizeLinear node. Name:'fc_w_dq' Status Message: x",
        "Could not find an implementation for DequantizeLinear(10) node with name 'fc_w_dq'",
        "Type 'tensor(int32)' of input parameter (x) of operator (Relu) in node (fc_w_dq) is invalid.",
        "axis\n\n==> Context: Bad node spec for node. Name: fc_w_dq OpType: DequantizeLinear",
        "[ShapeInferenceError] (op_type:DequantizeLinear, node name: fc_w_dq): bad",
    ]
    assert [validate.find_offending_node(m, model) for m in messages] == ["fc_w_dq"] * len(messages)
    assert validate.find_offending_node("In Node, (\"\", ReduceMean, \"\", -1) : axes", model) is None
    assert validate.find_offending_node("running MatMul node. Name:'MatMul_token_17' Status", model) is None  # ORT-made
    assert validate.find_offending_node("running MatMul node. Name:'fc' Status", tmp_path / "dq_axis_13.onnx") == "fc"


def test_final_failure_is_an_engine_error_naming_cause_and_library_versions(tmp_path: Path) -> None:
    with pytest.raises(ArtifactInvalidError) as caught:
        validate.check_artifact(_per_channel_dequantize(tmp_path, 11), X)
    error = validate.engine_error(caught.value, tried=["per-channel", "per-tensor"])

    assert error.code == "engine_error"
    text = str(error)
    assert f"onnx {onnx.__version__}" in text and f"onnxruntime {ort.__version__}" in text
    assert "failed checker at node 'fc_w_dq'" in text and "axis for operator DequantizeLinear" in text
    assert "loads in onnxruntime" in text and "per-tensor" in text


def _encoder_like(tmp: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Embedding + MatMul + ReduceMean(axes attribute) at opset 17: the int4 weight-only failure of issue 12."""
    inits = [numpy_helper.from_array(RNG.standard_normal((64, 64)).astype(np.float32), "proj.weight"),
             numpy_helper.from_array(RNG.standard_normal((100, 64)).astype(np.float32), "embed.weight")]
    nodes = [helper.make_node("Gather", ["embed.weight", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "proj.weight"], ["m"], name="proj"),
             helper.make_node("ReduceMean", ["m"], ["mean"], axes=[-1], keepdims=1, name="norm_mean"),
             helper.make_node("Sub", ["m", "mean"], ["y"], name="center")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 64])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp / "encoder17.onnx"
    onnx.save_model(model, str(path))
    return path, {"ids": RNG.integers(0, 100, (2, 8))}


def _int4(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, accuracy_level=4,
                                     op_types_to_quantize=("MatMul", "Gather"))
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst))
    return dst


def test_int4_with_gather_is_invalid_at_opset_17_and_valid_after_prepare_to_21(tmp_path: Path) -> None:
    path, feeds = _encoder_like(tmp_path)
    with pytest.raises(ArtifactInvalidError) as caught:
        validate.check_artifact(_int4(path, tmp_path / "direct.int4.onnx"), feeds)
    assert (caught.value.stage, caught.value.node) == ("checker", "norm_mean")

    prepared = normalize.prepare(path, tmp_path / "scratch", min_opset=21, log=lambda level, message: None,
                                 feeds=feeds)
    assert prepared.opset == 21
    artifact = _int4(prepared.path, tmp_path / "prepared.int4.onnx")
    assert {"MatMulNBits", "GatherBlockQuantized"} <= {n.op_type for n in onnx.load(str(artifact)).graph.node}
    validate.check_artifact(artifact, feeds, full_check=prepared.full_check)


def test_static_per_channel_on_an_opset_11_cnn_is_invalid_unless_prepared_to_13(tmp_path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    nodes = [helper.make_node("Constant", [], ["conv.w"], value=numpy_helper.from_array(
                 RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv.w")),
             helper.make_node("Constant", [], ["conv.b"], value=numpy_helper.from_array(
                 RNG.standard_normal(4).astype(np.float32), "conv.b")),
             helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    path = tmp_path / "cnn11.onnx"
    onnx.save_model(model, str(path))
    feeds = {"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)}

    for min_opset in (0, 13):
        scratch = tmp_path / f"scratch{min_opset}"
        prepared = normalize.prepare(path, scratch, min_opset=min_opset, log=lambda level, message: None)
        artifact = scratch / "static.onnx"
        with onnx_common.confined(scratch):  # quantize_static calibrates in a TemporaryDirectory
            quantize_static(str(prepared.path), str(artifact), Batches(), per_channel=True,
                            quant_format=QuantFormat.QDQ)
        if min_opset == 0:  # what the engine delivered before: the int32 bias dequantized per channel
            with pytest.raises(ArtifactInvalidError, match="axis for operator DequantizeLinear") as caught:
                validate.check_artifact(artifact, feeds)
            assert caught.value.stage == "checker" and caught.value.node == "conv.b_DequantizeLinear"
        else:
            validate.check_artifact(artifact, feeds, full_check=prepared.full_check)
