"""Settings: one object, read from QUANTSERVE_* environment variables."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUANTSERVE_", extra="ignore")

    data_dir: Path = Field(Path(".quantserve"), description="Artifacts, and the embedded database/broker.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in data_dir.")
    broker_url: str | None = Field(None, description="Celery broker URL; default: SQLite-backed, in data_dir.")
    storage_url: str | None = Field(None, description="s3://bucket/prefix for an S3-compatible store (endpoint, "
                                    "region and credentials from the AWS_* variables, e.g. AWS_ENDPOINT_URL); "
                                    "default: the folder data_dir/store.")
    storage_public_endpoint: str | None = Field(None, description="The S3 endpoint as clients outside see it, for "
                                                "the presigned URLs of ?redirect=1; default: AWS_ENDPOINT_URL.")
    broker_key_prefix: str = Field("", description="Prefix of every Redis key, to share one Redis safely.")
    max_upload_bytes: int = Field(2 * 1024**3, description="Largest model or dataset upload.")
    max_dataset_bytes: int = Field(4 * 1024**3, description="Largest decompressed dataset (zip-bomb guard).")
    max_json_bytes: int = Field(1024**2, description="Largest JSON request body.")
    job_lease_s: float = Field(30.0, description="A running job without a heartbeat this long is requeued.")
    heartbeat_s: float = Field(1.0, description="How often a running job renews its lease and checks cancel.")
    job_max_attempts: int = Field(3, description="Attempts before a job whose worker dies fails as worker_lost.")
    job_time_limit_s: float = Field(3600.0, description="Wall-clock limit of one attempt.")
    job_memory_limit_mb: int = Field(0, description="Resident-memory limit of the engine process; 0 = none.")
    max_artifact_bytes: int | None = Field(None, description="Largest file the engine process may write "
                                           "(RLIMIT_FSIZE, artifacts and temporary files alike); 0 = none; "
                                           "default: 8 x max_upload_bytes.")
    sweep_interval_s: float = Field(2.0, description="How often a worker re-publishes and reaps.")
    redispatch_after_s: float = Field(300.0, description="A job queued this long is published again.")
    worker_concurrency: int = Field(2, description="Tasks one worker process runs at once.")
    # The API's request path under load (app/db.py explains how these three numbers fit together).
    api_workers: int = Field(0, description="API processes `quantserve api` starts; 0 = one per CPU.")
    db_pool_size: int = Field(10, ge=1, description="Connections each API process keeps for its polled reads "
                                                    "(job status, key lookups).")
    db_pool_timeout_s: float = Field(5.0, gt=0, description="How long a request waits for a database connection "
                                                            "before it answers 503 with Retry-After.")
    db_statement_timeout_s: float = Field(10.0, ge=0, description="PostgreSQL statement_timeout of the API's "
                                                                  "polled reads; 0 = none.")
    key_cache_ttl_s: float = Field(5.0, ge=0, description="How long an API process trusts a key it has looked up; "
                                                          "a revoked key stops working within this time.")
    webhook_allow_private: bool = Field(False, description="Let callback URLs reach private, loopback and link-local "
                                        "addresses (never cloud metadata ones; list those in webhook_allowed_cidrs).")
    webhook_allowed_cidrs: str = Field("", description="Comma-separated networks callback URLs may reach even though "
                                       "they are not public, e.g. 10.20.0.0/16,127.0.0.1/32.")
    webhook_signing_key: str | None = Field(None, description="Derives each tenant's webhook secret; the same value on "
                                            "the API and every worker. Default: a key file in data_dir (embedded).")
    webhook_max_attempts: int = Field(8, ge=1, description="Deliveries of one webhook before it is given up.")
    webhook_retry_base_s: float = Field(10.0, gt=0, description="Wait before the 2nd attempt; doubles after each.")
    webhook_timeout_s: float = Field(10.0, gt=0, description="Connect + read timeout of one delivery attempt.")
    access_log: Literal["off", "json"] = Field("off", description="One JSON line per request (tenant_id, "
                                                                  "request_id, status, duration) on stderr.")

    @property
    def engine_file_limit_bytes(self) -> int:
        """RLIMIT_FSIZE of the engine process (0 = none). A runaway guard, not a budget: a library's temporary
        copies of a model (shape-inferred ONNX, extracted hf folders) are a few times the upload."""
        return self.max_artifact_bytes if self.max_artifact_bytes is not None else 8 * self.max_upload_bytes

    @property
    def worker_ttl_s(self) -> float:
        """A worker whose row was not refreshed this long is not live. Workers refresh it every sweep, so three
        missed sweeps; never under 10 s, so that one slow sweep (a busy database) does not hide a worker."""
        return max(3 * self.sweep_interval_s, 10.0)

    @cached_property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'quantserve.db'}"

    @cached_property
    def effective_broker_url(self) -> str:
        # Kombu's SQLAlchemy transport: a real broker in a file, so `serve` needs nothing installed.
        return self.broker_url or f"sqla+sqlite:///{self.data_dir.resolve() / 'broker.db'}"

    def webhook_policy(self):  # noqa: ANN201 - app.webhooks.TargetPolicy, imported late to keep settings leaf-level
        from app.webhooks import TargetPolicy

        return TargetPolicy.from_settings(self.webhook_allow_private, self.webhook_allowed_cidrs)

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def scratch_dir(self) -> Path:
        return self.data_dir / "scratch"


def get_settings() -> Settings:
    return Settings()
