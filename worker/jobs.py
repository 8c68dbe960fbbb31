"""What each task does, between the database (lifecycle) and the engine (sandboxed child)."""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import update

from app.db import transaction
from app.models import Dataset, Model
from worker import lifecycle, sandbox
from worker.runtime import Runtime

log = logging.getLogger("quantserve.worker")


@contextmanager
def scratch_dir(rt: Runtime, name: str) -> Iterator[Path]:
    """A private folder per task, always removed: some libraries litter their working directory."""
    path = rt.settings.scratch_dir / f"{name}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _validate(rt: Runtime, row_type: type[Model] | type[Dataset], row_id: uuid.UUID, key: str,
              request: dict[str, Any], label: str) -> None:
    with scratch_dir(rt, f"validate-{row_id}") as work:
        request["path"] = str(rt.storage.fetch(key, work / "inputs" / "original"))
        try:
            result = sandbox.run(request, work, time_limit_s=600, memory_limit_mb=rt.settings.job_memory_limit_mb,
                                 max_file_bytes=rt.settings.engine_file_limit_bytes)
            values: dict[str, Any] = {"status": "ready", "error": None, **result}
        except sandbox.SandboxError as exc:
            values = {"status": "invalid", "error": {"code": exc.code, "message": str(exc), "reason": exc.reason}}
    with transaction(rt.session_factory) as session:
        # Conditional: a duplicate delivery, or a row deleted meanwhile, changes nothing.
        session.execute(update(row_type).where(row_type.id == row_id, row_type.status == "validating")
                        .values(**values))
    log.info("%s %s validated: %s", label, row_id, values["status"])


def validate_model(rt: Runtime, model_id: uuid.UUID) -> None:
    with rt.session_factory() as session:
        model = session.get(Model, model_id)
        if model is None or model.status != "validating":
            return
        key, request = model.storage_key, {"op": "inspect_model", "format": model.format}
    _validate(rt, Model, model_id, key, request, "model")


def validate_dataset(rt: Runtime, dataset_id: uuid.UUID) -> None:
    with rt.session_factory() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.status != "validating":
            return
        key = dataset.storage_key
        request = {"op": "inspect_dataset", "kind": dataset.kind, "max_bytes": rt.settings.max_dataset_bytes}
    _validate(rt, Dataset, dataset_id, key, request, "dataset")


