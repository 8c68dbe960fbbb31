"""Tenant isolation, walked over the app's own route list: a new route without the check fails here."""

from __future__ import annotations

import re

import pytest
import torch
from fastapi.routing import APIRoute

from app.main import ROUTERS, create_app
from tests import models
from tests.conftest import Service, wait_for
from tests.integration.helpers import submit, upload_dataset, upload_model

PUBLIC = {"/healthz", "/readyz", "/metrics"}


def _v1_routes() -> list[tuple[str, str]]:
    routes = [(m, r.path) for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)
              for m in sorted(r.methods) if r.path.startswith("/v1")]
    assert routes, "no /v1 routes found"
    return routes


def test_the_walk_sees_every_route_the_app_serves() -> None:
    served = {(m.upper(), path) for path, ops in create_app().openapi()["paths"].items() for m in ops
              if path.startswith("/v1")}
    assert served == set(_v1_routes())


@pytest.fixture(scope="module")
def owned(service: Service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One of each resource, owned by tenant 'initech'."""
    tmp = tmp_path_factory.mktemp("tenants")
    _, _, x_test, _ = models.digits_data()
    client = service.client("initech")
    model = upload_model(client, models.export_onnx(models.train_digits_mlp(), torch.from_numpy(x_test[:2]),
                                                    tmp / "t.onnx"))
    dataset = upload_dataset(client, models.save_npz(tmp / "t.npz", x=x_test[:20]))
    job = wait_for(client, "/v1/jobs/" + submit(client, {"model_id": model["id"], "method": "dynamic"}).json()["id"],
                   until=("succeeded", "failed"))
    assert job["status"] == "succeeded"
    return {"model_id": model["id"], "dataset_id": dataset["id"], "job_id": job["id"],
            "artifact_id": job["artifacts"][0]["id"]}


@pytest.mark.parametrize("method,path", _v1_routes())
def test_every_v1_route_needs_a_key(service: Service, method: str, path: str) -> None:
    url = re.sub(r"\{[^}]+\}", "00000000-0000-7000-8000-000000000000", path)
    import httpx

    response = httpx.request(method, service.base_url + url, timeout=30)
    assert response.status_code == 401, f"{method} {path} answered {response.status_code} without a key"


@pytest.mark.parametrize("method,path", [r for r in _v1_routes() if "{" in r[1]])
def test_another_tenants_resource_is_404(service: Service, owned: dict[str, str], method: str, path: str) -> None:
    params = re.findall(r"\{([^}]+)\}", path)
    missing = [p for p in params if p not in owned]
    assert not missing, f"the tenant walk does not know how to fill {missing} in {path}: add it to `owned`"
    url = path.format(**owned)
    intruder = service.client("umbrella")
    response = intruder.request(method, url, json={} if method in ("POST", "PUT") else None)
    assert response.status_code == 404, f"{method} {path} gave {response.status_code} to another tenant"
    assert response.json()["code"] == "not_found"
    # ... and had no side effect: the owner still sees the resource unchanged.
    owner = service.client("initech")
    for name, value in owned.items():
        kind = name.removesuffix("_id") + "s"
        assert owner.get(f"/v1/{kind}/{value}").status_code == 200
    assert owner.get(f"/v1/jobs/{owned['job_id']}").json()["status"] == "succeeded"


@pytest.mark.parametrize("path", ["/v1/models", "/v1/datasets", "/v1/jobs"])
def test_lists_show_only_the_callers_rows(service: Service, owned: dict[str, str], path: str) -> None:
    ids = {item["id"] for item in service.client("umbrella").get(path, params={"limit": 200}).json()["items"]}
    assert not ids & set(owned.values())
    mine = {item["id"] for item in service.client("initech").get(path, params={"limit": 200}).json()["items"]}
    assert mine & set(owned.values())
