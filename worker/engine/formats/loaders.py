"""ModelFormat -> the module that inspects and runs that format; imported only when asked for."""

from __future__ import annotations

import importlib
from types import ModuleType

from worker.engine.errors import UnsupportedModelError
from worker.engine.types import ModelFormat

_MODULES = {
    ModelFormat.onnx: "worker.engine.onnx.common",
    ModelFormat.torchscript: "worker.engine.torchscript.common",
    ModelFormat.torch_export: "worker.engine.torch_export.common",
    ModelFormat.hf: "worker.engine.hf.common",
}


def for_format(fmt: ModelFormat | str) -> ModuleType:
    """The format module, with `inspect(path) -> ModelInfo` (validation runs through it)."""
    try:
        fmt = ModelFormat(fmt)
    except ValueError:
        raise UnsupportedModelError(f"unknown model format {fmt!r}; known: {', '.join(ModelFormat)}") from None
    if fmt not in _MODULES:
        raise UnsupportedModelError(f"{fmt.value} models are not supported yet; export to ONNX or torch.export")
    # Lazy: torch is heavy and the API process must never import it.
    return importlib.import_module(_MODULES[fmt])
