"""Pydantic models of the REST contract in API.md, by role: *Create for input, *Public for output."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.names import MAX_NAME_CHARS, Name

# The answers live in the client package, which the server ships too: one definition for the routes' OpenAPI and
# for the Python client, which cannot import app/ (client/quantserve_client/schemas.py says why).
from quantserve_client.schemas import (  # noqa: F401  (re-exported: routes import them from here)
    ArrayPublic,
    ArtifactPublic,
    Capabilities,
    DatasetPublic,
    ErrorInfo,
    FormatCapability,
    JobPublic,
    LiveDevice,
    LogLine,
    MethodCapability,
    ModelPublic,
    Page,
    TensorSpecPublic,
)


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
