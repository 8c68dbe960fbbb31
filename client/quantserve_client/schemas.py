"""The API's answers as pydantic models: the one definition both the server and the Python client use.

Why here: the client must install without the server's dependencies (FastAPI, SQLAlchemy, Celery), so it
cannot import app/; the server ships this package too (pyproject: packages.find where = [".", "client"]), and
app/schemas.py re-exports these classes, so FastAPI builds /openapi.json from the very models the client parses.
Pure pydantic only: no import from app/ or worker/, which tests/unit/test_client_models.py checks.
Unknown fields are ignored (pydantic's default), so an older client reads a newer server's answers (API.md: fields
may be added).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


class ErrorInfo(BaseModel):
    code: str
    message: str
    reason: str | None = Field(None, description="The finer cause folded into `code`, e.g. dataset_mismatch.")


class TensorSpecPublic(BaseModel):
    name: str
    dtype: str
    shape: list[int | str]
    optional: bool = False


class ModelPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    name: str
    format: str
    status: Literal["validating", "ready", "invalid"]
    size_bytes: int
    sha256: str
    created_at: datetime
    inputs: list[TensorSpecPublic] | None = None
    outputs: list[TensorSpecPublic] | None = None
    num_parameters: int | None = None
    architecture: str | None = None
    error: ErrorInfo | None = None


class ArrayPublic(BaseModel):
    dtype: str
    shape: list[int]


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    name: str
    kind: str
    status: Literal["validating", "ready", "invalid"]
    num_samples: int | None = None
    arrays: dict[str, ArrayPublic] | None = None
    has_labels: bool | None = None
    size_bytes: int
    sha256: str
    created_at: datetime
    error: ErrorInfo | None = None


class ArtifactPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    job_id: uuid.UUID
    kind: str
    filename: str
    format: str | None = None
    size_bytes: int
    sha256: str
    created_at: datetime
    download_url: str


class JobPublic(BaseModel):
    id: uuid.UUID
    model_id: uuid.UUID
    method: str
    device: str
    config: dict[str, Any]
    calibration_dataset_id: uuid.UUID | None = None
    training_dataset_id: uuid.UUID | None = None
    evaluation_dataset_id: uuid.UUID | None = None
    name: str | None = None
    labels: dict[str, Any] | None = None
    callback_url: str | None = None
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: str | None = None
    progress: float
    attempts: int
    error: ErrorInfo | None = None
    metrics: dict[str, Any] | None = None
    artifacts: list[ArtifactPublic]
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None


class LogLine(BaseModel):
    seq: int
    ts: datetime
    level: str
    message: str


class MethodCapability(BaseModel):
    dtypes: list[str]
    devices: list[str]
    options: dict[str, Any]
    status: str
    needs_calibration: bool
    needs_training: bool
    supports_target: bool = Field(False, description="config.target is honoured (metrics.sensitivity, metrics.target).")
    target_metrics: list[str] = Field(default_factory=list, description="The target metrics this method measures.")
    supports_auto_bits: bool = Field(False, description="config.bits 'auto' is honoured: int4/int8 per layer under "
                                     "max_size_ratio / max_latency_ms.")
    sweep_candidates: list[str] = Field(default_factory=list, description="Method auto only: the candidates its "
                                        "sweep may run (config.candidates), those the model and data allow.")


class FormatCapability(BaseModel):
    methods: dict[str, MethodCapability]
    supports_auto: bool = Field(False, description="method 'auto' is offered: a sweep of this format's methods in "
                                "one job, delivering the fastest candidate that meets the target (metrics.sweep).")


class LiveDevice(BaseModel):
    device: str = Field(description="cpu or cuda: a value of a job's `device`.")
    queue: str = Field(description="The queue its jobs go to.")
    name: str | None = Field(description="CPU model or GPU name, as the worker reads it.")
    flags: list[str] = Field(description="CPU instruction-set flags that decide which int8 kernels run "
                                         "(avx2, avx512_vnni, amx_int8, ...); empty for a GPU.")
    methods: list[str] = Field(description="The format/method pairs these workers run on this device.")
    workers: int = Field(description="How many live workers serve this device with this hardware.")
    details: dict[str, Any] = Field(default_factory=dict, description="More about the device (cores, memory).")


class Capabilities(BaseModel):
    formats: dict[str, FormatCapability]
    devices: list[str] = Field(description="Devices the engine's registry can run, whether or not a worker is up.")
    queues: list[str]
    version: str
    served_devices: list[str] = Field(default_factory=list,
                                      description="Devices a live worker serves now: a job for any other is 422.")
    live_devices: list[LiveDevice] = Field(default_factory=list,
                                           description="What live workers serve, by kind of hardware.")
