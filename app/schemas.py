"""Pydantic models of the REST contract in API.md, by role: *Create for input, *Public for output."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.names import MAX_NAME_CHARS, Name
from app.webhooks import MAX_URL_CHARS, url_problem

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
    method: str = Field(description="dynamic | static | qat | weight_only | auto (a sweep of the others); see "
                        "/v1/capabilities.")
    config: dict[str, Any] = Field(default_factory=dict, description="The method's options.")
    calibration_dataset_id: uuid.UUID | None = None
    training_dataset_id: uuid.UUID | None = None
    evaluation_dataset_id: uuid.UUID | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    name: Name | None = Field(None, description="Free-form, for your own bookkeeping.",
                              json_schema_extra={"maxLength": MAX_NAME_CHARS})
    labels: dict[str, Any] | None = None
    callback_url: str | None = Field(None, max_length=MAX_URL_CHARS,
                                     description="http(s) URL POSTed a signed job.<status> event when the job ends "
                                                 "(Standard Webhooks; secret from POST /v1/webhooks/secret).")

    @field_validator("callback_url")
    @classmethod
    def _callback_url_shape(cls, value: str | None) -> str | None:
        # Shape only; the address it resolves to is checked by the service (and again at each delivery).
        if value is not None and (problem := url_problem(value)) is not None:
            raise ValueError(problem)
        return value
