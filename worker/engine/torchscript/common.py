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


# TorchScript's scalar argument types: the dtype a dataset gives them in, and the Python type they are passed as.
_SCALARS: dict[str, tuple[str, type]] = {"int": ("int64", int), "float": ("float64", float), "bool": ("bool", bool)}


def input_specs(module: torch.jit.ScriptModule) -> list[TensorSpec]:
    """Tensor arguments with dtype "unknown" (resolve_input_specs takes it from the dataset); `int`, `float`
    and `bool` arguments as 0-d inputs, which a dataset gives as N values, sample i being a[i]."""
    args = [a for a in _schema(module).arguments if a.name != "self"]
    return [TensorSpec(a.name, _SCALARS[str(a.type)][0], []) if str(a.type) in _SCALARS
            else TensorSpec(a.name, "unknown", []) for a in args]


def _scalar_types(module: torch.jit.ScriptModule) -> dict[str, type]:
    return {a.name: _SCALARS[str(a.type)][1] for a in _schema(module).arguments if str(a.type) in _SCALARS}


def arguments(module: torch.jit.ScriptModule, names: list[str], batch: dict[str, np.ndarray]) -> list:
    """forward()'s arguments for one sample: tensors from the arrays, Python scalars where the schema asks."""
    import torch

    scalars = _scalar_types(module)
    return [scalars[n](np.asarray(batch[n]).reshape(-1)[0].item()) if n in scalars
            else torch.from_numpy(np.ascontiguousarray(batch[n])) for n in names]


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


def runner_for_module(module: torch.jit.ScriptModule, input_names: list[str], threads: int | None = 1) -> Runner:
    """pt2_common.runner_for_module, with `int`/`float`/`bool` arguments passed as Python scalars."""
    if not _scalar_types(module):
        return pt2_common.runner_for_module(module, input_names, threads)
    import torch
    from torch.utils import _pytree as pytree

    if threads:
        torch.set_num_threads(threads)

    def run(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            result = module(*arguments(module, input_names, batch))
        return [leaf.detach().numpy() for leaf in pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)]

    return run


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
