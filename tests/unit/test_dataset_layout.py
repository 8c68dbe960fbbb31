"""The dataset layout rule (worker/engine/formats/layout.py): an array with the input's rank is batch-sliced,
one with a dimension more stacks whole samples fed as is; both the engine and the API's check follow it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.services.jobs import dataset_mismatch
from tests import models
from worker.engine.errors import EngineError
from worker.engine.evaluate import load_npz
from worker.engine.formats import layout
from worker.engine.onnx import common as onnx_common


def stateful_model(path: Path) -> Path:
    """y = x + sum(state over layers, hidden) + If(sr == 16000, 1, -1): inputs x [batch, 4], state
    [2, batch, 3] (batch on axis 1, like an ONNX LSTM state) and a 0-d int64 sr, as silero-vad has them."""
    def branch(name: str, value: float) -> onnx.GraphProto:
        const = helper.make_node("Constant", [], [f"{name}_v"], value=numpy_helper.from_array(np.float32(value)))
        return helper.make_graph([const], name, [], [helper.make_tensor_value_info(f"{name}_v", TensorProto.FLOAT, [])])

    nodes = [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array(16000, np.int64))),
        helper.make_node("Equal", ["sr", "k"], ["cond"]),
        helper.make_node("If", ["cond"], ["sign"], then_branch=branch("then", 1.0), else_branch=branch("else", -1.0)),
        helper.make_node("Transpose", ["state"], ["state_t"], perm=[1, 0, 2]),
        helper.make_node("ReduceSum", ["state_t", "axes"], ["summed"], keepdims=0),
        helper.make_node("Unsqueeze", ["summed", "one"], ["summed_col"]),
        helper.make_node("Add", ["x", "summed_col"], ["shifted"]),
        helper.make_node("Add", ["shifted", "sign"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "stateful",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 3]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
         numpy_helper.from_array(np.array([1], np.int64), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_stacked_arrays_feed_a_state_with_batch_on_axis_1_and_a_scalar(tmp_path: Path) -> None:
    path = stateful_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    state = rng.standard_normal((5, 2, 1, 3)).astype(np.float32)  # N samples, each [2, batch 1, 3]
    sr = np.array([16000, 8000, 16000, 16000, 8000], np.int64)
    data = models.save_npz(tmp_path / "d.npz", x=x, state=state, sr=sr)
    inputs = onnx_common.inspect(path).inputs
    samples = load_npz(data, inputs, 100, "calibration")
    assert len(samples.batches) == 5
    first = samples.batches[0]
    assert first["x"].shape == (1, 4) and first["state"].shape == (2, 1, 3) and first["sr"].shape == ()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for i, batch in enumerate(samples.batches):
        (y,) = session.run(None, batch)
        expected = x[i] + state[i].sum() + (1.0 if sr[i] == 16000 else -1.0)
        np.testing.assert_allclose(y[0], expected, rtol=1e-5)


def test_batch_sliced_arrays_read_as_before(tmp_path: Path) -> None:
    path = stateful_model(tmp_path / "m.onnx")
    inputs = [s for s in onnx_common.inspect(path).inputs if s.name == "x"]
    samples = load_npz(models.save_npz(tmp_path / "d.npz", x=np.zeros((3, 4), np.float32)), inputs, 100, "evaluation")
    assert [b["x"].shape for b in samples.batches] == [(1, 4)] * 3


def test_a_state_given_batch_first_is_refused_with_both_layouts_named(tmp_path: Path) -> None:
    path = stateful_model(tmp_path / "m.onnx")
    data = models.save_npz(tmp_path / "d.npz", x=np.zeros((3, 4), np.float32),
                           state=np.zeros((3, 2, 3), np.float32), sr=np.full(3, 16000, np.int64))
    with pytest.raises(EngineError) as caught:  # [N, 2, 3] batch-sliced is [1, 2, 3]: axis 0 is not the batch
        load_npz(data, onnx_common.inspect(path).inputs, 100, "calibration")
    assert caught.value.code == "dataset_mismatch"
    assert "first axis is fixed at 2" in str(caught.value) and "[N, 2, ?, 3]" in str(caught.value)
    wrong_rank = layout.sample_shape_problem([2, "batch", 3], [3, 6])
    assert wrong_rank is not None and "give 3" in wrong_rank and "or 4" in wrong_rank


@pytest.mark.parametrize(("shape", "array", "stacked", "ok"), [
    (["batch", 4], [10, 4], False, True),
    (["batch", 4], [10, 1, 4], True, True),
    (["batch", 4], [10, 5], False, False),
    ([2, "batch", 128], [10, 2, 1, 128], True, True),
    ([2, "batch", 128], [10, 3, 1, 128], True, False),
    ([], [10], True, True),
    ([1, 4], [10, 4], False, True),  # a fixed batch of 1: the first axis still counts samples
    ([-1, 3, "h", "w"], [16, 3, 48, 192], False, True),  # paddle2onnx's dynamic axis is dim_value -1
])
def test_layout_rule(shape: list, array: list, stacked: bool, ok: bool) -> None:
    assert layout.stacks_samples(shape, array) is stacked
    assert (layout.sample_shape_problem(shape, array) is None) is ok


def test_the_api_check_accepts_the_stacked_layout_and_still_refuses_a_wrong_shape() -> None:
    model = SimpleNamespace(format="onnx", inputs=[
        {"name": "input", "dtype": "float32", "shape": ["batch", 576]},
        {"name": "state", "dtype": "float32", "shape": [2, "batch", 128]},
        {"name": "sr", "dtype": "int64", "shape": []}])
    arrays = {"input": {"dtype": "float32", "shape": [16, 576]},
              "state": {"dtype": "float32", "shape": [16, 2, 1, 128]},
              "sr": {"dtype": "int64", "shape": [16]}}
    assert dataset_mismatch(model, SimpleNamespace(kind="tensors", arrays=arrays)) is None
    arrays["state"] = {"dtype": "float32", "shape": [16, 2, 128]}
    assert "state" in dataset_mismatch(model, SimpleNamespace(kind="tensors", arrays=arrays))


def test_a_dim_value_of_minus_one_reads_as_a_dynamic_axis(tmp_path: Path) -> None:
    """paddle2onnx (PaddleOCR) writes [-1, 3, ?, ?]; a batch-sliced dataset must feed it."""
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, "h", "w"])])
    path = tmp_path / "paddle.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), path)
    inputs = onnx_common.inspect(path).inputs
    assert not isinstance(inputs[0].shape[0], int)
    data = models.save_npz(tmp_path / "x.npz", x=np.zeros((4, 3, 8, 16), np.float32))
    assert len(load_npz(data, inputs, 100, "calibration").batches) == 4
