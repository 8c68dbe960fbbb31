"""ONNX models: validate and describe an upload, run it in onnxruntime, and list its weight-bearing layers."""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.engine.errors import EngineError
from worker.engine.types import ModelFormat, ModelInfo, TensorSpec

if TYPE_CHECKING:
    import onnx

    from worker.engine import evaluate
    from worker.engine.config import MethodConfig
    from worker.engine.context import JobContext

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]

# Ops whose weights a quantizer can touch, and which inputs hold those weights.
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "MatMul": (1,), "Gemm": (1,), "Conv": (1,), "ConvTranspose": (1,), "LSTM": (1, 2), "GRU": (1, 2),
    "RNN": (1, 2), "Gather": (0,), "Attention": (1,), "EmbedLayerNormalization": (2, 3, 4),
}


def load(path: Path) -> onnx.ModelProto:
    """Parse and check an ONNX file; every failure becomes an EngineError the user can read."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise EngineError(f"not a valid ONNX model: {exc}") from exc
    # External data would make onnxruntime open files next to the upload (paths the user chose).
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_initializers(model.graph)):
        raise EngineError(
            "not a valid ONNX model: its weights are stored in external data files, which quantserve "
            "does not accept; re-save it as one self-contained .onnx file (onnx.save_model with "
            "save_as_external_data=False)"
        )
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise EngineError(f"not a valid ONNX model: {str(exc).splitlines()[0]}") from exc
    if not model.graph.node:
        raise EngineError("not a valid ONNX model: the graph has no nodes")
    return model


def _all_initializers(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    tensors = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                tensors.extend(_all_initializers(sub))
    return tensors


def _dtype_name(elem_type: int) -> str:
    import onnx

    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    shape: list[int | str] = []
    if tensor_type.HasField("shape"):
        for dim in tensor_type.shape.dim:
            # paddle2onnx writes a dynamic axis as dim_value -1 (PaddleOCR's [-1, 3, ?, ?]): unknown, not fixed
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(int(dim.dim_value))
            else:
                shape.append(dim.dim_param or "?")
    return TensorSpec(name=value.name, dtype=_dtype_name(tensor_type.elem_type), shape=shape)


def inspect(path: Path) -> ModelInfo:
    """Validate an ONNX upload and describe its inputs, outputs and parameter count."""
    return describe(load(Path(path)))


def describe(model: onnx.ModelProto) -> ModelInfo:
    """Inputs (initializers excluded), outputs and parameter count of a loaded model."""
    import onnx

    initializers = {t.name for t in model.graph.initializer}
    return ModelInfo(
        format=ModelFormat.onnx,
        inputs=[_spec(v) for v in model.graph.input if v.name not in initializers],
        outputs=[_spec(v) for v in model.graph.output],
        # int32/int64/bool initializers are shapes, axes and indices, not parameters
        num_parameters=int(sum(int(np.prod(t.dims)) for t in model.graph.initializer
                               if t.data_type not in (onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                                                      onnx.TensorProto.BOOL))),
        architecture=None,
    )


def load_runner(path: Path, threads: int | None = 1, *, ours: bool = False) -> Runner:
    """An onnxruntime CPU session as a Runner; threads=1 is what latency is measured with. ours=True for a
    file the engine wrote: if that does not load, the fault is ours (engine_error), not the upload's."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the user's log must not fill with ORT's own warnings
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception classes for every kind of parse failure
        if ours:
            raise EngineError(f"onnxruntime cannot load the quantized model quantserve wrote: {exc}",
                              code="engine_error") from exc
        raise EngineError(f"not a valid ONNX model: onnxruntime cannot load it: {exc}") from exc

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(out) for out in session.run(None, feed)]

    return run


@dataclass(frozen=True)
class WeightNode:
    """One node that holds weights, with the name users know it by."""

    node: str  # the graph node name
    op: str
    weights: tuple[str, ...]  # initializer names
    layer: str  # module path when the exporter recorded it ("blocks.0.q"), else the node name
    elements: int  # total weight elements


