"""torch.export `.pt2` programs: inspect and run them, loading only a checked, pickle-free copy."""

from __future__ import annotations

import struct
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.engine.errors import EngineError
from worker.engine.torch_export import safety as pt2_safety
from worker.engine.types import ModelFormat, ModelInfo, TensorSpec

if TYPE_CHECKING:
    import torch

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
ALIGNMENT = 64  # torch's archive writer aligns tensor data to 64 bytes; keep that when rewriting


def load_program(path: Path, scratch: Path | None = None, *, ours: bool = False) -> torch.export.ExportedProgram:
    """torch.export.load on a sanitized copy (see pt2_safety); call only in the sandboxed child.

    ours=True for a program the engine saved: if that does not load back, the fault is ours (engine_error)."""
    import torch

    with tempfile.TemporaryDirectory(prefix="pt2-", dir=scratch) as tmp:
        copy = pt2_safety.sanitized_copy(Path(path), Path(tmp) / "program.pt2")
        try:
            return torch.export.load(str(copy))
        except Exception as exc:  # torch raises many types for a malformed program
            whose = "the quantized program quantserve saved" if ours else "the torch.export program"
            raise EngineError(f"could not load {whose}: {type(exc).__name__}: {exc}",
                              code="engine_error" if ours else None) from exc


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _spec(name: str, value: object) -> TensorSpec:
    import torch

    if isinstance(value, torch.Tensor):
        shape = [int(d) if isinstance(d, int) else str(d) for d in value.shape]
        return TensorSpec(name, _dtype_name(value.dtype), shape)
    return TensorSpec(name, type(value).__name__, [])


def input_specs(program: torch.export.ExportedProgram) -> list[TensorSpec]:
    """User inputs in call order, named after forward()'s arguments when they line up one to one."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    user_inputs = list(program.graph_signature.user_inputs)
    arg_names: list[str] = []
    for entry in program.module_call_graph:
        if entry.fqn == "" and entry.signature is not None:
            arg_names = list(getattr(entry.signature, "forward_arg_names", None) or [])
    if len(arg_names) != len(user_inputs):
        arg_names = [str(name) for name in user_inputs]
    pairs = zip(arg_names, user_inputs, strict=True)
    return [_spec(arg, placeholders[str(name)].meta.get("val")) for arg, name in pairs]


def output_specs(program: torch.export.ExportedProgram) -> list[TensorSpec]:
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    by_name = {getattr(a, "name", None): a for a in output_node.args[0]}
    names = [str(n) for n in program.graph_signature.user_outputs]
    values = [by_name[n].meta.get("val") if n in by_name else None for n in names]
    labels = ["output"] if len(names) == 1 else [f"output_{i}" for i in range(len(names))]
    return [_spec(label, value) for label, value in zip(labels, values, strict=True)]


def num_parameters(program: torch.export.ExportedProgram) -> int:
    state = program.state_dict
    names = [n for n in program.graph_signature.parameters if n in state] or list(state)
    return int(sum(state[n].numel() for n in names))


def inspect(path: Path) -> ModelInfo:
    program = load_program(path)
    inputs = input_specs(program)
    if not inputs:
        raise EngineError("the torch.export program takes no tensor inputs")
    return ModelInfo(format=ModelFormat.torch_export, inputs=inputs, outputs=output_specs(program),
                     num_parameters=num_parameters(program), architecture=_architecture(program))


def _architecture(program: torch.export.ExportedProgram) -> str | None:
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for path, type_name in stack.values():
            if path in ("", "L['self']"):
                return str(type_name).rsplit(".", 1)[-1]
    return None


def runner_for_module(module: torch.nn.Module, input_names: list[str], threads: int | None = 1,
                      device: str = "cpu") -> Runner:
    """One call = one batch: numpy arrays by input name in, flattened outputs in order out. Inputs go to
    `device` (the module's); on cuda the copy back waits for the GPU, so a call's time is the whole forward."""
    import torch
    from torch.utils import _pytree as pytree

    if threads:  # None leaves the process-wide setting alone
        torch.set_num_threads(threads)

    def run(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(batch[name])).to(device) for name in input_names]
        with torch.no_grad():
            result = module(*args)
        return [leaf.detach().cpu().numpy() for leaf in pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)]

    return run


def load_runner(path: Path, threads: int | None = 1) -> Runner:
    program = load_program(path)
    return runner_for_module(program.module(), [spec.name for spec in input_specs(program)], threads)


def save_program(program: torch.export.ExportedProgram, path: Path) -> Path:
    """torch.export.save, then the JSON members deflated; tensor members stay stored and 64-byte aligned.

    The graph JSON costs ~0.7 KB per node: on a small MLP it was a quarter of the int8 program. A
    deflated member is plain zip that torch.export.load reads (miniz), and it shrinks ~8x.
    """
    import torch

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="pt2-", dir=path.parent) as tmp:
        raw = Path(tmp) / path.name  # same file name: torch names the archive's root folder after it
        torch.export.save(program, str(raw))
        with zipfile.ZipFile(raw) as src, zipfile.ZipFile(path, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename.endswith(".json"):
                    dst.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
                    continue
                entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                data_start = dst.fp.tell() + 30 + len(info.filename.encode()) + 4  # header, name, pad field
                pad = -data_start % ALIGNMENT
                entry.extra = struct.pack("<HH", 0x4246, pad) + b"\0" * pad  # the "FB" padding field torch uses
                dst.writestr(entry, data, compress_type=zipfile.ZIP_STORED)
    return path


def save_and_reload(program: torch.export.ExportedProgram, output: Path, model_path: Path,
                    input_names: list[str], log: Callable[[str, str], None],
                    device: str = "cpu") -> tuple[Runner, int, int]:
    """Save the quantized program, then load the file back as a user would: the metrics measure the
    artifact, not the object in memory. Returns (runner, original bytes, quantized bytes)."""
    save_program(program, output)
    original_bytes, quantized_bytes = Path(model_path).stat().st_size, output.stat().st_size
    log("info", f"saved {output.name}: {quantized_bytes} bytes ({quantized_bytes / original_bytes:.3f}x)")
    with tempfile.TemporaryDirectory(dir=output.parent) as scratch:
        reloaded = load_program(output, scratch=Path(scratch), ours=True)
    return runner_for_module(reloaded.module(), input_names, threads=1, device=device), original_bytes, quantized_bytes
