"""report.html end to end: the worker builds it for a real job, the API serves it with a no-script policy, and
headless Chromium renders it from the server, charts and all, for a model whose name is hostile."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import httpx
import pytest
import torch

from quantserve_client import ApiError, Client
from quantserve_client.schemas import JobPublic
from tests import models
from tests.browser import Browser
from tests.conftest import Service

HOSTILE_NAME = '<script>alert("name")</script><b>mlp</b> $x$ & "quoted"'


@pytest.fixture(scope="module")
def qs(service: Service) -> Client:
    return Client(service.base_url, service.key("report-tenant"))


@pytest.fixture(scope="module")
def job(qs: Client, tmp_path_factory: pytest.TempPathFactory) -> JobPublic:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).eval()
    path = models.export_onnx(net, torch.zeros(1, 64), tmp_path_factory.mktemp("page") / "mlp.onnx", dynamo=False)
    model = qs.upload_model(path, name=HOSTILE_NAME)
    return qs.wait(qs.submit(model, "dynamic", name=f"nightly {HOSTILE_NAME}"), timeout_s=180)


def test_a_succeeded_job_lists_its_page_and_serves_it_with_a_no_script_policy(qs: Client, job: JobPublic,
                                                                            service: Service) -> None:
    (page,) = [a for a in job.artifacts if a.kind == "report_html"]
    assert page.filename == "report.html" and page.size_bytes > 5_000
    assert [a.kind for a in job.artifacts][0] == "model"  # the walk-throughs take artifacts[0] as the model
    response = qs.http.get(f"/v1/jobs/{job.id}/report.html")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src" not in response.headers["content-security-policy"]
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["etag"] == f'"{page.sha256}"'
    assert qs.http.get(f"/v1/jobs/{job.id}/report.html", headers={"If-None-Match": response.headers["etag"]}
                       ).status_code == 304
    html = qs.report_html(job)
    assert html == response.text and str(job.id) in html
    assert "&lt;script&gt;alert(&quot;name&quot;)&lt;/script&gt;" in html and "<script" not in html
    with httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {service.key('other')}"}) as other:
        denied = other.get(f"/v1/jobs/{job.id}/report.html")
    assert denied.status_code == 404 and denied.headers["content-type"] == "application/problem+json"


def test_a_missing_job_or_page_is_problem_json(qs: Client) -> None:
    with pytest.raises(ApiError) as missing:
        qs.report_html(uuid.uuid4())
    assert (missing.value.status, missing.value.code) == (404, "not_found")


def test_the_served_page_renders_in_chromium_with_its_charts_and_no_console_errors(
        qs: Client, job: JobPublic, service: Service) -> None:
    with Browser() as browser:
        document = browser.open(f"{service.base_url}/v1/jobs/{job.id}/report.html",
                                headers={"Authorization": f"Bearer {service.key('report-tenant')}"})
        assert document.get("status") == 200, document
        assert browser.console_errors() == []
        assert browser.evaluate("document.getElementById('title').textContent") == f"{HOSTILE_NAME}: onnx dynamic"
        assert browser.evaluate("document.scripts.length") == 0
        charts = browser.evaluate("[...document.images].map(i => [i.id, i.complete, i.naturalWidth])")
        assert [c[0] for c in charts] == ["chart-comparison", "chart-layers"], charts
        assert all(done and width > 300 for _, done, width in charts), charts
        rows = browser.evaluate("document.querySelectorAll('#layers tr').length")
        assert rows == 1 + len(job.metrics["layers"])
        assert "InferenceSession" in browser.evaluate("document.querySelector('pre.loader').textContent")
        shot = browser.screenshot(Path(tempfile.gettempdir()) / "quantserve-report.png")
    print(f"report.html screenshot: {shot}")
    assert shot.stat().st_size > 20_000
