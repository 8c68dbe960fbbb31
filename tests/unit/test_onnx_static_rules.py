"""The small rules inside ONNX static int8, each on a graph built here: Gemm biases, transformer detection,
and the plain words when int8 is slower than float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from worker.engine.onnx import rewrite, sensitive, speed, static


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _gemm(bias_shape: tuple[int, ...], *, shared: bool = False) -> onnx.ModelProto:
    """x [4, 8] -> Gemm(W [8, 6], C bias_shape) -> y; with `shared`, a second Gemm reads the same C."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 6)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=bias_shape).astype(np.float32), "C")]
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="dense")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])]
    if shared:
        nodes.append(helper.make_node("Gemm", ["x", "W", "C"], ["z"], name="dense_2"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 6]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_gemm_bias_of_shape_1_n_is_flattened_without_changing_outputs() -> None:
    model = _gemm((1, 6))
    x = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    before = _run(model, x)
    assert rewrite.flatten_gemm_biases(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert [list(t.dims) for t in model.graph.initializer if t.name == "C"] == [[6]]
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-6)


def test_shared_gemm_bias_keeps_its_original_and_flat_bias_left_alone() -> None:
    model = _gemm((1, 6), shared=True)
    assert rewrite.flatten_gemm_biases(model) == 2
    onnx.checker.check_model(model, full_check=True)
    assert len(model.graph.initializer) == 2  # the last reader took the original name; no orphan left
    assert rewrite.flatten_gemm_biases(_gemm((6,))) == 0


def test_flat_bias_lets_per_channel_static_quantization_through(tmp_path: Path) -> None:
    """onnxruntime's int32-bias scale check raised on a [1, N] bias (magika, tf2onnx); [N] goes through."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    model = _gemm((1, 6))
    rewrite.flatten_gemm_biases(model)
    onnx.save(model, tmp_path / "flat.onnx")
    samples = [{"x": np.random.default_rng(i).normal(size=(4, 8)).astype(np.float32)} for i in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(samples)

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    quantize_static(str(tmp_path / "flat.onnx"), str(tmp_path / "int8.onnx"), Reader(),
                    quant_format=QuantFormat.QDQ, per_channel=True)
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(tmp_path / "int8.onnx").graph.node)


def _classifier(attention: bool) -> onnx.ModelProto:
    """x [1, 4, 8] -> MatMul(W) -> [MatMul(h, h^T) ->] Softmax: a CNN-style head, or an attention score."""
    w = numpy_helper.from_array(np.eye(8, dtype=np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="proj")]
    last = "h"
    if attention:
        nodes += [helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1], name="t"),
                  helper.make_node("MatMul", ["h", "ht"], ["scores"], name="qk")]
        last = "scores"
    nodes.append(helper.make_node("Softmax", [last], ["y"], axis=-1, name="softmax"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_final_softmax_does_not_make_a_transformer() -> None:
    assert static._op_types(_classifier(attention=False))[1] is False
    assert static._op_types(_classifier(attention=True))[1] is True


def _timed(label: str, speedup: float, cosine: float = 0.99) -> speed.Timed:
    return speed.Timed(label, Path(label), ms=10 / speedup, cosine=cosine, speedup=speedup)


def test_slower_than_float_names_the_float_model_when_no_int8_variant_is_faster() -> None:
    chosen = _timed("as quantized", 0.62)
    note = speed.slower_than_float_warning(0.6, chosen, [chosen, _timed("float islands kept float", 0.58)])
    assert note is not None and "slower" in note and "fastest alternative here is the float model" in note
    assert "'as quantized' 0.62x" in note and "'float islands kept float' 0.58x" in note
    assert speed.slower_than_float_warning(1.1, chosen, [chosen]) is None


def test_slower_than_float_names_a_faster_int8_variant_when_one_was_measured() -> None:
    chosen, faster = _timed("as quantized", 0.9, 0.999), _timed("float islands kept float", 1.3, 0.99)
    note = speed.slower_than_float_warning(0.9, chosen, [chosen, faster])
    assert note is not None and "fastest int8 variant measured was 'float islands kept float' at 1.30x" in note


def _chain() -> onnx.ModelProto:
    """x -> Conv a -> Relu -> Conv b -> Conv c: three weight layers in a row."""
    w = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a_out"], name="a"),
             helper.make_node("Relu", ["a_out"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w"], ["b_out"], name="b"),
             helper.make_node("Conv", ["b_out", "w"], ["y"], name="c")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_layers_own_loss_is_the_drop_from_what_reaches_it() -> None:
    drops = sensitive.sqnr_drops(_chain(), {"a": 40.0, "b": 12.0, "c": 10.0})
    assert drops == {"a": sensitive.INPUT_SQNR_DB - 40.0, "b": 28.0, "c": 2.0}


class _Log:
    def log(self, level: str, message: str) -> None:
        pass


def test_the_fewest_worst_layers_that_make_it_faithful_stay_float(tmp_path: Path) -> None:
    drops = {"a": 8.0, "b": 28.0, "c": 2.0, "d": 1.0, "e": 0.5}
    built: list[set[str]] = []

    def requantize(kept: set[str], path: Path) -> None:
        built.append(kept)
        path.write_bytes(b"x" * len(kept))

    # faithful once b and a are both float; b alone helps a little
    def fidelity_of(path: Path) -> sensitive.Fidelity:
        kept = built[-1]
        return (0.999, None, 0.99) if {"a", "b"} <= kept else (0.95, None, 0.9) if "b" in kept else (0.9, None, 0.8)

    outcome, path = sensitive.keep_worst_float(_Log(), drops, 20, requantize, fidelity_of, (0.9, None, 0.8),
                                               tmp_path)
    assert outcome.kept == ["b", "a", "c", "d"] and path is not None and path.stat().st_size == 4
    assert [t["float_layers"] for t in outcome.tried] == [1, 4]  # stopped at the first faithful candidate
    assert "b, a, c, d" in sensitive.warning(outcome, {})


def test_no_candidate_is_kept_when_none_is_clearly_better(tmp_path: Path) -> None:
    def requantize(kept: set[str], path: Path) -> None:
        path.write_bytes(b"x")

    outcome, path = sensitive.keep_worst_float(_Log(), {"a": 5.0, "b": 3.0}, 20, requantize,
                                               lambda path: (0.901, None, 0.801), (0.9, None, 0.8), tmp_path)
    assert path is None and outcome.kept == [] and len(outcome.tried) == 1


def test_a_concat_of_boxes_and_scores_and_an_output_reshape_stay_float() -> None:
    """YOLOv8's last Concat joins coordinates (0..320) and scores (0..1): one int8 scale zeroes the scores."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    from worker.engine.onnx import keep_float

    nodes = [helper.make_node("Concat", ["boxes", "scores"], ["joined"], axis=1, name="join"),
             helper.make_node("Concat", ["a", "b"], ["ab"], axis=1, name="alike"),
             helper.make_node("Reshape", ["ab", "shape"], ["y"], name="out_reshape")]
    floats = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("boxes", "scores", "a", "b")]
    graph = helper.make_graph(nodes, "g", floats, [helper.make_tensor_value_info("joined", TensorProto.FLOAT, None),
                                                   helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([-1], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    def span(high: float) -> TensorData:
        return TensorData(lowest=np.float32(0), highest=np.float32(high))

    ranges = TensorsData(CalibrationMethod.MinMax, {"boxes": span(320), "scores": span(1), "a": span(4),
                                                    "b": span(2)})
    assert keep_float.mixed_range_joins(model, ranges) == {"join": 320.0}
    assert keep_float.output_data_movement(model) == {"join", "out_reshape"}
    assert "differ up to 320x" in keep_float.warning({"join": 320.0})
