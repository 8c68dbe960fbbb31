"""The quantization engine's public surface: paths and a config in, artifacts and metrics out.

No database, Celery or HTTP here. Heavy libraries (torch, onnxruntime) are imported inside the
functions that need them, so importing this package stays lean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.engine import accelerator, registry
from worker.engine.config import MethodConfig
from worker.engine.context import JobContext
from worker.engine.errors import EngineError, UnsupportedMethodError
from worker.engine.registry import SPECS, MethodSpec, resolve
from worker.engine.types import (
    DatasetInfo,
    DatasetKind,
    Device,
    LogFn,
    Method,
    ModelFormat,
    ModelInfo,
    ProgressFn,
    QuantizeResult,
    no_log,
    no_progress,
)

__all__ = [
    "SPECS",
    "EngineError",
    "JobContext",
    "MethodSpec",
    "UnsupportedMethodError",
    "inspect_dataset",
    "inspect_model",
    "quantize",
    "resolve",
]


def inspect_model(path: Path, fmt: ModelFormat) -> ModelInfo:
    """Validate an uploaded model and describe its inputs/outputs. Raises EngineError if invalid."""
    from worker.engine.formats import loaders

    return loaders.for_format(fmt).inspect(Path(path))


def inspect_dataset(path: Path, kind: DatasetKind, *, max_bytes: int | None = None) -> DatasetInfo:
    """Validate an uploaded dataset without unpickling anything. Raises EngineError if invalid.

    max_bytes caps the decompressed size (zip bombs); None keeps the module's default."""
    from worker.engine.formats import datasets

    if max_bytes is None:
        return datasets.inspect(Path(path), DatasetKind(kind))
    return datasets.inspect(Path(path), DatasetKind(kind), max_bytes=max_bytes)


def quantize(
    model_path: Path,
    fmt: ModelFormat | str,
    method: Method | str,
    config: MethodConfig | dict[str, Any] | None,
    work_dir: Path,
    *,
    device: Device | str = Device.cpu,
    calibration_path: Path | None = None,
    training_path: Path | None = None,
    evaluation_path: Path | None = None,
    progress: ProgressFn = no_progress,
    log: LogFn = no_log,
    model_name: str = "model",
) -> QuantizeResult:
    """Quantize one model with one method; returns the artifacts written under work_dir and metrics."""
    spec = resolve(str(fmt), str(method))
    if not isinstance(config, MethodConfig):
        config = spec.config_model.model_validate(config or {})
    if Device(device) not in spec.devices:
        raise UnsupportedMethodError(str(fmt), f"{method} on {device}", registry.supported())
    problems = spec.config_problems(config, device)
    if problems:
        raise EngineError("; ".join(f"config.{field}: {why}" for field, why in problems), code="unsupported")
    accelerator.torch_device(device)  # a cuda job on a host without CUDA fails here, before any work
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(
        model_path=Path(model_path), format=spec.format, method=spec.method, config=config,
        work_dir=work_dir, device=Device(device), calibration_path=calibration_path,
        training_path=training_path, evaluation_path=evaluation_path, progress=progress, log=log,
        model_name=model_name,
    )
    return spec.load_handler()(ctx)
