"""Client(url, key): upload, submit, wait, download and read reports, with typed answers and safe retries."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from quantserve_client.http import ApiError, ClientError, Transport
from quantserve_client.schemas import (
    ArtifactPublic,
    Capabilities,
    DatasetPublic,
    JobPublic,
    LogLine,
    ModelPublic,
    Page,
)
from quantserve_client.transfer import DownloadError, download_artifact

__all__ = ["Client", "ApiError", "ClientError", "DownloadError", "JobFailedError", "UploadInvalidError"]

DEFAULT_URL = "http://localhost:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
MAX_WAIT_S = 60  # the longest long poll the API allows (GET /v1/jobs/{id}?wait=N, API.md)
Row = TypeVar("Row", ModelPublic, DatasetPublic)
Ref = str | uuid.UUID | BaseModel  # an id, or a model / dataset / job answer that carries one


class JobFailedError(ClientError):
    """wait() saw the job end failed or cancelled; `job.error` says why and what to do (README)."""

    def __init__(self, job: JobPublic) -> None:
        self.job = job
        why = f"{job.error.code}: {job.error.message}" if job.error else job.status
        super().__init__(f"job {job.id} {job.status}: {why}")


class UploadInvalidError(ClientError):
    """The worker could not use an upload (status 'invalid'); `row.error` says why."""

    def __init__(self, row: ModelPublic | DatasetPublic) -> None:
        self.row = row
        why = f"{row.error.code}: {row.error.message}" if row.error else "invalid"
        super().__init__(f"{row.name!r} ({row.id}) is invalid: {why}")


def _id(ref: Ref) -> str:
    return str(getattr(ref, "id", ref))


class Client:
    """A quantserve server, seen from Python. `url` and `key` default to $QUANTSERVE_URL and $QUANTSERVE_API_KEY.

    Every call retries on 503/429 (after the server's Retry-After) and on connection errors, `retries` times with
    exponential backoff; only requests that are safe to repeat are retried after they may have reached the server.
    """

    def __init__(self, url: str | None = None, key: str | None = None, *, timeout_s: float = 60.0, retries: int = 6,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0) -> None:
        url = url or os.environ.get("QUANTSERVE_URL") or DEFAULT_URL
        key = key or os.environ.get("QUANTSERVE_API_KEY")
        if not key:
            raise ClientError("no API key: pass key=... or set QUANTSERVE_API_KEY")
        self.url = url.rstrip("/")
        self.transport = Transport(self.url, key.strip(), timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                                   max_backoff_s=max_backoff_s)

    @property
    def http(self):  # the httpx.Client, for event hooks or calls this class does not wrap
        return self.transport.http

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, **kwargs: Any) -> Any:
        return self.transport.request("GET", path, idempotent=True, **kwargs).json()

    # Uploads -------------------------------------------------------------------------------------------------

    def upload_model(self, path: str | os.PathLike[str], *, name: str | None = None, format: str | None = None,
                     wait: bool = True, timeout_s: float = 600.0) -> ModelPublic:
        """Stream a model file to the server. With `wait`, return once the worker has validated it (`ready`),
        raising UploadInvalidError if it is `invalid`."""
        row = self._upload("models", Path(path), name, {"format": format} if format else {}, ModelPublic)
        return self._wait_ready("models", row, ModelPublic, timeout_s) if wait else row

    def upload_dataset(self, path: str | os.PathLike[str], *, name: str | None = None, kind: str | None = None,
                       wait: bool = True, timeout_s: float = 600.0) -> DatasetPublic:
        """Stream a dataset (.npz tensors or .jsonl text) to the server; `wait` as for upload_model."""
        row = self._upload("datasets", Path(path), name, {"kind": kind} if kind else {}, DatasetPublic)
        return self._wait_ready("datasets", row, DatasetPublic, timeout_s) if wait else row

    def _upload(self, noun: str, path: Path, name: str | None, params: dict[str, str], row: type[Row]) -> Row:
        if not path.is_file():
            raise ClientError(f"{path} is not a file")
        # The raw-body route, with the file streamed from disk: nothing is held in memory. Not idempotent (each
        # upload is a new row), so it is retried only when it surely never reached the server.
        files: list[Any] = []

        def body() -> Any:
            files.append(fh := path.open("rb"))
            return fh

        try:
            response = self.transport.request(
                "PUT", f"/v1/{noun}/upload", idempotent=False, content=body,
                params={"name": name or path.name, **params},
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(path.stat().st_size)})
        finally:
            for fh in files:
                fh.close()
        return row.model_validate(response.json())

    def _wait_ready(self, noun: str, row: Row, kind: type[Row], timeout_s: float) -> Row:
        deadline, pause = time.monotonic() + timeout_s, 0.2
        while row.status == "validating":
            if time.monotonic() > deadline:
                raise ClientError(f"{noun[:-1]} {row.id} is still validating after {timeout_s:.0f} s")
            time.sleep(pause)
            pause = min(pause * 1.5, 2.0)
            row = kind.model_validate(self._get(f"/v1/{noun}/{row.id}"))
        if row.status == "invalid":
            raise UploadInvalidError(row)
        return row

    def model(self, model: Ref) -> ModelPublic:
        return ModelPublic.model_validate(self._get(f"/v1/models/{_id(model)}"))

    def dataset(self, dataset: Ref) -> DatasetPublic:
        return DatasetPublic.model_validate(self._get(f"/v1/datasets/{_id(dataset)}"))

    def capabilities(self) -> Capabilities:
        return Capabilities.model_validate(self._get("/v1/capabilities"))

    # Jobs ----------------------------------------------------------------------------------------------------

    def submit(self, model: Ref, method: str, *, config: dict[str, Any] | None = None,
               calibration_dataset_id: Ref | None = None, training_dataset_id: Ref | None = None,
               evaluation_dataset_id: Ref | None = None, device: str = "cpu", name: str | None = None,
               labels: dict[str, Any] | None = None, idempotency_key: str | None = None) -> JobPublic:
        """Submit a job (POST /v1/jobs). An Idempotency-Key is generated when none is given and kept across this
        call's retries: a submit whose answer was lost and is sent again returns the same job, never a second."""
        body: dict[str, Any] = {"model_id": _id(model), "method": method, "config": config or {}, "device": device}
        for field, ref in (("calibration_dataset_id", calibration_dataset_id),
                           ("training_dataset_id", training_dataset_id),
                           ("evaluation_dataset_id", evaluation_dataset_id)):
            if ref is not None:
                body[field] = _id(ref)
        if name is not None:
            body["name"] = name
        if labels is not None:
            body["labels"] = labels
        key = idempotency_key or f"quantserve-client-{uuid.uuid4()}"
        response = self.transport.request("POST", "/v1/jobs", idempotent=True, json=body,
                                          headers={"Idempotency-Key": key})
        return JobPublic.model_validate(response.json())

    def job(self, job: Ref) -> JobPublic:
        return JobPublic.model_validate(self._get(f"/v1/jobs/{_id(job)}"))

    def jobs(self, *, status: str | None = None, model_id: Ref | None = None, limit: int | None = None,
             page_size: int = 50) -> Iterator[JobPublic]:
        """Jobs newest first, following the cursor; at most `limit` of them."""
        params: dict[str, Any] = {"limit": min(page_size, limit or page_size)}
        if status:
            params["status"] = status
        if model_id is not None:
            params["model_id"] = _id(model_id)
        seen = 0
        while True:
            page = Page[JobPublic].model_validate(self._get("/v1/jobs", params=params))
            for job in page.items:
                yield job
                seen += 1
                if limit is not None and seen >= limit:
                    return
            if not page.next_cursor:
                return
            params["cursor"] = page.next_cursor

    def wait(self, job: Ref, *, on_progress: Callable[[JobPublic], None] | None = None,
             timeout_s: float | None = None, poll_s: int = 30, check: bool = True) -> JobPublic:
        """Block until the job ends; call `on_progress(job)` at once and on every change of status, stage or
        progress. Long-polls (GET ?wait=N with If-None-Match), so a change arrives at once, with no busy loop.
        With `check`, a failed or cancelled job raises JobFailedError; otherwise it is returned."""
        job_id, deadline = _id(job), None if timeout_s is None else time.monotonic() + timeout_s
        response = self.transport.request("GET", f"/v1/jobs/{job_id}", idempotent=True)
        current, etag = JobPublic.model_validate(response.json()), response.headers.get("etag")
        if on_progress:
            on_progress(current)
        while current.status not in TERMINAL:
            poll = min(poll_s, MAX_WAIT_S)
            left = poll if deadline is None else min(poll, int(deadline - time.monotonic()))
            if left <= 0:
                raise ClientError(f"job {job_id} is still {current.status} after {timeout_s:.0f} s")
            asked = time.monotonic()
            response = self.transport.request(
                "GET", f"/v1/jobs/{job_id}", idempotent=True, ok=(304,), params={"wait": left},
                headers={"If-None-Match": etag} if etag else {}, timeout=left + 30)
            if response.status_code != 304:
                job_now, etag = JobPublic.model_validate(response.json()), response.headers.get("etag")
                changed = (job_now.status, job_now.stage, job_now.progress) != (
                    current.status, current.stage, current.progress)
                current = job_now
                if changed and on_progress:
                    on_progress(current)
            # A server without long polls answers at once: do not turn that into a busy loop.
            time.sleep(max(0.0, 0.5 - (time.monotonic() - asked)))
        if check and current.status != "succeeded":
            raise JobFailedError(current)
        return current

    def cancel(self, job: Ref) -> JobPublic:
        response = self.transport.request("POST", f"/v1/jobs/{_id(job)}/cancel", idempotent=False)
        return JobPublic.model_validate(response.json())

    def logs(self, job: Ref, since: int = 0) -> list[LogLine]:
        response = self.transport.request("GET", f"/v1/jobs/{_id(job)}/logs", idempotent=True,
                                          params={"since": since})
        return [LogLine.model_validate_json(line) for line in response.text.splitlines() if line.strip()]

    def report(self, job: Ref) -> dict[str, Any]:
        """The job's report.json: metrics, effective config, library versions, host."""
        return self._get(f"/v1/jobs/{_id(job)}/report")

    def report_html(self, job: Ref) -> str:
        """The job's report.html: a self-contained page (inline SVG charts, no scripts) to save or open."""
        return self.transport.request("GET", f"/v1/jobs/{_id(job)}/report.html", idempotent=True).text

    # Downloads -----------------------------------------------------------------------------------------------

    def download(self, job: Ref, dest: str | os.PathLike[str] = ".", *, kind: str | None = "model",
                 on_bytes: Callable[[int, int], None] | None = None) -> list[Path]:
        """Download the artifacts of a succeeded job of `kind` (None: all of them) into folder `dest`.

        Resumable: bytes go to `<file>.part`; a download cut short (connection lost, process killed) continues
        from there with a Range request (If-Range: the artifact's ETag) on the next attempt or the next call, and
        every file is checked against its sha256 before it gets its name."""
        current = job if isinstance(job, JobPublic) and job.artifacts else self.job(job)
        chosen = [a for a in current.artifacts if kind is None or a.kind == kind]
        if not chosen:
            kinds = sorted({a.kind for a in current.artifacts}) or ["none"]
            raise ClientError(f"job {current.id} ({current.status}) has no {kind!r} artifact; it has: "
                              f"{', '.join(kinds)}")
        folder = Path(dest)
        folder.mkdir(parents=True, exist_ok=True)
        return [self.download_artifact(a, folder, on_bytes=on_bytes) for a in chosen]

    def download_artifact(self, artifact: ArtifactPublic, dest: str | os.PathLike[str] = ".", *,
                          on_bytes: Callable[[int, int], None] | None = None) -> Path:
        return download_artifact(self.transport, artifact, Path(dest), on_bytes=on_bytes)