class _Progress:
    """Turns the child's events into throttled progress writes and job log lines."""

    def __init__(self, rt: Runtime, claim: lifecycle.Claim) -> None:
        self.rt, self.claim = rt, claim
        self.stage, self.progress, self.written_at = "loading", 0.0, 0.0
        self.logs: list[tuple[str, str]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("event") == "progress":
            stage, progress = str(event["stage"]), max(float(event["progress"]), self.progress)
            changed = stage != self.stage
            self.stage, self.progress = stage, progress
            if changed or time.monotonic() - self.written_at > 0.5:
                self.flush()
        elif event.get("event") == "log":
            self.logs.append((str(event.get("level", "info")), str(event.get("message", ""))))
            if len(self.logs) >= 20:
                self.flush()

    def flush(self) -> None:
        lifecycle.report_progress(self.rt.session_factory, self.claim.job_id, self.claim.attempt, self.stage,
                                  self.progress, self.logs)
        self.logs, self.written_at = [], time.monotonic()


def run_job(rt: Runtime, job_id: uuid.UUID, worker: str) -> None:
    s = rt.settings
    claim = lifecycle.claim(rt.session_factory, job_id, worker, s.job_lease_s)
    if claim is None:  # gone, cancelled, or claimed by another delivery
        return
    progress = _Progress(rt, claim)
    with scratch_dir(rt, f"job-{job_id}") as work:
        # An S3 store: inputs are downloaded to scratch (a local store is read in place).
        inputs = work / "inputs"
        request = {"op": "quantize", "model_path": str(rt.storage.fetch(claim.model_key, inputs / "model")),
                   "format": claim.model_format, "method": claim.method, "config": claim.config,
                   "device": claim.device, "model_name": artifact_stem(claim.model_name), "work_dir": str(work / "out"),
                   "datasets": {role: str(rt.storage.fetch(key, inputs / role))
                                for role, key in claim.dataset_keys.items()}}
        started = time.monotonic()
        try:
            result = sandbox.run(
                request, work, on_event=progress, check_every_s=s.heartbeat_s,
                keep_going=lambda: lifecycle.heartbeat(rt.session_factory, claim.job_id, claim.attempt, s.job_lease_s),
                time_limit_s=s.job_time_limit_s, memory_limit_mb=s.job_memory_limit_mb,
                max_file_bytes=s.engine_file_limit_bytes)
        except sandbox.JobStoppedError:
            progress.flush()
            log.info("job %s attempt %d stopped: cancelled or superseded", job_id, claim.attempt)
            return
        except sandbox.SandboxError as exc:
            progress.flush()
            lifecycle.fail(rt.session_factory, job_id, claim.attempt, exc.code, str(exc), reason=exc.reason)
            return
        if result["metrics"].get("duration_s") is None:
            result["metrics"]["duration_s"] = round(time.monotonic() - started, 3)
        progress.stage, progress.progress = "packaging", max(progress.progress, 0.97)
        progress.flush()
        _store_results(rt, claim, result, work)


def _store_results(rt: Runtime, claim: lifecycle.Claim, result: dict[str, Any], work: Path) -> None:
    prefix = f"jobs/{claim.job_id}/attempt-{claim.attempt}"
    stored: list[lifecycle.StoredArtifact] = []
    report_path = work / "report.json"
    report = {"job_id": str(claim.job_id), "format": claim.model_format, "method": claim.method,
              "device": claim.device, "config": claim.config, "metrics": result["metrics"], **result["report"]}
    report_path.write_text(json.dumps(report, indent=2, default=str))
    files = [(a["kind"], Path(a["path"]), a["filename"], a.get("format")) for a in result["artifacts"]]
    files.append(("report", report_path, "report.json", None))
    if (page := _report_page(claim, report, files, work)) is not None:
        files.append(("report_html", page, "report.html", None))
    for kind, path, filename, fmt in files:
        key = f"{prefix}/{filename}"
        size, sha256 = rt.storage.put_file(path, key)
        stored.append(lifecycle.StoredArtifact(kind, filename, fmt, size, sha256, key))
    if not lifecycle.finish(rt.session_factory, claim, stored, result["metrics"], error=result.get("error")):
        rt.storage.delete_prefix(prefix)  # this attempt lost the job (cancelled or reaped): keep nothing


def _report_page(claim: lifecycle.Claim, report: dict[str, Any], files: list[tuple[str, Path, str, str | None]],
                 work: Path) -> Path | None:
    """report.html beside report.json. A page that cannot be drawn costs the job the page, not its result."""
    try:
        from worker.engine import report_html  # matplotlib loads on the first report, not at worker start

        artifacts = [{"kind": kind, "filename": filename, "format": fmt} for kind, _, filename, fmt in files]
        return report_html.write(report, work / "report.html", model_name=claim.model_name, job_name=claim.job_name,
                                 artifacts=artifacts)
    except Exception:  # any failure here must leave the artifacts and metrics intact
        log.exception("job %s: report.html could not be built; the job keeps report.json", claim.job_id)
        return None


def artifact_stem(name: str) -> str:
    stem = Path(name).name
    for suffix in (".onnx", ".pt2", ".pt", ".zip"):
        stem = stem.removesuffix(suffix)
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip(".-")
    # file names are capped in bytes (255 on Linux): 100 CJK characters are 300 UTF-8 bytes
    return cleaned.encode()[:100].decode(errors="ignore").rstrip(".-") or "model"
