"""JobContext: everything a method handler receives. torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.engine.config import MethodConfig
from worker.engine.types import Device, LogFn, Method, ModelFormat, ProgressFn, no_log, no_progress


@dataclass
class JobContext:
    """Everything a method handler needs; built by quantize()."""

    model_path: Path
    format: ModelFormat
    method: Method
    config: MethodConfig
    work_dir: Path
    device: Device = Device.cpu
    calibration_path: Path | None = None
    training_path: Path | None = None
    evaluation_path: Path | None = None
    progress: ProgressFn = no_progress
    log: LogFn = no_log
    model_name: str = "model"
    extra: dict[str, Any] = field(default_factory=dict)
