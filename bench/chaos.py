"""Chaos run (not a test): submit N jobs, SIGKILL workers at random moments, restart Redis once, then count
what became of every job. Target: 0 lost, 0 stuck, 0 duplicated.

    .venv/bin/python bench/chaos.py --jobs 30 --minutes 6

Uses the machine's PostgreSQL (a fresh database, dropped afterwards) and its own redis-server on a free port.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import models  # noqa: E402
from tests.conftest import Service, free_port, fresh_pg_database, service_env, start_api, start_worker, stop  # noqa: E402

TERMINAL = {"succeeded", "failed", "cancelled"}


def _redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc


def _upload(client: httpx.Client, path: Path) -> str:
    model_id = client.put("/v1/models/upload", params={"name": path.name}, content=path.read_bytes()).json()["id"]
    while client.get(f"/v1/models/{model_id}").json()["status"] == "validating":
        time.sleep(0.3)
    return model_id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=6.0, help="give up waiting after this long")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="quantserve-chaos-"))
    redis_port = free_port()
    broker = _redis(redis_port)
    with fresh_pg_database() as db:
        env = service_env(db, f"redis://127.0.0.1:{redis_port}/0", tmp / "data", job_lease_s="4",
                          redispatch_after_s="10", sweep_interval_s="1", job_max_attempts="4")
        logs = tmp / "logs"
        workers = [start_worker(env, logs, f"chaos-{i}") for i in range(args.workers)]
        api, base = start_api(env, logs)
        svc = Service(base, env, tmp / "data", api, workers[0], logs)
        client = svc.client("chaos")
        _, _, x, _ = models.digits_data()
        example = torch.from_numpy(x[:2])
        model_ids = [_upload(client, models.export_onnx(models.train_digits_mlp(), example, tmp / "mlp.onnx")),
                     _upload(client, models.save_torch_export(models.train_digits_mlp(), example, tmp / "mlp.pt2"))]
        stop_chaos = threading.Event()
        kills = Counter()

        def killer() -> None:
            while not stop_chaos.wait(rng.uniform(5, 15)):
                i = rng.randrange(len(workers))
                workers[i].kill()
                workers[i].wait()
                kills["worker SIGKILL"] += 1
                workers[i] = start_worker(env, logs, f"chaos-{i}-{kills['worker SIGKILL']}")

        submitted: list[str] = []
        threading.Thread(target=killer, daemon=True).start()
        for n in range(args.jobs):
            if n == args.jobs // 2:  # restart Redis once, mid-submission, losing whatever it held
                broker.kill()
                broker.wait()
                kills["redis restart"] += 1
                time.sleep(2)
                broker = _redis(redis_port)
            response = client.post("/v1/jobs", json={"model_id": model_ids[n % 2], "method": "dynamic",
                                                     "name": f"chaos-{n}"})
            if response.status_code == 202:
                submitted.append(response.json()["id"])
            time.sleep(rng.uniform(0.1, 0.6))
        deadline = time.monotonic() + args.minutes * 60
        while time.monotonic() < deadline:
            states = [client.get(f"/v1/jobs/{j}").json().get("status") for j in submitted]
            if all(s in TERMINAL for s in states):
                break
            time.sleep(2)
        stop_chaos.set()
        report = Counter(submitted=len(submitted), refused_at_submit=args.jobs - len(submitted))
        reasons: Counter[str] = Counter()
        for job_id in submitted:
            response = client.get(f"/v1/jobs/{job_id}")
            if response.status_code == 404:
                report["lost"] += 1
                continue
            job = response.json()
            if job["status"] not in TERMINAL:
                report["stuck"] += 1
                continue
            report[job["status"]] += 1
            if job["status"] == "failed":
                reasons[job["error"]["code"]] += 1
            lines = [json.loads(line)["message"] for line in client.get(f"/v1/jobs/{job_id}/logs").text.splitlines()]
            if lines.count("succeeded") > 1 or len(job["artifacts"]) > 2:
                report["duplicated"] += 1
            report["attempts"] += job["attempts"]
        stop(api)
        for w in workers:
            stop(w)
    broker.kill()
    print(f"\nchaos: {dict(kills)}")
    print("| submitted | succeeded | failed | lost | stuck | duplicated | attempts |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {report['submitted']} | {report['succeeded']} | {report['failed']} {dict(reasons) or ''} | "
          f"{report['lost']} | {report['stuck']} | {report['duplicated']} | {report['attempts']} |")
    return 0 if report["lost"] == report["stuck"] == report["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
