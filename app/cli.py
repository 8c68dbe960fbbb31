"""quantserve serve | api | worker | migrate | keys | quantize | submit | download | jobs: one command line."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    # The data dir travels by environment variable so that child processes (the worker) agree with us.
    if getattr(args, "data_dir", None):
        os.environ["QUANTSERVE_DATA_DIR"] = str(Path(args.data_dir).resolve())
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings


def _session_factory(settings: Settings):
    from app.db import make_engine, make_session_factory

    return make_session_factory(make_engine(settings.effective_database_url))


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.migrate import upgrade

    settings = _settings(args)
    upgrade(settings.effective_database_url)
    print("database is at the latest migration")
    if settings.storage_url and settings.storage_url.startswith("s3://"):
        from app.storage_s3 import S3Storage

        # Provisioning, like the schema: the API and workers then only read and write objects.
        created = S3Storage.from_url(settings.storage_url, spool_dir=settings.data_dir / "spool").ensure_bucket()
        print(f"bucket {'created' if created else 'exists'}: {settings.storage_url}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from app.db import transaction
    from app.services import keys

    settings = _settings(args)
    factory = _session_factory(settings)
    with transaction(factory) as session:
        if args.keys_command == "create":
            key = keys.create(session, args.tenant)
            print(f"created a key for tenant {args.tenant!r}; it is shown only once:", file=sys.stderr)
            print(key)
        elif args.keys_command == "list":
            for k in keys.list_keys(session):
                state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
                print(f"{k.prefix}…  tenant={k.tenant}  created={k.created_at:%Y-%m-%dT%H:%M:%SZ}  {state}")
        else:
            count = keys.revoke(session, args.prefix)
            print(f"revoked {count} key(s)")
    return 0


# uvicorn, as both `api` and `serve` run it. Its text access log is off: QUANTSERVE_ACCESS_LOG=json writes a
# structured one (app/access_log.py). A stop waits at most this long for requests still running (a long poll
# lasts up to 60 s); clients of a cut poll simply poll again.
# loop "asyncio", not uvloop: under a CPU-bound load uvloop serves connections unfairly. Measured with wrk at 256
# keep-alive clients on one process (2 CPUs), on the polled route and on a bare FastAPI hello: uvloop, 3,400 rps
# with p99 6 s and some connections waiting the whole 8 s run (wrk's 2 s timeout fired ~100 times); asyncio's own
# loop, the same rps with p99 160-430 ms and no request over 0.6 s.
UVICORN_OPTIONS = {"log_level": "info", "access_log": False, "timeout_graceful_shutdown": 5, "loop": "asyncio",
                   "http": "app.http_protocol:NoDelayHttpToolsProtocol"}


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _settings(args)
    workers = args.workers or settings.api_workers or cpu_count()
    # Each process has its own pools (app/db.py): say what the database must allow.
    from app.db import SYNC_POOL_CAPACITY

    per_process = settings.db_pool_size + SYNC_POOL_CAPACITY + 1
    print(f"quantserve api: {workers} process(es), up to {workers * per_process} database connections "
          f"({per_process} each)", file=sys.stderr, flush=True)
    if workers == 1:
        from app.main import create_app

        uvicorn.run(create_app(settings), host=args.host, port=args.port, **UVICORN_OPTIONS)
    else:  # each worker process builds its own app (and its own pools) from the same environment
        with _metrics_folder():
            uvicorn.run("app.main:create_app", factory=True, workers=workers, host=args.host, port=args.port,
                        **UVICORN_OPTIONS)
    return 0


@contextmanager
def _metrics_folder() -> Iterator[None]:
    """A fresh PROMETHEUS_MULTIPROC_DIR for the API processes, so /metrics sums all of them (app/metrics.py).

    Set before uvicorn starts them: prometheus_client picks its file-backed values at import, in each process.
    Fresh per start, and removed after: files left by an earlier run would be added to this run's counters.
    An operator's own folder is used as it is (emptying it between runs is then theirs to do)."""
    from app.metrics import MULTIPROC_ENV

    if os.environ.get(MULTIPROC_ENV):
        yield
        return
    folder = tempfile.mkdtemp(prefix="quantserve-metrics-")
    os.environ[MULTIPROC_ENV] = folder
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def cmd_worker(args: argparse.Namespace) -> int:
    _settings(args)
    from worker import devices
    from worker.celery_app import celery_app

    # Only the queues of devices this host really has: a gpu worker without CUDA would take cuda jobs and fail them.
    queues, dropped = devices.usable_queues([q.strip() for q in args.queues.split(",") if q.strip()])
    for why in dropped.values():
        print(f"quantserve worker: {why}", file=sys.stderr, flush=True)
    if not queues:
        print("quantserve worker: no queue left to consume; start it with --queues cpu", file=sys.stderr)
        return 2
    argv = ["worker", "--queues", ",".join(queues), "--loglevel", args.loglevel]
    if args.concurrency:
        argv += ["--concurrency", str(args.concurrency)]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    celery_app.worker_main(argv)
    return 0


