"""The S3 store on a real S3 server (SeaweedFS): multipart with a bounded buffer, no leftovers, ranges, outages."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from pathlib import Path

import httpx
import pytest

from app.errors import SizeLimitExceededError, StoreUnavailableError
from app.storage import pending_upload
from app.storage_s3 import PART_BYTES, S3Storage
from tests.conftest import Service, free_port
from tests.s3server import S3Server


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


@pytest.fixture
def store(s3_server: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> S3Storage:
    """A store in the module's bucket under a prefix of its own (a bucket per test would cost server volumes)."""
    for name, value in s3_server.env("unused").items():
        monkeypatch.setenv(name, value)
    return S3Storage(bucket, f"pre/{uuid.uuid4().hex[:8]}", spool_dir=tmp_path / "spool")


def _keys(s3_server: S3Server, store: S3Storage) -> list[str]:
    return [k.removeprefix(store.prefix + "/") for k in s3_server.keys(store.bucket, store.prefix + "/")]


def _feed(pending, data: bytes, chunk: int = 64 * 1024) -> int:
    """Write like the upload route does (write, then drain); return the largest buffer seen."""
    most = 0
    for i in range(0, len(data), chunk):
        pending.write(data[i:i + chunk])
        most = max(most, len(pending._buffer))
        asyncio.run(pending.drain())
    return most


def test_a_multipart_upload_streams_through_a_bounded_buffer(store: S3Storage, s3_server: S3Server) -> None:
    data = os.urandom(2 * PART_BYTES + 12345)  # three parts, the last one short
    with pending_upload(store, limit=None, key="models/a/original") as pending:
        most = _feed(pending, data)
        store.commit(pending, "models/a/original")
    assert most <= PART_BYTES + 64 * 1024, "the buffer grew past one part: memory would grow with the file"
    assert pending.sha256 == hashlib.sha256(data).hexdigest() and pending.size == len(data)
    assert _keys(s3_server, store) == ["models/a/original"]
    assert not pending.path.exists(), "the local copy used for format detection was left behind"
    with store.open("models/a/original") as fh:
        assert fh.read() == data
    with store.open_range("models/a/original", PART_BYTES - 5, 10) as fh:
        assert fh.read() == data[PART_BYTES - 5:PART_BYTES + 5]


def test_an_upload_over_the_limit_is_aborted_and_leaves_no_object_or_part(store: S3Storage,
                                                                         s3_server: S3Server) -> None:
    with pytest.raises(SizeLimitExceededError), pending_upload(store, limit=PART_BYTES * 2,
                                                               key="models/b/original") as pending:
        _feed(pending, os.urandom(PART_BYTES * 2 + 1))
    assert pending._parts, "no part had been sent: this test would not show that parts are aborted"
    assert _keys(s3_server, store) == [] and s3_server.open_uploads(store.bucket, store.prefix + "/") == []
    assert list(store.spool_dir.iterdir()) == []


def test_commit_under_another_key_moves_the_object(store: S3Storage, s3_server: S3Server) -> None:
    with pending_upload(store, limit=None) as pending:
        pending.write(b"small")
        store.commit(pending, "datasets/x/original")
    assert _keys(s3_server, store) == ["datasets/x/original"]


def test_put_fetch_presign_and_delete_prefix(store: S3Storage, s3_server: S3Server, tmp_path: Path) -> None:
    source = tmp_path / "artifact.bin"
    source.write_bytes(os.urandom(PART_BYTES + 100))
    assert store.put_file(source, "jobs/j/attempt-1/m.onnx") == (source.stat().st_size,
                                                                   hashlib.sha256(source.read_bytes()).hexdigest())
    store.put_file(source, "jobs/j/attempt-1/report.json")
    fetched = store.fetch("jobs/j/attempt-1/m.onnx", tmp_path / "scratch" / "model")
    assert fetched.read_bytes() == source.read_bytes()
    url = store.presign("jobs/j/attempt-1/m.onnx", disposition='attachment; filename="m.onnx"')
    response = httpx.get(url, headers={"Range": "bytes=0-9"})
    assert response.status_code == 206 and response.content == source.read_bytes()[:10]
    assert response.headers["content-disposition"] == 'attachment; filename="m.onnx"'
    store.delete_prefix("jobs/j/attempt-1")
    assert _keys(s3_server, store) == []
    with pytest.raises(FileNotFoundError):
        store.open("jobs/j/attempt-1/m.onnx")


def test_outages_and_bad_settings_are_503_with_an_actionable_message(s3_server: S3Server, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_server.env("unused").items():
        monkeypatch.setenv(name, value)
    missing = S3Storage(f"qs-missing-{uuid.uuid4().hex[:8]}", "", spool_dir=tmp_path)
    with pytest.raises(StoreUnavailableError, match="does not exist.*QUANTSERVE_STORAGE_URL"):
        missing.check()
    assert missing.ensure_bucket() is True and missing.ensure_bucket() is False
    missing.check()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StoreUnavailableError, match="AWS_SECRET_ACCESS_KEY"):
        S3Storage(missing.bucket, "", spool_dir=tmp_path).check()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(StoreUnavailableError, match="unreachable") as caught:
        S3Storage(missing.bucket, "", spool_dir=tmp_path).open("anything")
    assert caught.value.headers["Retry-After"]


