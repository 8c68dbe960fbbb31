"""The REST contract on PostgreSQL + Redis + a real worker: errors, limits, idempotency, ranges, cancel."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests import models
from tests.conftest import Service, wait_for
from tests.integration.helpers import submit, upload_dataset, upload_model


@pytest.fixture(scope="module")
def ready(service: Service, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One ready ONNX model, a matching and a mismatching dataset, and one succeeded job, for tenant acme."""
    tmp = tmp_path_factory.mktemp("api")
    _, _, x_test, y_test = models.digits_data()
    onnx_path = models.export_onnx(models.train_digits_mlp(), torch.from_numpy(x_test[:2]), tmp / "mlp.onnx")
    client = service.client("acme")
    model = upload_model(client, onnx_path)
    good = upload_dataset(client, models.save_npz(tmp / "good.npz", x=x_test[:50], labels=y_test[:50]))
    bad = upload_dataset(client, models.save_npz(tmp / "bad.npz", x=x_test[:50].reshape(50, 64).astype("int64")))
    job = submit(client, {"model_id": model["id"], "method": "dynamic"}).json()
    job = wait_for(client, f"/v1/jobs/{job['id']}", until=("succeeded", "failed"))
    assert job["status"] == "succeeded", job
    return {"model": model, "good": good, "bad": bad, "job": job, "onnx_path": onnx_path}


def _problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["code"] == code and body["detail"] and body["type"]
    return body


