"""/metrics under `quantserve api --workers 2`: every process answers the same sums, and the dashboard's
metrics all exist in a real scrape."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from sqlalchemy import create_engine, delete, select
from sqlalchemy.orm import Session

from app.models import ApiKey, Job
from app.services.keys import hash_key
from tests import models
from tests.conftest import ROOT, Service, free_port, stop, wait_http
from tests.integration.helpers import upload_model
from tests.unit.test_deploy import DASHBOARD, dashboard_metric_names

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})? (\S+)$", re.M)


def _scrape(base: str) -> dict[str, float]:
    response = httpx.get(base + "/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {name + (labels or ""): float(value) for name, labels, value in _SAMPLE.findall(response.text)}


@pytest.fixture(scope="module")
def two_process_api(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second API on the service's database, with two processes: its per-process counters are its own."""
    port, logs = free_port(), tmp_path_factory.mktemp("logs-metrics")
    api = subprocess.Popen([sys.executable, "-m", "app.cli", "api", "--port", str(port), "--workers", "2"],
                           env=service.env, cwd=ROOT, stdout=open(logs / "api.log", "ab"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/healthz", proc=api)
        yield base
    finally:
        stop(api)


def test_upload_bytes_are_summed_over_every_api_process(service: Service, two_process_api: str,
                                                        tmp_path: Path) -> None:
    path = models.export_onnx(models.wide_mlp(), torch.zeros(2, 1, 8, 8), tmp_path / "m.onnx")
    key = service.key("metrics")
    with httpx.Client(base_url=two_process_api, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        for _ in range(2):
            upload_model(client, path, wait=False)
    # Scrapes land on either process; each must report both uploads, whichever process took them.
    for _ in range(8):
        sample = _scrape(two_process_api)
        assert sample['quantserve_upload_bytes_total{kind="model"}'] == 2 * path.stat().st_size
        assert sample['quantserve_uploads_total{kind="model"}'] == 2


def test_job_families_come_from_the_database(service: Service, two_process_api: str) -> None:
    engine = create_engine(service.env["QUANTSERVE_DATABASE_URL"])
    method, code = f"probe{uuid.uuid4().hex[:8]}", f"probe_{uuid.uuid4().hex[:8]}"
    before = _scrape(two_process_api)
    with Session(engine) as session:
        tenant_id = session.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(service.key("metrics"))))
        rows = [Job(tenant_id=tenant_id, model_id=uuid.uuid4(), method=method, config={}, status="succeeded",
                    duration_s=d) for d in (3.0, 100.0)]
        rows.append(Job(tenant_id=tenant_id, model_id=uuid.uuid4(), method=method, config={}, status="failed",
                        duration_s=7200.5, error={"code": code, "message": "probe"}))
        rows.append(Job(tenant_id=tenant_id, model_id=uuid.uuid4(), method=method, config={}, status="queued",
                        device="cuda"))  # no gpu worker here: it stays queued while we look
        session.add_all(rows)
        session.commit()
    try:
        after = _scrape(two_process_api)
        ok = f'method="{method}",status="succeeded"'
        assert after[f'quantserve_job_duration_seconds_count{{{ok}}}'] == 2
        assert after[f'quantserve_job_duration_seconds_sum{{{ok}}}'] == 103.0
        assert after[f'quantserve_job_duration_seconds_bucket{{le="1.0",{ok}}}'] == 0
        assert after[f'quantserve_job_duration_seconds_bucket{{le="5.0",{ok}}}'] == 1
        assert after[f'quantserve_job_duration_seconds_bucket{{le="120.0",{ok}}}'] == 2
        failed = f'method="{method}",status="failed"'
        assert after[f'quantserve_job_duration_seconds_bucket{{le="7200.0",{failed}}}'] == 0
        assert after[f'quantserve_job_duration_seconds_bucket{{le="+Inf",{failed}}}'] == 1
        assert after[f'quantserve_job_failures_total{{code="{code}"}}'] == 1
        depth = 'quantserve_queue_depth{device="cuda"}'
        assert after[depth] == before[depth] + 1
        assert 'quantserve_queue_depth{device="cpu"}' in after  # present at 0 too: dashboard series never vanish
    finally:
        with Session(engine) as session:
            session.execute(delete(Job).where(Job.method == method))
            session.commit()
        engine.dispose()


def test_every_metric_the_dashboard_reads_is_in_a_real_scrape(two_process_api: str) -> None:
    scraped = {name.split("{")[0] for name in _scrape(two_process_api)}
    wanted = dashboard_metric_names(json.loads(DASHBOARD.read_text()))
    assert wanted - scraped == set(), f"the dashboard reads metrics /metrics does not serve: {wanted - scraped}"
