"""Validate an ONNX artifact before delivery: onnx.checker, an onnxruntime session, one run on real inputs."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from worker.engine.errors import EngineError

STAGES = ("checker", "session", "run")

# Where onnx and onnxruntime name the node an error is about, most specific first:
#   ORT load:    "Node (dq_w) Op (DequantizeLinear) [ShapeInferenceError] ..."
#   ORT graph:   'This is an invalid model. In Node, ("dq_w", DequantizeLinear, "", -1) : ...'
#   ORT run:     "Non-zero status code returned while running Reshape node. Name:'reshape' Status Message: ..."
#   ORT kernels: "Could not find an implementation for ConvInteger(10) node with name 'conv_quant'"
#   ORT types:   "Type Error: Type 'tensor(int32)' of input parameter (x) of operator (Relu) in node (act) is invalid."
#   checker:     "==> Context: Bad node spec for node. Name: dq_w OpType: DequantizeLinear"
#   full_check:  "[ShapeInferenceError] (op_type:Relu, node name: act): X typestr: T, has unsupported type"
_NODE_PATTERNS = (
    re.compile(r"\bNode \((?P<name>[^)]*)\) Op \("),
    re.compile(r'In Node, \("(?P<name>[^"]*)", '),
    re.compile(r"node\. Name:\s*'(?P<name>[^']*)'"),
    re.compile(r"node with name '(?P<name>[^']*)'"),
    re.compile(r"\bin node \((?P<name>[^)]*)\)"),
    re.compile(r"Name: (?P<name>.*?) OpType: "),
    re.compile(r"node name: (?P<name>[^)]*)\)"),
)


class ArtifactInvalidError(Exception):
    """Our own output failed validation at `stage`; the caller may retry with a fallback (per-tensor, fewer
    op types, `node` kept float) before giving up with engine_error()."""

    def __init__(self, stage: str, message: str, node: str | None = None) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage  # one of STAGES
        self.message = message  # the library's own words
        self.node = node  # the node the library blamed, when it named one that the artifact has


def library_versions() -> str:
    return f"onnx {onnx.__version__}, onnxruntime {ort.__version__}"


def _node_names(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            names.add(node.name)
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else attr.graphs)
    names.discard("")
    return names


def find_offending_node(error_message: str, model: onnx.ModelProto | Path) -> str | None:
    """The node an onnx/onnxruntime error names, if the model has a node of that name (else None: an unnamed
    node, or a node onnxruntime made itself while optimising)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    names = _node_names(model)
    for pattern in _NODE_PATTERNS:
        for match in pattern.finditer(error_message):
            if match.group("name").strip() in names:
                return match.group("name").strip()
    return None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0][:500] if lines else type(exc).__name__


def _invalid(stage: str, exc: BaseException, path: Path) -> ArtifactInvalidError:
    text = str(exc)
    try:
        node = find_offending_node(text, path)
    except Exception:  # a file the checker refused may not even parse
        node = None
    # the checker puts the node it blames on a later "==> Context" line; keep it in the message
    context = next((line.strip() for line in text.splitlines() if "==> Context" in line), "")
    message = _first_line(exc) + (f" ({context.removeprefix('==> Context: ')})" if context else "")
    return ArtifactInvalidError(stage, message, node)


def session_options(threads: int | None = 1,
                    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                    ) -> ort.SessionOptions:
    """Options as the measurement builds them (onnx/common.load_runner): all graph optimisations, one thread.
    Validate under the same level: an artifact can load unoptimised and fail in the fusions, or the reverse."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = level
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def check_artifact(path: Path, feeds: Mapping[str, np.ndarray], *, expected_outputs: int | None = None,
                   reference: Sequence[np.ndarray] | None = None, full_check: bool = True,
                   providers: Sequence[str] = ("CPUExecutionProvider",),
                   options: ort.SessionOptions | None = None) -> None:
    """Raise ArtifactInvalidError unless the file passes onnx.checker, builds an onnxruntime session and runs
    once on `feeds` to finite outputs, as many as the float model has (expected_outputs, default: the
    graph's own count).

    full_check: pass Prepared.full_check; the strict shape inference it adds refuses some valid uploads, and
    an artifact is never asked to pass a check its upload fails. reference: the float model's outputs on
    the same feeds; where they are non-finite already (masks of -inf) the artifact may be too.
    """
    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=full_check)  # by path: works past 2 GiB
    except Exception as exc:  # ValidationError, InferenceError, or a parse error
        raise _invalid("checker", exc, path) from exc
    try:
        session = ort.InferenceSession(str(path), sess_options=options or session_options(),
                                       providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own classes (Fail, InvalidGraph, NotImplemented...)
        raise _invalid("session", exc, path) from exc
    names = {i.name for i in session.get_inputs()}
    missing = sorted(i.name for i in session.get_inputs() if i.name not in feeds)
    try:
        if missing:
            raise ValueError(f"no value given for input(s) {', '.join(missing)}")
        outputs = [np.asarray(o) for o in session.run(None, {k: v for k, v in feeds.items() if k in names})]
    except Exception as exc:
        raise _invalid("run", exc, path) from exc
    expected = expected_outputs if expected_outputs is not None else len(session.get_outputs())
    if len(outputs) != expected:
        raise ArtifactInvalidError("run", f"{len(outputs)} outputs instead of the model's {expected}")
    for i, (meta, out) in enumerate(zip(session.get_outputs(), outputs, strict=True)):
        if not np.issubdtype(out.dtype, np.inexact):
            continue
        bad = ~np.isfinite(out)
        if reference is not None and i < len(reference) and np.shape(reference[i]) == out.shape:
            bad &= np.isfinite(reference[i])
        if bad.any():
            raise ArtifactInvalidError("run", f"output '{meta.name}' has {int(bad.sum())} non-finite value(s) "
                                              f"(NaN or inf) of {out.size}")


def engine_error(failure: ArtifactInvalidError, *, tried: Sequence[str] = ()) -> EngineError:
    """The job's final error when no fallback produced a valid artifact: our fault, never the upload's."""
    where = f" at node '{failure.node}'" if failure.node else ""
    attempts = f" Also tried: {', '.join(tried)}." if tried else ""
    return EngineError(
        f"quantserve produced an invalid quantized model (it failed {failure.stage}{where}: {failure.message})."
        f"{attempts} The uploaded model itself is fine: it loads in onnxruntime. This is a fault in quantserve "
        f"or the libraries it uses ({library_versions()}); please report it.",
        code="engine_error")