def _raw_put_status(service: Service, declared_length: int) -> int:
    """Declare a huge Content-Length and send only a few bytes (an HTTP client would refuse to)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(service.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(f"PUT /v1/models/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {service.key('acme')}\r\n"
                     f"Content-Length: {declared_length}\r\n\r\n".encode() + b"\x08\x07")
        return int(sock.recv(4096).split(b" ", 2)[1])


def _store_files(service: Service) -> set[Path]:
    return {p for p in (service.data_dir / "store").rglob("*") if p.is_file()}


def test_missing_or_unknown_key_is_401_with_challenge(service: Service) -> None:
    body = _problem(httpx.get(service.base_url + "/v1/models"), 401, "unauthorized")
    assert "Bearer" in body["detail"]
    response = httpx.get(service.base_url + "/v1/models", headers={"Authorization": "Bearer qs_nope"})
    _problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


def test_oversize_upload_is_413_and_leaves_nothing(service: Service, ready: dict) -> None:
    client = service.client()
    before_files, before_models = _store_files(service), client.get("/v1/models").json()["items"]
    limit = 64 * 1024 * 1024

    def chunks():  # no Content-Length: the limit must hold mid-stream
        for _ in range(70):
            yield b"\0" * (1024 * 1024)

    _problem(client.put("/v1/models/upload", content=chunks()), 413, "too_large")
    assert _raw_put_status(service, limit + 1) == 413  # refused from the header, before any byte is read
    big = Path(ready["onnx_path"]).parent / "big.bin"
    with open(big, "wb") as fh:
        fh.truncate(limit + 1024)
    with open(big, "rb") as fh:
        _problem(client.post("/v1/models", files={"file": ("big.onnx", fh)}), 413, "too_large")
    assert _store_files(service) == before_files
    assert client.get("/v1/models").json()["items"] == before_models


def test_unknown_bytes_are_415(service: Service, tmp_path: Path) -> None:
    client = service.client()
    body = _problem(client.put("/v1/models/upload", content=os.urandom(4096)), 415, "unsupported_format")
    assert "onnx" in body["detail"].lower()
    import pickle

    _problem(client.put("/v1/models/upload", content=pickle.dumps({"a": 1})), 415, "unsupported_format")
    torch.save({"w": torch.zeros(3)}, tmp_path / "weights.pt")
    _problem(client.put("/v1/models/upload", content=(tmp_path / "weights.pt").read_bytes()), 415,
             "unsupported_format")


@pytest.mark.parametrize("change,status,code,loc", [
    ({"method": "magic"}, 422, "unsupported_method", ["body", "method"]),
    ({"method": "qat"}, 422, "unsupported_method", ["body", "method"]),
    ({"method": "static"}, 422, "validation_error", ["body", "calibration_dataset_id"]),
    ({"config": {"granularity": "per_banana"}}, 422, "validation_error", ["body", "config", "granularity"]),
    ({"config": {"bogus": 1}}, 422, "validation_error", ["body", "config", "bogus"]),
    ({"config": {"exclude": ["("]}}, 422, "validation_error", ["body", "config", "exclude"]),
    ({"device": "cuda"}, 422, "unsupported_method", ["body", "device"]),
    ({"device": "tpu"}, 422, "validation_error", ["body", "device"]),
    ({"evaluation_dataset_id": "00000000-0000-7000-8000-000000000000"}, 422, "validation_error",
     ["body", "evaluation_dataset_id"]),
    ({"evaluation_dataset_id": "BAD"}, 422, "dataset_mismatch", ["body", "evaluation_dataset_id"]),
    ({"model_id": "00000000-0000-7000-8000-000000000000"}, 404, "not_found", None),
    ({"unknown_field": 1}, 422, "validation_error", ["body", "unknown_field"]),
])
def test_checks_before_queueing_name_the_field(service: Service, ready: dict, change: dict, status: int, code: str,
                                               loc: list | None) -> None:
    body = {"model_id": ready["model"]["id"], "method": "dynamic", **change}
    if body.get("evaluation_dataset_id") == "BAD":
        body["evaluation_dataset_id"] = ready["bad"]["id"]
    problem = _problem(submit(service.client(), body), status, code)
    if loc:
        assert loc in [e["loc"][: len(loc)] for e in problem["errors"]], problem
    if code == "unsupported_method" and change.get("method"):
        assert "onnx/dynamic" in problem["detail"]


def test_model_not_ready_is_422(service: Service, tmp_path: Path) -> None:
    client = service.client()
    import onnx
    from onnx import TensorProto, helper

    # Well-formed protobuf (so the upload is accepted) whose graph reads a tensor nobody defines.
    graph = helper.make_graph([helper.make_node("Add", ["x", "ghost"], ["y"])], "broken",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    broken = tmp_path / "broken.onnx"
    onnx.save(helper.make_model(graph), broken)
    model = upload_model(client, broken)
    assert model["status"] == "invalid" and model["error"]["message"]
    _problem(submit(client, {"model_id": model["id"], "method": "dynamic"}), 422, "model_not_ready")


def test_malformed_json_is_400(service: Service) -> None:
    response = service.client().post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    _problem(response, 400, "bad_request")


def test_idempotency_key_replays_or_conflicts(service: Service, ready: dict) -> None:
    client = service.client()
    body = {"model_id": ready["model"]["id"], "method": "dynamic", "name": "idem"}
    key = f"build-{time.time_ns()}"
    first = submit(client, body, **{"Idempotency-Key": key})
    assert first.status_code == 202
    again = submit(client, body, **{"Idempotency-Key": key})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    _problem(submit(client, {**body, "name": "other"}, **{"Idempotency-Key": key}), 409, "conflict")
    # Keys are per tenant: another tenant's identical key is independent.
    other = service.client("globex")
    assert submit(other, body, **{"Idempotency-Key": key}).status_code in (404, 422)
    jobs = [j for j in client.get("/v1/jobs", params={"limit": 200}).json()["items"] if j["name"] == "idem"]
    assert len(jobs) == 1
    wait_for(client, f"/v1/jobs/{first.json()['id']}", until=("succeeded", "failed"))


def test_download_resumes_with_range(service: Service, ready: dict) -> None:
    client = service.client()
    artifact = next(a for a in ready["job"]["artifacts"] if a["kind"] == "model")
    url, size = artifact["download_url"], artifact["size_bytes"]
    head = client.get(url, headers={"Range": "bytes=0-999"})
    assert head.status_code == 206 and head.headers["content-range"] == f"bytes 0-999/{size}"
    assert len(head.content) == 1000
    tail = client.get(url, headers={"Range": "bytes=1000-"})
    assert tail.status_code == 206 and int(tail.headers["content-length"]) == size - 1000
    assert hashlib.sha256(head.content + tail.content).hexdigest() == artifact["sha256"]
    _problem(client.get(url, headers={"Range": f"bytes={size}-"}), 416, "range_not_satisfiable")
    assert client.get(url, headers={"If-None-Match": f'"{artifact["sha256"]}"'}).status_code == 304
    full = client.get(url)
    assert full.headers["accept-ranges"] == "bytes" and 'filename="' in full.headers["content-disposition"]


def test_cancel_a_queued_job(service: Service, ready: dict) -> None:
    client = service.client()
    os.kill(service.worker.pid, signal.SIGSTOP)  # nothing is consumed while the worker is frozen
    try:
        job = submit(client, {"model_id": ready["model"]["id"], "method": "dynamic"}).json()
        assert job["status"] == "queued"
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    finally:
        os.kill(service.worker.pid, signal.SIGCONT)
    time.sleep(3)  # the worker now receives the message and must find nothing to claim
    final = client.get(f"/v1/jobs/{job['id']}").json()
    assert final["status"] == "cancelled" and final["attempts"] == 0 and final["artifacts"] == []
    _problem(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "conflict")


def test_cancel_a_running_job_stops_its_engine_process(service: Service, tmp_path: Path) -> None:
    client = service.client()
    torch.manual_seed(0)
    big = torch.nn.Sequential(*[torch.nn.Linear(1536, 1536) for _ in range(6)]).eval()
    path = models.export_onnx(big, torch.zeros(2, 1536), tmp_path / "big.onnx", dynamo=False)
    model = upload_model(client, path)
    job = submit(client, {"model_id": model["id"], "method": "dynamic"}).json()
    running = wait_for(client, f"/v1/jobs/{job['id']}", until=("running", "succeeded", "failed"), timeout=60)
    assert running["status"] == "running", "the job finished before it could be cancelled"
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _engine_running(job["id"]):
        time.sleep(0.2)
    assert not _engine_running(job["id"]), "the engine child process is still running after cancel"
    time.sleep(1)
    final = client.get(f"/v1/jobs/{job['id']}").json()
    assert final["status"] == "cancelled" and final["artifacts"] == []


def _engine_running(job_id: str) -> bool:
    return subprocess.run(["pgrep", "-f", f"job-{job_id}"], capture_output=True).returncode == 0


def test_lists_are_paginated_newest_first(service: Service, ready: dict) -> None:
    client = service.client()
    first = client.get("/v1/jobs", params={"limit": 1}).json()
    assert len(first["items"]) == 1 and first["next_cursor"]
    second = client.get("/v1/jobs", params={"limit": 1, "cursor": first["next_cursor"]}).json()
    assert second["items"][0]["id"] < first["items"][0]["id"]
    _problem(client.get("/v1/jobs", params={"cursor": "garbage"}), 400, "bad_request")


def test_delete_model_in_use_is_409_then_204(service: Service, tmp_path: Path) -> None:
    client = service.client()
    path = models.export_onnx(models.train_digits_mlp(), torch.zeros(2, 1, 8, 8), tmp_path / "d.onnx")
    model = upload_model(client, path)
    os.kill(service.worker.pid, signal.SIGSTOP)
    try:
        job = submit(client, {"model_id": model["id"], "method": "dynamic"}).json()
        _problem(client.delete(f"/v1/models/{model['id']}"), 409, "conflict")
        client.post(f"/v1/jobs/{job['id']}/cancel")
    finally:
        os.kill(service.worker.pid, signal.SIGCONT)
    assert client.delete(f"/v1/models/{model['id']}").status_code == 204
    _problem(client.get(f"/v1/models/{model['id']}"), 404, "not_found")


def test_fifty_concurrent_posts_with_one_idempotency_key_make_one_job(service: Service, ready: dict) -> None:
    from concurrent.futures import ThreadPoolExecutor

    key = f"race-{time.time_ns()}"
    body = {"model_id": ready["model"]["id"], "method": "dynamic", "name": key}

    def post(_: int) -> tuple[int, str]:
        with service.client() as client:
            response = submit(client, body, **{"Idempotency-Key": key})
            return response.status_code, response.json().get("id", response.text)

    with ThreadPoolExecutor(max_workers=25) as pool:
        results = list(pool.map(post, range(50)))
    assert {status for status, _ in results} <= {200, 202}, results
    assert sum(status == 202 for status, _ in results) == 1
    assert len({job_id for _, job_id in results}) == 1
    client = service.client()
    jobs = [j for j in client.get("/v1/jobs", params={"limit": 200}).json()["items"] if j["name"] == key]
    assert len(jobs) == 1
    wait_for(client, f"/v1/jobs/{jobs[0]['id']}", until=("succeeded", "failed"))


def test_oversize_json_body_is_413(service: Service, ready: dict) -> None:
    huge = {"model_id": ready["model"]["id"], "method": "dynamic", "labels": {"pad": "x" * (2 * 1024 * 1024)}}
    client = service.client()
    _problem(submit(client, huge), 413, "too_large")  # declared Content-Length
    import json

    payload = json.dumps(huge).encode()
    chunked = client.post("/v1/jobs", content=(payload[i:i + 65536] for i in range(0, len(payload), 65536)),
                          headers={"content-type": "application/json"})
    _problem(chunked, 413, "too_large")


def test_torchscript_without_any_dataset_is_422_naming_evaluation_dataset(service: Service, tmp_path: Path) -> None:
    client = service.client()
    path = models.save_torchscript(models.train_digits_mlp(), torch.zeros(2, 1, 8, 8), tmp_path / "m.pt")
    model = upload_model(client, path)
    assert model["status"] == "ready" and model["format"] == "torchscript"
    problem = _problem(submit(client, {"model_id": model["id"], "method": "dynamic"}), 422, "validation_error")
    assert ["body", "evaluation_dataset_id"] in [e["loc"] for e in problem["errors"]]