def measure_files(ctx: JobContext, float_path: Path, quant_path: Path, samples: evaluate.Samples, *,
                  original_bytes: int, layers: list[dict], warnings: list[str]) -> dict:
    """evaluate.measure of a quantized .onnx file against the float one, each in a one-thread session."""
    import onnx
    import onnxruntime

    from worker.engine import evaluate

    names = [o.name for o in onnx.load(str(float_path), load_external_data=False).graph.output]
    return evaluate.measure(
        ctx, load_runner(float_path, threads=1), load_runner(quant_path, threads=1, ours=True), samples,
        original_bytes=original_bytes, quantized_bytes=Path(quant_path).stat().st_size,
        runtime=f"onnxruntime {onnxruntime.__version__}", layers=layers, extra_warnings=warnings,
        output_names=names)


def layer_name(node: onnx.NodeProto, weights: tuple[str, ...] = ()) -> str:
    # torch's dynamo exporter records the module path; the TorchScript exporter names weights after it.
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s for s in ast.literal_eval(prop.value) if s]
            except (ValueError, SyntaxError):
                scopes = []
            if len(scopes) >= 2:
                return scopes[-2]
    for weight in weights:
        if weight.endswith(".weight"):
            return weight.removesuffix(".weight")
    return node.name


def weight_nodes(model: onnx.ModelProto) -> list[WeightNode]:
    """Top-level nodes reading at least one initializer as a weight, in graph order."""
    import onnx

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    # Integer initializers are indices and shapes, and a Gather on a 1-D table is shape arithmetic.
    shapes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer
              if t.data_type in floats and len(t.dims) >= 2}
    found = []
    for node in model.graph.node:
        slots = WEIGHT_INPUTS.get(node.op_type, ())
        weights = tuple(node.input[i] for i in slots if i < len(node.input) and node.input[i] in shapes)
        if weights:
            found.append(WeightNode(node.name, node.op_type, weights, layer_name(node, weights),
                                    sum(shapes[w] for w in weights)))
    return found


def capture(model: onnx.ModelProto, tensors: list[str], batches: list[dict[str, np.ndarray]],
            path: Path) -> dict[str, list[np.ndarray]]:
    """Values of intermediate tensors on each batch: the model is re-saved with them as extra outputs."""
    import onnx

    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    existing = {o.name for o in extended.graph.output}
    extra = [t for t in dict.fromkeys(tensors) if t not in existing]
    extended.graph.output.extend(onnx.ValueInfoProto(name=t) for t in extra)
    onnx.save_model(extended, str(path))
    runner = load_runner(path, threads=None)
    names = [o.name for o in extended.graph.output]
    values: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for batch in batches:
        outs = dict(zip(names, runner(batch), strict=True))
        for t in tensors:
            values[t].append(outs[t])
    return values


def excluded_nodes(nodes: list[WeightNode], config: MethodConfig) -> set[str]:
    """Nodes whose node name, layer name or weight name matches one of the user's exclude regexes."""
    return {n.node for n in nodes if config.excludes(n.node, n.layer, *n.weights)}


@contextlib.contextmanager
def confined(scratch: Path) -> Iterator[Path]:
    """cwd and tempfile's folder inside a fresh folder of scratch for the block, removed after.

    Symbolic shape inference writes sym_shape_infer_temp.onnx and a uuid-named .data file into the cwd when
    it fails, and quant_pre_process / quantize_static work in TemporaryDirectory(). Both are process-wide
    settings: one job runs per worker process, so nothing else sees them meanwhile.
    """
    work = Path(tempfile.mkdtemp(prefix=".confined-", dir=scratch)).resolve()
    previous_cwd, previous_tmp = os.getcwd(), tempfile.tempdir
    os.chdir(work)
    tempfile.tempdir = str(work)
    try:
        yield work
    finally:
        tempfile.tempdir = previous_tmp
        os.chdir(previous_cwd)
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def scratch_dir(work_dir: Path) -> Iterator[Path]:
    """confined() in work_dir, removed after the block: the job's scratch folder for every ONNX method."""
    with confined(work_dir) as scratch:
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
