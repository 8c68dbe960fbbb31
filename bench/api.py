"""make bench-api: quantserve's job polls against a bare FastAPI + sync SQLAlchemy one-row read, with wrk.

Not a test: it prints markdown tables of what it measured on this machine.
- Production mode (PostgreSQL + Redis): `quantserve api` and bench/bare_api.py, same process count, measured
  interleaved at each concurrency: rps, p50, p99, errors by status and socket errors, ratio to the bare read;
  and 304 rps with If-None-Match.
- Uploads: two concurrent 1 GiB raw uploads against `cp` + SHA-256 of the same file, the API's peak RSS
  during them, and how polls fared meanwhile.
- Embedded mode (`quantserve serve`, SQLite): the same polls, and how long it takes to stop right after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.db import make_engine, make_session_factory, transaction  # noqa: E402
from app.models import ApiKey, Artifact, Job  # noqa: E402
from app.services import keys  # noqa: E402
from bench import wrk_runner  # noqa: E402
from bench.uploads import measure_uploads  # noqa: E402
from tests.conftest import free_port, fresh_pg_database, stop  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REDIS = os.environ.get("QUANTSERVE_TEST_REDIS", "redis://127.0.0.1:6379") + "/14"


def seed(url: str, key: str | None = None) -> tuple[str, uuid.UUID]:
    """A key (made here unless given) and one succeeded job with two artifacts, as a finished pipeline polls it."""
    engine = make_engine(url)
    with transaction(make_session_factory(engine)) as session:
        key = key or keys.create(session, "bench")
        tenant_id = session.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == keys.hash_key(key)))
        job = Job(tenant_id=tenant_id, model_id=uuid.uuid4(), method="static", status="succeeded", progress=1.0,
                  attempt=1, config={"dtype": "int8", "granularity": "per_channel", "calibration":
                                     {"algorithm": "entropy", "num_samples": 256}},
                  metrics={"size": {"original_bytes": 120832, "quantized_bytes": 33120, "ratio": 0.274},
                           "fidelity": {"source": "evaluation", "sqnr_db": 31.2, "cosine": 0.9996}})
        session.add(job)
        session.flush()
        for kind, filename in (("model", "digits.int8.onnx"), ("report", "report.json")):
            session.add(Artifact(tenant_id=tenant_id, job_id=job.id, kind=kind, filename=filename, format="onnx",
                                 size_bytes=33120, sha256="0" * 64, storage_key=f"jobs/{job.id}/{filename}"))
        job_id = job.id
    engine.dispose()
    return key, job_id


def start(cmd: list[str], env: dict[str, str], health: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(health, timeout=1).status_code < 500:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{health} did not answer")


def fmt_errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0"


def production(args: argparse.Namespace, work: Path) -> tuple[list[str], list[str]]:
    rows, notes = [], []
    with fresh_pg_database() as url:
        key, job_id = seed(url)
        env = {**os.environ, "QUANTSERVE_DATABASE_URL": url, "QUANTSERVE_BROKER_URL": REDIS,
               "QUANTSERVE_DATA_DIR": str(work / "prod"), "QUANTSERVE_BROKER_KEY_PREFIX": f"bench-{job_id.hex[:6]}:",
               "BARE_DATABASE_URL": url, "QUANTSERVE_MAX_UPLOAD_BYTES": str(3 * 1024**3)}
        qs_port, bare_port = free_port(), free_port()
        qs = start([sys.executable, "-m", "app.cli", "api", "--port", str(qs_port), "--workers", str(args.workers)],
                   env, f"http://127.0.0.1:{qs_port}/healthz", work / "api.log")
        # The bare read runs on the same server stack as quantserve (app/cli.py UVICORN_OPTIONS: asyncio's loop, and
        # TCP_NODELAY on every connection, which uvicorn --workers leaves off): only the request path differs.
        bare = start([sys.executable, "-m", "uvicorn", "bench.bare_api:app", "--port", str(bare_port), "--workers",
                      str(args.workers), "--no-access-log", "--log-level", "warning", "--loop", "asyncio",
                      "--http", "app.http_protocol:NoDelayHttpToolsProtocol"], env,
                     f"http://127.0.0.1:{bare_port}/docs", work / "bare.log")
        try:
            auth = {"Authorization": f"Bearer {key}"}
            qs_url, bare_url = f"http://127.0.0.1:{qs_port}/v1/jobs/{job_id}", f"http://127.0.0.1:{bare_port}/rows/{job_id}"
            etag = httpx.get(qs_url, headers=auth).headers["etag"]
            for c in args.concurrency:
                print(f"  production, {c} clients ...", file=sys.stderr, flush=True)
                b = wrk_runner.run(bare_url, c, args.duration)
                q = wrk_runner.run(qs_url, c, args.duration, auth)
                rows.append(f"| {c} | {q.rps:,.0f} | {q.p50_ms:.1f} | {q.p99_ms:.1f} | {fmt_errors(q.errors())} | "
                            f"{b.rps:,.0f} | {b.p50_ms:.1f} | {b.p99_ms:.1f} | {fmt_errors(b.errors())} | "
                            f"{q.rps / b.rps:.2f}x |")
            n = wrk_runner.run(qs_url, 64, args.duration, {**auth, "If-None-Match": etag})
            notes.append(f"- 304 with If-None-Match, 64 clients: {n.rps:,.0f} rps, p50 {n.p50_ms:.1f} ms, p99 "
                         f"{n.p99_ms:.1f} ms, statuses {dict(sorted(n.statuses.items()))}, errors "
                         f"{fmt_errors(n.errors(ok=(304,)))}")
            if not args.skip_upload:
                print("  uploads ...", file=sys.stderr, flush=True)
                notes += measure_uploads(f"http://127.0.0.1:{qs_port}", key, qs_url, qs.pid, work,
                                         size=int(args.upload_gib * 1024**3))
        finally:
            stop(bare, timeout=60)
            stop(qs, timeout=60)
    return rows, notes


def embedded(args: argparse.Namespace, work: Path) -> tuple[list[str], list[str]]:
    data, port = work / "embedded", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTSERVE_")}
    serve = start([sys.executable, "-m", "app.cli", "serve", "--data-dir", str(data), "--port", str(port)], env,
                  f"http://127.0.0.1:{port}/healthz", work / "serve.log")
    rows, stopped = [], float("nan")
    try:
        key = (data / "bootstrap.key").read_text().strip()
        _, job_id = seed(f"sqlite:///{data.resolve() / 'quantserve.db'}", key)
        url = f"http://127.0.0.1:{port}/v1/jobs/{job_id}"
        for c in args.concurrency:
            print(f"  embedded, {c} clients ...", file=sys.stderr, flush=True)
            q = wrk_runner.run(url, c, args.duration, {"Authorization": f"Bearer {key}"})
            rows.append(f"| {c} | {q.rps:,.0f} | {q.p50_ms:.1f} | {q.p99_ms:.1f} | {fmt_errors(q.errors())} |")
    finally:
        stopped = stop(serve, timeout=60)
    return rows, [f"- `quantserve serve` stopped {stopped:.1f} s after SIGTERM, right after the last load run"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8, help="seconds per wrk run")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256])
    parser.add_argument("--workers", type=int, default=1, help="processes of each API (quantserve's and the bare)")
    parser.add_argument("--upload-gib", type=float, default=1.0)
    parser.add_argument("--skip-upload", action="store_true")
    parser.add_argument("--skip-embedded", action="store_true")
    args = parser.parse_args()
    wrk_runner.require_wrk()
    with tempfile.TemporaryDirectory(prefix="qs-bench-api-") as tmp:
        work = Path(tmp)
        prod_rows, notes = production(args, work)
        emb_rows, emb_notes = ([], []) if args.skip_embedded else embedded(args, work)
    print(f"\n### quantserve `GET /v1/jobs/{{id}}` vs bare FastAPI + sync SQLAlchemy one-row read "
          f"({args.workers} process(es) each, wrk {args.duration:g} s per cell, {os.cpu_count()} CPUs)\n")
    print("| clients | quantserve rps | p50 ms | p99 ms | errors | bare rps | p50 ms | p99 ms | errors | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(prod_rows))
    print("\n" + "\n".join(notes))
    if emb_rows:
        print("\n### Embedded mode (`quantserve serve`, SQLite)\n")
        print("| clients | rps | p50 ms | p99 ms | errors |\n|---|---|---|---|---|")
        print("\n".join(emb_rows))
        print("\n" + "\n".join(emb_notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
