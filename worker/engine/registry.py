"""(format, method) -> MethodSpec: the one list that capabilities and the worker both read. torch-free."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple

from worker.engine.config import DynamicConfig, MethodConfig
from worker.engine.types import Device, EngineError, Method, ModelFormat, Status


class MethodSpec(NamedTuple):
    format: ModelFormat
    method: Method
    config_model: type[MethodConfig]
    handler: str  # "module:function", imported only when a job runs
    devices: frozenset[Device]
    status: Status
    needs_calibration: bool = False
    needs_training: bool = False
    dtypes: tuple[str, ...] = ("int8",)

    def load_handler(self) -> Callable[..., Any]:
        module_name, _, attr = self.handler.partition(":")
        return getattr(importlib.import_module(module_name), attr)


class UnsupportedMethod(EngineError):
    code = "unsupported"

    def __init__(self, fmt: str, method: str) -> None:
        self.supported = sorted(f"{f}/{m}" for f, m in SPECS)
        super().__init__(
            f"method {method!r} is not available for format {fmt!r}; supported: {', '.join(self.supported)}"
        )


_CPU = frozenset({Device.cpu})

# Written out by hand, one line per backend path that exists and is tested.
SPECS: Final[Mapping[tuple[ModelFormat, Method], MethodSpec]] = {
    (s.format, s.method): s
    for s in (
        MethodSpec(ModelFormat.onnx, Method.dynamic, DynamicConfig,
                   "worker.engine.methods.onnx_dynamic:run", _CPU, Status.stable),
        MethodSpec(ModelFormat.torchscript, Method.dynamic, DynamicConfig,
                   "worker.engine.methods.torchscript_dynamic:run", _CPU, Status.legacy),
        MethodSpec(ModelFormat.torch_export, Method.dynamic, DynamicConfig,
                   "worker.engine.methods.torch_export_dynamic:run", _CPU, Status.experimental),
    )
}


def resolve(fmt: str, method: str) -> MethodSpec:
    try:
        return SPECS[(ModelFormat(fmt), Method(method))]
    except (KeyError, ValueError):
        raise UnsupportedMethod(fmt, method) from None


def devices() -> list[str]:
    return sorted({d.value for spec in SPECS.values() for d in spec.devices})
