"""Plain data types the engine takes and returns. torch-free: the API imports this module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class ModelFormat(StrEnum):
    onnx = "onnx"
    torchscript = "torchscript"
    torch_export = "torch_export"
    hf = "hf"


class Method(StrEnum):
    dynamic = "dynamic"
    static = "static"
    qat = "qat"
    weight_only = "weight_only"
    auto = "auto"  # a sweep: the pair's other methods as candidates, measured alike (onnx/auto.py)


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


class Status(StrEnum):
    stable = "stable"
    legacy = "legacy"
    experimental = "experimental"


class DatasetKind(StrEnum):
    tensors = "tensors"
    text = "text"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: float32, int64, ...
    shape: list[int | str]  # str for a symbolic dimension ("batch")
    optional: bool = False  # the model runs without it (a dataset may leave it out)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "optional": self.optional}


@dataclass(frozen=True)
class ModelInfo:
    """What validation learns about an uploaded model."""

    format: ModelFormat
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    num_parameters: int | None
    architecture: str | None = None


@dataclass(frozen=True)
class ArrayInfo:
    dtype: str
    shape: list[int]


@dataclass(frozen=True)
class DatasetInfo:
    kind: DatasetKind
    num_samples: int
    arrays: dict[str, ArrayInfo]
    has_labels: bool


@dataclass(frozen=True)
class ArtifactFile:
    """One deliverable the engine wrote into the job's scratch folder."""

    kind: str  # model | compiled_model | report | ...
    path: Path
    filename: str
    format: str | None = None


@dataclass
class QuantizeResult:
    artifacts: list[ArtifactFile]
    metrics: dict[str, Any]  # the `metrics` object of API.md
    report: dict[str, Any] = field(default_factory=dict)  # extra report.json fields (versions, cpu, ...)
    # a job that fails with its artifacts still delivered (target_not_met): {"code", "message"}
    error: dict[str, str] | None = None


# Every `stage` a job reports, roughly in the order a job passes them (not every job passes all). README.md
# ("Stages") describes each and mirrors this list; tests/unit/test_stages.py checks that every
# progress("<stage>", ...) in worker/ names one of these.
STAGES: tuple[str, ...] = ("loading", "calibrating", "training", "quantizing", "evaluating", "benchmarking",
                           "packaging")

# progress(stage, fraction in 0..1 within the whole job); log(level, message)
ProgressFn = Callable[[str, float], None]
LogFn = Callable[[str, str], None]


def no_progress(stage: str, fraction: float) -> None:  # noqa: ARG001 - default callback
    return None


def no_log(level: str, message: str) -> None:  # noqa: ARG001 - default callback
    return None
