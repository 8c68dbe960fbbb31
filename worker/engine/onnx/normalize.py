"""Normalise an ONNX model before any quantizer: Constant weights, opset, node names, quant_pre_process."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, shape_inference, version_converter

from worker.engine.onnx import common as onnx_common

Log = Callable[[str, str], None]  # (level, message), like JobContext.log

# A protobuf cannot be serialised past 2 GiB; above this we write weights as external data next to the
# model, and version_converter (which serialises the whole model) is expected to fail and keep the original.
EXTERNAL_DATA_BYTES = 1_800_000_000
# Each step is checked on the caller's feeds against the upload; ORT's basic fusions (Conv+BN) move ~1e-6.
RTOL, ATOL = 1e-3, 1e-4


@dataclass(frozen=True)
class Prepared:
    """The model every method should quantize, and what normalising it did."""

    path: Path
    opset: int  # default-domain opset of `path`: the caller checks it against the opset its path needs
    original_opset: int
    folded_constants: int  # Constant nodes turned into initializers
    pre_process: str  # "symbolic" | "no_symbolic" | "onnx_shapes" | "none" | "skipped": which step held
    full_check: bool  # the upload passes onnx.checker's full_check, so an artifact must too
    warnings: list[str] = field(default_factory=list)  # plain sentences for the user


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _graphs(sub)


def fold_constants(model: onnx.ModelProto) -> int:
    """Turn every Constant node holding a `value` tensor into an initializer of the same name, in place.

    quantize_dynamic raises ("Expected ... to be an initializer") or keeps the float Constants beside the
    integer copies (a file 1.12x the upload) when weights sit in Constant nodes, as in models other
    frameworks export. value_float(s)/value_int(s) Constants are scalars and axes: they stay nodes.
    """
    folded = 0
    for graph in _graphs(model.graph):
        taken = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
        kept = []
        for node in graph.node:
            value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            # an initializer cannot also be a graph output; a clash means a broken graph we leave alone
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or value is None \
                    or node.output[0] in taken:
                kept.append(node)
                continue
            tensor = graph.initializer.add()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            folded += 1
        if len(kept) != len(graph.node):
            del graph.node[:]
            graph.node.extend(kept)
    return folded


def tidy(model: onnx.ModelProto) -> None:
    """Name unnamed nodes, drop initializers from the graph inputs, and raise the IR version to the opsets'.

    onnxruntime's errors and the quantizers' nodes_to_exclude go by node name; an initializer that is also a
    graph input is an overridable input to onnxruntime, which then neither folds nor quantizes it (old
    exporters' keep_initializers_as_inputs, and every IR < 4 model).
    """
    names = {n.name for g in _graphs(model.graph) for n in g.node if n.name}
    for graph in _graphs(model.graph):
        for i, node in enumerate(graph.node):
            if not node.name:
                name, k = f"{node.op_type}_{i}", 0
                while name in names:
                    k += 1
                    name = f"{node.op_type}_{i}_{k}"
                node.name = name
                names.add(name)
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(model.ir_version, needed, 4)  # IR 4: initializers need not be inputs
    weights = {t.name for t in model.graph.initializer}
    if any(i.name in weights for i in model.graph.input):
        inputs = [i for i in model.graph.input if i.name not in weights]
        del model.graph.input[:]
        model.graph.input.extend(inputs)


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Save, with the weights in `<name>.data` beside it when the model is too big for one protobuf."""
    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    path.with_name(f"{path.name}.data").unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", convert_attribute=False)
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _outputs(path: Path, feeds: Mapping[str, np.ndarray] | None) -> list[np.ndarray]:
    """The model's outputs on feeds in a CPU session (none without feeds: the session only has to build)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the job's log must not fill with onnxruntime's own warnings
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    if feeds is None:
        return []
    names = {i.name for i in session.get_inputs()}  # tidy() may have turned inputs back into weights
    return [np.asarray(o) for o in session.run(None, {k: v for k, v in feeds.items() if k in names})]


def _difference(reference: list[np.ndarray], outputs: list[np.ndarray]) -> str | None:
    if len(outputs) != len(reference):
        return f"{len(outputs)} outputs instead of {len(reference)}"
    for i, (ref, out) in enumerate(zip(reference, outputs, strict=True)):
        if ref.shape != out.shape:
            return f"output {i} has shape {out.shape} instead of {ref.shape}"
        if not np.issubdtype(ref.dtype, np.floating):
            continue  # indices and masks may flip on a float difference the tolerance allows
        finite = np.abs(ref[np.isfinite(ref)])
        scale = max(1.0, float(finite.max(initial=0.0)))
        if not np.allclose(out, ref, rtol=RTOL, atol=ATOL * scale, equal_nan=True):
            return f"output {i} changed (max difference {float(np.nanmax(np.abs(out - ref))):.3g})"
    return None


def _fault(path: Path, full_check: bool, feeds: Mapping[str, np.ndarray] | None,
           reference: list[np.ndarray] | None) -> str | None:
    """Why a normalised model is worse than the upload (a check the upload passes, other outputs), or None."""
    try:
        onnx.checker.check_model(str(path), full_check=full_check)  # by path: works past 2 GiB
        outputs = _outputs(path, feeds if reference is not None else None)
    except Exception as exc:  # checker and onnxruntime raise their own classes for every kind of failure
        return _first_line(exc)
    return None if reference is None else _difference(reference, outputs)


def _passes_full_check(path: Path) -> bool:
    # full_check runs strict shape inference; some valid models fail it (an output whose shape neither the
    # file nor onnx's inference knows), and then no normalised model or artifact can be asked to pass it
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return True
    except Exception:
        return False


def _convert(model: onnx.ModelProto, target: int, path: Path, check: Callable[[Path], str | None]) -> str | None:
    """Convert to `target` and save to path; the reason it failed, or None."""
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:  # RuntimeError for a missing adapter, ValueError past 2 GiB
        return f"onnx's version converter refused it: {_first_line(exc)}"
    # version_converter silently drops model-local functions, so their calls no longer resolve
    if len(converted.functions) < len(model.functions):
        return "onnx's version converter drops the model's local functions"
    fold_constants(converted)  # the converter writes new axes and scales as Constant nodes
    tidy(converted)
    save(converted, path)
    fault = check(path)
    return f"the converted model is invalid: {fault}" if fault else None


def pre_process(src: Path, dst: Path, log: Log, check: Callable[[Path], str | None]) -> str:
    """quant_pre_process with fallbacks; returns the step that held ("none": dst not written). Call it inside
    onnx_common.confined(): every step may leave files in the cwd or the temp folder."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    data = src.with_name(f"{src.name}.data")
    large = src.stat().st_size + (data.stat().st_size if data.exists() else 0) > EXTERNAL_DATA_BYTES
    external = {"save_as_external_data": large, "all_tensors_to_one_file": True,
                "external_data_location": f"{dst.name}.data"}
    steps: list[tuple[str, Callable[[], object]]] = [
        ("symbolic", lambda: quant_pre_process(str(src), str(dst), **external)),
        # transformer and third-party CNN exports often fail symbolic inference (ENGINE.md)
        ("no_symbolic", lambda: quant_pre_process(str(src), str(dst), skip_symbolic_shape=True, **external)),
        # no onnxruntime optimisation: quant_pre_process at opset <= 10 converts to 11 itself, which can
        # silently break a model (it drops local functions) before it optimises
        ("onnx_shapes", lambda: shape_inference.infer_shapes_path(str(src), str(dst))),
    ]
    written = (dst, dst.with_name(f"{dst.name}.data"))
    for name, step in steps:
        for leftover in written:  # a failed step may have written them, and onnx appends to a .data file
            leftover.unlink(missing_ok=True)
        try:
            step()
            fault = check(dst)
        except Exception as exc:  # each library raises whatever its own inference hits
            fault = _first_line(exc)
        if fault is None:
            log("info", f"pre-processing: step '{name}' succeeded")
            return name
        log("warning", f"pre-processing step '{name}' failed: {fault}")
    for leftover in written:
        leftover.unlink(missing_ok=True)
    return "none"


def prepare(model_path: Path, scratch: Path, *, min_opset: int, log: Log,
            feeds: Mapping[str, np.ndarray] | None = None, optimize: bool = True) -> Prepared:
    """Normalise model_path into scratch for a method that needs opset >= min_opset (13: per-channel QDQ,
    21: int4 DequantizeLinear/Gather; 0: any). A step that fails, or changes the outputs on `feeds`, is skipped
    and the model goes on without it: Prepared.opset says what was reached, Prepared.warnings what the user
    must hear. optimize=False skips quant_pre_process (weight-only needs no fused graph, and keeps the
    upload's node names)."""
    model_path, scratch = Path(model_path).resolve(), Path(scratch).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    if min_opset > onnx.defs.onnx_opset_version():
        raise ValueError(f"opset {min_opset} is newer than onnx {onnx.__version__} knows")
    full_check = _passes_full_check(model_path)
    reference = None
    if feeds is not None:
        try:
            reference = _outputs(model_path, feeds)
        except Exception as exc:  # the caller's feeds do not fit: check loading only
            log("warning", f"normalisation checks without outputs: the model does not run on the feeds: "
                           f"{_first_line(exc)}")
            feeds = None

    def check(path: Path) -> str | None:
        return _fault(path, full_check, feeds, reference)

    model = onnx.load(str(model_path))
    original_opset = default_opset(model)
    tidy(model)
    folded = fold_constants(model)
    warnings: list[str] = []
    normalized = scratch / "normalized.onnx"
    reason = _convert(model, min_opset, normalized, check) if original_opset < min_opset else "not needed"
    if reason is None:  # converted, and _convert checked it
        log("info", f"converted from opset {original_opset} to {min_opset}")
    else:
        if reason != "not needed":
            log("warning", f"opset {original_opset} -> {min_opset} failed: {reason}")
            warnings.append(f"the model could not be converted from opset {original_opset} to opset {min_opset} "
                            f"({reason}), so it stays at opset {original_opset}")
        save(model, normalized)
        fault = check(normalized)
        if fault is not None:  # folding or tidying broke what the upload did: go on from the upload itself
            log("warning", f"normalised model rejected ({fault}); pre-processing the upload as it is")
            save(onnx.load(str(model_path)), normalized)
            folded = 0
    del model
    if folded:
        log("info", f"{folded} Constant node(s) turned into initializers")

    prepared = scratch / "prepared.onnx"
    if optimize:
        with onnx_common.confined(scratch):
            step = pre_process(normalized, prepared, log, check)
    else:
        step = "skipped"
    if step in ("none", "skipped"):
        prepared = normalized
    if step in ("onnx_shapes", "none"):
        warnings.append("onnxruntime's pre-processing failed on this model (quant_pre_process), so its graph "
                        "was not optimised before quantization; layers whose weights are computed in the graph "
                        "stay float")
    opset = default_opset(onnx.load(str(prepared), load_external_data=False))
    return Prepared(prepared, opset, original_opset, folded, step, full_check, warnings)

