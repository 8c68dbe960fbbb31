"""Upload and submit helpers shared by the integration and e2e tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx

from tests.conftest import wait_for


def upload_model(client: httpx.Client, path: Path, name: str | None = None, *, wait: bool = True) -> dict:
    with open(path, "rb") as fh:
        response = client.post("/v1/models", files={"file": (path.name, fh)}, data={"name": name or path.stem})
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/models/{body['id']}"
    return wait_for(client, f"/v1/models/{body['id']}", until=("ready", "invalid")) if wait else body


def upload_dataset(client: httpx.Client, path: Path, name: str | None = None) -> dict:
    response = client.put("/v1/datasets/upload", params={"name": name or path.stem}, content=path.read_bytes())
    assert response.status_code == 201, response.text
    return wait_for(client, f"/v1/datasets/{response.json()['id']}", until=("ready", "invalid"))


def submit(client: httpx.Client, body: dict, **headers: str) -> httpx.Response:
    return client.post("/v1/jobs", json=body, headers=headers)


def download(client: httpx.Client, artifact: dict, dest: Path) -> Path:
    response = client.get(artifact["download_url"])
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == f'"{artifact["sha256"]}"'
    assert int(response.headers["content-length"]) == artifact["size_bytes"]
    dest.write_bytes(response.content)
    assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
    return dest


def digits_inputs(client: httpx.Client, model_path: Path, tmp: Path) -> dict[str, str]:
    """A digits ONNX model uploaded with 128 calibration digits and the labelled held-out set: the ids a job
    body takes (model_id, calibration_dataset_id, evaluation_dataset_id)."""
    from tests import models

    x_train, _, x_test, y_test = models.digits_data()
    model = upload_model(client, model_path)
    assert model["status"] == "ready", model["error"]
    return {"model_id": model["id"],
            "calibration_dataset_id": upload_dataset(client, models.save_npz(tmp / "cal.npz", x=x_train[:128]))["id"],
            "evaluation_dataset_id": upload_dataset(client, models.save_npz(tmp / "ev.npz", x=x_test,
                                                                            labels=y_test))["id"]}