# ---- the service on S3 -------------------------------------------------------------------------------------


def test_uploads_and_artifacts_live_in_the_bucket_and_nowhere_else(s3_service: Service, tmp_path: Path) -> None:
    import torch

    from tests import models
    from tests.conftest import wait_for
    from tests.integration.helpers import download, submit, upload_model

    client = s3_service.client()
    path = models.export_onnx(models.train_digits_mlp(), torch.zeros(2, 1, 8, 8), tmp_path / "d.onnx")
    model = upload_model(client, path)
    assert model["status"] == "ready", model
    job = submit(client, {"model_id": model["id"], "method": "dynamic"}).json()
    job = wait_for(client, f"/v1/jobs/{job['id']}", until=("succeeded", "failed"))
    assert job["status"] == "succeeded", job
    keys = s3_service.s3_server.keys(s3_service.s3_bucket)
    assert f"qs/models/{model['id']}/original" in keys
    for artifact in job["artifacts"]:
        download(client, artifact, tmp_path / artifact["filename"])
    assert not [p for p in (s3_service.data_dir / "store").rglob("*") if p.is_file()], "the API wrote a local store"
    assert not [p for p in (s3_service.data_dir / "spool").rglob("*") if p.is_file()], "a spooled copy was left"

    artifact = next(a for a in job["artifacts"] if a["kind"] == "model")
    url, size = artifact["download_url"], artifact["size_bytes"]
    tail = client.get(url, headers={"Range": "bytes=100-"})  # ranged GET through the API, from the store
    assert tail.status_code == 206 and tail.headers["content-range"] == f"bytes 100-{size - 1}/{size}"
    assert tail.content == (tmp_path / artifact["filename"]).read_bytes()[100:]
    assert client.get(url, headers={"Range": f"bytes={size}-"}).status_code == 416
    redirected = client.get(artifact["download_url"], params={"redirect": 1})
    assert redirected.status_code == 307 and redirected.headers["cache-control"] == "no-store"
    ranged = httpx.get(redirected.headers["location"], headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.content == (tmp_path / artifact["filename"]).read_bytes()[10:20]

    assert client.delete(f"/v1/models/{model['id']}").status_code == 204  # its job has finished
    assert f"qs/models/{model['id']}/original" not in s3_service.s3_server.keys(s3_service.s3_bucket)


def test_an_oversize_upload_leaves_no_object_and_no_open_multipart_upload(s3_service: Service) -> None:
    client = s3_service.client()
    before = s3_service.s3_server.keys(s3_service.s3_bucket)

    def chunks():  # no Content-Length: the limit (64 MiB in tests) must hold mid-stream, after parts were sent
        for _ in range(70):
            yield b"\0" * (1024 * 1024)

    response = client.put("/v1/models/upload", content=chunks())
    assert response.status_code == 413 and response.json()["code"] == "too_large"
    assert s3_service.s3_server.keys(s3_service.s3_bucket) == before
    assert s3_service.s3_server.open_uploads(s3_service.s3_bucket) == []


def test_an_unreachable_store_is_503_with_retry_after_then_recovers(s3_service: Service) -> None:
    client = s3_service.client()
    proxy = s3_service.s3_proxy
    proxy.stop()
    try:
        response = client.put("/v1/datasets/upload", content=b'{"text": "hello"}\n')
        assert response.status_code == 503, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert int(response.headers["retry-after"]) > 0 and "unreachable" in response.json()["detail"]
        ready = httpx.get(s3_service.base_url + "/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["storage"].startswith("unavailable")
    finally:
        proxy.start()
    response = client.put("/v1/datasets/upload", content=b'{"text": "hello"}\n')
    assert response.status_code == 201, response.text
    assert httpx.get(s3_service.base_url + "/readyz").json()["checks"]["storage"] == "ok"


def test_a_validation_that_finds_the_store_down_is_retried_not_lost(s3_service: Service) -> None:
    import signal
    import time

    from tests.conftest import wait_for

    client, proxy = s3_service.client(), s3_service.s3_proxy
    os.kill(s3_service.worker.pid, signal.SIGSTOP)  # the upload lands, then the worker finds the store down
    try:
        response = client.put("/v1/datasets/upload", params={"name": "retried"}, content=b'{"text": "hi"}\n')
        assert response.status_code == 201, response.text
        proxy.stop()
    finally:
        os.kill(s3_service.worker.pid, signal.SIGCONT)
    log = next(s3_service.logs.glob("s3worker-*.log"))
    deadline = time.monotonic() + 30
    while "StoreUnavailableError" not in log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.3)
    proxy.start()
    assert "StoreUnavailableError" in log.read_text(errors="replace"), "the worker never met the outage"
    dataset = wait_for(client, f"/v1/datasets/{response.json()['id']}", until=("ready", "invalid"), timeout=90)
    assert dataset["status"] == "ready", dataset
