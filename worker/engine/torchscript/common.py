"""TorchScript archives (`torch.jit.save`): inspect and run them. Legacy format; the file is code.

PyTorch has no safe mode for torch.jit.load (pytorch/pytorch#143403): a TorchScript archive is a
program. Every function here loads it, so call them only inside the worker's sandboxed child
process (RELIABILITY.md), never in the API.

TorchScript keeps argument names but no input shapes or dtypes, so inputs are reported with dtype
"unknown" and shape []: fidelity then needs an evaluation or calibration dataset (evaluate.load_samples
refuses to invent inputs of unknown shape).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.engine.errors import EngineError
from worker.engine.formats import datasets
from worker.engine.torch_export import common as pt2_common
from worker.engine.types import DatasetKind, ModelFormat, ModelInfo, TensorSpec

if TYPE_CHECKING:
    import torch

    from worker.engine.context import JobContext

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def load_module(path: Path) -> torch.jit.ScriptModule:
    import torch

    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError and friends for a malformed archive
        raise EngineError(f"could not load the TorchScript archive: {type(exc).__name__}: {exc}") from exc
    return module.eval()


def _schema(module: torch.jit.ScriptModule):  # noqa: ANN202 - torch._C.FunctionSchema
    try:
        return module.forward.schema
    except (AttributeError, RuntimeError):
        raise EngineError("the TorchScript module has no forward() method") from None


def input_specs(module: torch.jit.ScriptModule) -> list[TensorSpec]:
    args = [a for a in _schema(module).arguments if a.name != "self"]
    return [TensorSpec(a.name, "unknown", []) for a in args]


def output_specs(module: torch.jit.ScriptModule) -> list[TensorSpec]:
    import torch

    returns = _schema(module).returns
    kind = returns[0].type if returns else None
    count = len(kind.elements()) if isinstance(kind, torch.TupleType) else 1
    if count == 1:
        return [TensorSpec("output", "unknown", [])]
    return [TensorSpec(f"output_{i}", "unknown", []) for i in range(count)]


def inspect(path: Path) -> ModelInfo:
    module = load_module(path)
    inputs = input_specs(module)
    if not inputs:
        raise EngineError("the TorchScript module's forward() takes no inputs")
    params = sum(p.numel() for p in module.parameters())
    return ModelInfo(format=ModelFormat.torchscript, inputs=inputs, outputs=output_specs(module),
                     num_parameters=int(params), architecture=getattr(module, "original_name", None))


# Any callable torch module runs the same way: TorchScript, an exported program's module, an AOTI package.
runner_for_module = pt2_common.runner_for_module


def load_runner(path: Path, threads: int | None = 1) -> Runner:
    module = load_module(path)
    return runner_for_module(module, [spec.name for spec in input_specs(module)], threads)


def resolve_input_specs(ctx: JobContext, inputs: list[TensorSpec]) -> list[TensorSpec]:
    """TorchScript records no dtypes or shapes: take them from the dataset the job measures on."""
    path = ctx.evaluation_path or ctx.calibration_path
    if path is None or all(s.dtype != "unknown" for s in inputs):
        return inputs
    arrays = datasets.inspect(Path(path), DatasetKind.tensors).arrays
    if len(inputs) == 1 and len(arrays) == 1:
        matched = {inputs[0].name: next(iter(arrays.values()))}
    else:
        matched = {s.name: arrays[s.name] for s in inputs if s.name in arrays}
    resolved = []
    for spec in inputs:
        array = matched.get(spec.name)
        if spec.dtype != "unknown" or array is None:
            resolved.append(spec)  # load_samples names what is missing
        else:
            resolved.append(TensorSpec(spec.name, array.dtype, ["batch", *array.shape[1:]]))
    return resolved
