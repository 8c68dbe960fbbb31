"""Weights under control flow: counted, warned about, and refused when nearly all are out of reach."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from worker.engine.errors import EngineError
from worker.engine.onnx import subgraphs


def _branch(name: str, weight: np.ndarray) -> onnx.GraphProto:
    """A body that multiplies the outer `x` by a weight held in a Constant node (as spox exports it)."""
    const = helper.make_node("Constant", [], [f"{name}_w"], value=numpy_helper.from_array(weight, f"{name}_w"))
    matmul = helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"])
    out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)
    return helper.make_graph([const, matmul], name, [], [out])


def if_model(top_weight: np.ndarray | None = None) -> onnx.ModelProto:
    """y = If(sr == 16000, x @ A, x @ B) [+ x @ C at the top level]; sr a 0-d int64 input."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    sixteen = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array(16000, np.int64)))
    equal = helper.make_node("Equal", ["sr", "k"], ["cond"])
    branch = helper.make_node("If", ["cond"], ["branch_y"], then_branch=_branch("then", a),
                              else_branch=_branch("else", b))
    nodes, inits = [sixteen, equal, branch], []
    if top_weight is None:
        nodes.append(helper.make_node("Identity", ["branch_y"], ["y"]))
    else:
        inits.append(numpy_helper.from_array(top_weight, "c"))
        nodes += [helper.make_node("MatMul", ["x", "c"], ["top_y"]),
                  helper.make_node("Add", ["branch_y", "top_y"], ["y"])]
    graph = helper.make_graph(
        nodes, "if_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])


def test_weights_inside_if_branches_are_counted(tmp_path: Path) -> None:
    model = if_model()
    onnx.checker.check_model(model)
    path = tmp_path / "if.onnx"
    onnx.save(model, str(path))
    ort.InferenceSession(str(path)).run(None, {"x": np.ones((1, 8), np.float32), "sr": np.array(16000, np.int64)})
    found = subgraphs.coverage(model)
    assert (found.weights, found.nested_weights, found.elements, found.nested_elements) == (2, 2, 128, 128)
    assert found.ops() == "1 If"


def test_a_model_whose_weights_all_sit_in_branches_is_refused_with_the_reason() -> None:
    with pytest.raises(EngineError) as caught:
        subgraphs.check(if_model(), "dynamic")
    assert caught.value.code == "unsupported"
    message = str(caught.value)
    assert "2 of 2 weight tensors" in message and "If" in message and "does not enter subgraphs" in message
    assert "What to do" in message


def test_a_model_with_a_reachable_share_gets_a_warning_not_a_refusal() -> None:
    # 64 of 192 values in the main graph: a third is reachable
    warnings = subgraphs.check(if_model(np.ones((8, 8), np.float32)), "static")
    assert len(warnings) == 1 and "2 of 3 weight tensors (128 of 192 values)" in warnings[0]
    assert "stay float (67% of the weights)" in warnings[0]


def test_a_model_without_control_flow_says_nothing() -> None:
    model = if_model()
    model.graph.node.pop(2)  # the If
    assert subgraphs.check(model, "static") == []
