"""Two workers with separate data dirs, sharing only PostgreSQL, Redis and S3, both complete jobs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, select

from app.models import Job
from tests import models
from tests.conftest import REDIS_URL, Service, fresh_pg_database, service_env, start_api, start_worker, stop, wait_for
from tests.integration.helpers import download, submit, upload_dataset, upload_model
from tests.s3server import S3Server


@pytest.fixture(scope="module")
def two_workers(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    import redis

    db_index = 13
    redis.Redis.from_url(f"{REDIS_URL}/{db_index}").flushdb()
    bucket = s3_server.new_bucket()
    with fresh_pg_database() as database_url:
        logs = tmp_path_factory.mktemp("logs-two")
        base_env = {**service_env(database_url, f"{REDIS_URL}/{db_index}", tmp_path_factory.mktemp("api")),
                    **s3_server.env(bucket), "QUANTSERVE_WORKER_CONCURRENCY": "1"}
        # One task at a time each, so that neither worker can take every job while the other idles.
        dirs = [tmp_path_factory.mktemp(f"worker{i}") for i in (1, 2)]
        workers = [start_worker({**base_env, "QUANTSERVE_DATA_DIR": str(d)}, logs, f"w{i}")
                   for i, d in enumerate(dirs, 1)]
        api, base = start_api(base_env, logs)
        svc = Service(base, base_env, Path(base_env["QUANTSERVE_DATA_DIR"]), api, workers[0], logs)
        svc.worker_dirs, svc.s3_bucket = dirs, bucket  # type: ignore[attr-defined]
        try:
            yield svc
        finally:
            stop(api)
            for worker in workers:
                stop(worker)


def _wait_live_workers(client, n: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cpu = [d for d in client.get("/v1/capabilities").json()["live_devices"] if d["device"] == "cpu"]
        if cpu and cpu[0]["workers"] >= n:
            return
        time.sleep(0.5)
    raise AssertionError(f"fewer than {n} live workers after {timeout} s")


def _run_jobs(svc: Service, tmp_path: Path, n_jobs: int) -> None:
    client = svc.client()
    _wait_live_workers(client, 2)
    _, _, x_test, y_test = models.digits_data()
    path = models.export_onnx(models.train_digits_mlp(), torch.from_numpy(x_test[:2]), tmp_path / "mlp.onnx")
    model = upload_model(client, path)
    assert model["status"] == "ready", model
    dataset = upload_dataset(client, models.save_npz(tmp_path / "eval.npz", x=x_test[:64], labels=y_test[:64]))
    assert dataset["status"] == "ready", dataset
    ids = [submit(client, {"model_id": model["id"], "method": "dynamic", "evaluation_dataset_id": dataset["id"],
                           "name": f"two-{i}"}).json()["id"] for i in range(n_jobs)]
    jobs = [wait_for(client, f"/v1/jobs/{i}", until=("succeeded", "failed"), timeout=300) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * n_jobs, [j["error"] for j in jobs]
    for job in jobs:
        for artifact in job["artifacts"]:
            download(client, artifact, tmp_path / f"{job['id']}-{artifact['filename']}")
    engine = create_engine(svc.env["QUANTSERVE_DATABASE_URL"])
    with engine.connect() as conn:
        ran_on = {row[0].split("@")[0] for row in conn.execute(select(Job.worker).where(Job.id.in_(ids)))}
    engine.dispose()
    assert ran_on == {"w1", "w2"}, f"jobs ran only on {ran_on}: the second worker took none"
    for d in svc.worker_dirs:  # each worker read inputs from S3 into its own scratch, and kept nothing
        assert not [p for p in (d / "store").rglob("*") if p.is_file()]


def test_two_workers_on_separate_dirs_share_the_jobs(two_workers: Service, tmp_path: Path) -> None:
    _run_jobs(two_workers, tmp_path, 4)


@pytest.mark.slow
def test_two_workers_complete_ten_jobs_with_every_artifact_downloadable(two_workers: Service,
                                                                        tmp_path: Path) -> None:
    _run_jobs(two_workers, tmp_path, 10)