def _bootstrap_key(settings: Settings, factory) -> None:
    from app.db import transaction
    from app.services import keys

    with transaction(factory) as session:
        if keys.any_key_exists(session):
            return
        key = keys.create(session, "default")
    path = settings.data_dir / "bootstrap.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    print(f"first start: an API key for tenant 'default' is in {path.resolve()}", flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    """Everything on one machine: SQLite, a local store, an embedded broker, one real Celery worker."""
    import uvicorn

    from app.main import create_app
    from app.migrate import upgrade

    settings = _settings(args)
    upgrade(settings.effective_database_url)
    _bootstrap_key(settings, _session_factory(settings))
    from worker.engine.runner import die_with_parent

    # The worker gets SIGTERM (a warm shutdown) when this process ends, however it ends: uvicorn re-raises
    # the signal that stopped it, so a `finally` here would not run.
    # cpu and gpu: the worker drops gpu unless it finds CUDA, so `serve` on a GPU machine serves cuda jobs too.
    # Until it has published what it serves, a cpu job is accepted and waits (app/services/jobs.py).
    worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--queues", "cpu,gpu,webhooks",
                               "--hostname", "embedded@%h"], env=os.environ.copy(),
                              preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, **UVICORN_OPTIONS)
    finally:  # reached when uvicorn returns normally (e.g. it could not bind the port)
        worker.terminate()
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_data_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--data-dir", help="where the embedded database, broker and artifacts live "
                                          "(default: $QUANTSERVE_DATA_DIR or ./.quantserve)")
        return p

    serve = with_data_dir(sub.add_parser("serve", help="run API + worker on this machine, nothing else needed"))
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=cmd_serve)

    api = with_data_dir(sub.add_parser("api", help="run the HTTP API"))
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=0,
                     help="API processes (default: $QUANTSERVE_API_WORKERS, else one per CPU)")
    api.set_defaults(func=cmd_api)

    worker = with_data_dir(sub.add_parser("worker", help="run a Celery worker"))
    worker.add_argument("--queues", default="cpu,webhooks",
                        help="comma-separated: cpu, gpu (only where CUDA is found), webhooks (job-end deliveries)")
    worker.add_argument("--concurrency", type=int, default=0)
    worker.add_argument("--hostname", default="")
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(func=cmd_worker)

    # Parsed by the engine's own CLI (worker/engine/cli.py): registered here only by name, so the API's
    # install, which has no torch, still lists it and answers with an install hint.
    quantize = sub.add_parser("quantize", help="quantize a local model file with the engine (needs the worker "
                                               "extra); `quantserve quantize --help` lists its options",
                              add_help=False)
    quantize.add_argument("engine_args", nargs=argparse.REMAINDER)
    quantize.set_defaults(func=cmd_quantize)

    # The Python client's commands (client/quantserve_client/cli.py), registered by name only, like quantize:
    # main() hands their arguments over untouched, and nothing of the server is imported for them.
    for name, help_text in CLIENT_COMMANDS.items():
        client_cmd = sub.add_parser(name, help=help_text, add_help=False)
        client_cmd.add_argument("client_args", nargs=argparse.REMAINDER)

    with_data_dir(sub.add_parser("migrate", help="apply database migrations")).set_defaults(func=cmd_migrate)

    keys = with_data_dir(sub.add_parser("keys", help="manage API keys"))
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key; prints it alone on the last line")
    create.add_argument("--tenant", required=True)
    create.add_argument("--data-dir", help=argparse.SUPPRESS)
    lst = keys_sub.add_parser("list")
    lst.add_argument("--data-dir", help=argparse.SUPPRESS)
    revoke = keys_sub.add_parser("revoke")
    revoke.add_argument("prefix")
    revoke.add_argument("--data-dir", help=argparse.SUPPRESS)
    keys.set_defaults(func=cmd_keys)
    return parser


WORKER_EXTRA_HINT = ("quantserve quantize runs the engine, which this install does not have (missing module "
                     "{missing!r}); install it with: pip install 'quantserve[worker]'")


def cmd_quantize(args: argparse.Namespace) -> int:
    try:
        from worker.engine import cli as engine_cli
    except ModuleNotFoundError as exc:
        print(WORKER_EXTRA_HINT.format(missing=exc.name), file=sys.stderr)
        return 2
    return engine_cli.main(args.engine_args)


CLIENT_COMMANDS = {"submit": "client: upload a model and submit a job (--wait follows it with a progress bar)",
                   "download": "client: download a job's artifacts (resumable)",
                   "jobs": "client: list jobs"}
CLIENT_EXTRA_HINT = ("quantserve {command} is a client command and needs module {missing!r}; install it with: "
                     "pip install 'quantserve[client]' (or the client alone: pip install ./client)")


def cmd_client(argv: list[str]) -> int:
    try:
        # httpx and rich are checked here, so that a missing one gets the hint rather than a traceback
        import httpx  # noqa: F401
        import rich  # noqa: F401

        from quantserve_client import cli as client_cli
    except ModuleNotFoundError as exc:
        print(CLIENT_EXTRA_HINT.format(command=argv[0], missing=exc.name), file=sys.stderr)
        return 2
    return client_cli.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["quantize"]:  # everything after it is the engine CLI's, options included
        return cmd_quantize(argparse.Namespace(engine_args=argv[1:]))
    if argv[:1] and argv[0] in CLIENT_COMMANDS:  # the client's own parser reads the rest
        return cmd_client(argv)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
