"""Pydantic models of the REST contract in API.md, by role: *Create for input, *Public for output."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from app.names import MAX_NAME_CHARS, Name

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


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: uuid.UUID
    method: str = Field(description="dynamic | static | qat | weight_only; see /v1/capabilities.")
    config: dict[str, Any] = Field(default_factory=dict, description="The method's options.")
    calibration_dataset_id: uuid.UUID | None = None
    training_dataset_id: uuid.UUID | None = None
    evaluation_dataset_id: uuid.UUID | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    name: Name | None = Field(None, description="Free-form, for your own bookkeeping.",
                              json_schema_extra={"maxLength": MAX_NAME_CHARS})
    labels: dict[str, Any] | None = None


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


class FormatCapability(BaseModel):
    methods: dict[str, MethodCapability]


class Capabilities(BaseModel):
    formats: dict[str, FormatCapability]
    devices: list[str]
    queues: list[str]
    version: str
