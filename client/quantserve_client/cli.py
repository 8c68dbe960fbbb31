"""quantserve submit | download | jobs: the client's commands, with rich progress; no server code imported."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COMMANDS = ("submit", "download", "jobs")
# `make run` writes the first key here; used when neither --key nor $QUANTSERVE_API_KEY gives one.
EMBEDDED_KEY_FILE = Path(".quantserve") / "bootstrap.key"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantserve", description="quantserve's client commands: submit a job, "
                                     "watch it, download what it made.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help="server URL (default: $QUANTSERVE_URL, else http://localhost:8000)")
    common.add_argument("--key", default=None, help="API key (default: $QUANTSERVE_API_KEY, else the key in "
                                                    f"{EMBEDDED_KEY_FILE} when that file exists)")
    sub = parser.add_subparsers(dest="command", required=True)

    submit = sub.add_parser("submit", parents=[common], help="upload a model (or take an uploaded one) and "
                                                             "submit a quantization job")
    submit.add_argument("model", help="a model file to upload, or the id of an uploaded model")
    submit.add_argument("--method", required=True, help="dynamic | static | qat | weight_only | auto")
    for role in ("calibration", "training", "evaluation"):
        submit.add_argument(f"--{role}", metavar="DATASET", help=f"{role} dataset: a .npz/.jsonl file to upload, "
                                                                 "or a dataset id")
    submit.add_argument("--config", default="{}", help='the method\'s options as JSON, e.g. \'{"dtype": "int4"}\'')
    submit.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    submit.add_argument("--name", default=None, help="a name for the job")
    submit.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    submit.add_argument("-o", "--output", default=None, help="with --wait: download the quantized model here")
    submit.set_defaults(func=cmd_submit)

    download = sub.add_parser("download", parents=[common], help="download a job's artifacts (resumable)")
    download.add_argument("job", help="job id")
    download.add_argument("-o", "--output", default=".", help="folder to write into (default: .)")
    download.add_argument("--kind", default="all", help="model, compiled_model, report, report_html, or all")
    download.set_defaults(func=cmd_download)

    jobs = sub.add_parser("jobs", parents=[common], help="list jobs, newest first")
    jobs.add_argument("--status", default=None, choices=("queued", "running", "succeeded", "failed", "cancelled"))
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    jobs.set_defaults(func=cmd_jobs)
    return parser


def _client(args: argparse.Namespace):
    from quantserve_client.client import Client, ClientError

    key = args.key or os.environ.get("QUANTSERVE_API_KEY")
    if not key and EMBEDDED_KEY_FILE.is_file():
        key = EMBEDDED_KEY_FILE.read_text().strip()
    if not key:
        raise ClientError(f"no API key: pass --key, set QUANTSERVE_API_KEY, or run where {EMBEDDED_KEY_FILE} is")
    return Client(args.url, key)


def _is_id(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return not Path(value).exists()


def cmd_submit(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as exc:
        console.print(f"--config is not JSON: {exc}")
        return 2
    with _client(args) as client:
        if _is_id(args.model):
            model = client.model(args.model)
        else:
            with console.status(f"uploading {args.model} and waiting for its validation"):
                model = client.upload_model(args.model)
            console.print(f"model [bold]{model.id}[/] {model.format}, {model.size_bytes:,} bytes")
        datasets: dict[str, Any] = {}
        for role in ("calibration", "training", "evaluation"):
            ref = getattr(args, role)
            if ref and not _is_id(ref):
                with console.status(f"uploading {ref} and waiting for its validation"):
                    ref = client.upload_dataset(ref).id
            if ref:
                datasets[f"{role}_dataset_id"] = ref
        job = client.submit(model, args.method, config=config, device=args.device, name=args.name, **datasets)
        console.print(f"job [bold]{job.id}[/] {job.status}")
        print(job.id)  # alone on stdout, for scripts: JOB=$(quantserve submit ...)
        if not args.wait:
            return 0
        job = _follow(client, job.id, console)
        _print_outcome(job, console)
        if job.status != "succeeded":
            return 1
        if args.output:
            for path in client.download(job, args.output, kind="model"):
                console.print(f"downloaded {path}")
    return 0


def _follow(client, job_id: Any, console) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<14}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("queued", total=1.0)

        def show(job) -> None:
            label = job.stage if job.status == "running" and job.stage else job.status
            bar.update(task, completed=1.0 if job.status == "succeeded" else job.progress, description=label)

        return client.wait(job_id, on_progress=show, check=False)


def _print_outcome(job, console) -> None:
    from rich.text import Text

    # Text objects, not markup strings: messages and warnings quote layer and model names, whose "[...]" rich
    # would otherwise read as style tags.
    if job.status != "succeeded":
        line = Text(f"job {job.id} {job.status}", style="red")
        if job.error:
            line.append(f": {job.error.code}" + (f" ({job.error.reason})" if job.error.reason else ""))
            line.append(f"\n{job.error.message}", style="default")
        console.print(line)
        return
    metrics = job.metrics or {}
    size, latency, fidelity = metrics.get("size") or {}, metrics.get("latency") or {}, metrics.get("fidelity") or {}
    parts = []
    if size.get("ratio") is not None:
        parts.append(f"size x{size['ratio']:.3f} ({size.get('original_bytes', 0):,} -> "
                     f"{size.get('quantized_bytes', 0):,} bytes)")
    if latency.get("speedup") is not None:
        parts.append(f"speed-up x{latency['speedup']:.2f}")
    if fidelity.get("sqnr_db") is not None:
        parts.append(f"SQNR {fidelity['sqnr_db']:.1f} dB")
    console.print(Text(f"job {job.id} succeeded", style="green") + Text(": " + ", ".join(parts) if parts else ""))
    for warning in metrics.get("warnings") or []:
        console.print(Text("warning: ", style="yellow") + Text(str(warning)))


def cmd_download(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    console = Console(stderr=True)
    with _client(args) as client:
        job = client.job(args.job)
        if job.status != "succeeded":
            _print_outcome(job, console)
            return 1
        kind = None if args.kind == "all" else args.kind
        with Progress(*Progress.get_default_columns()[:2], DownloadColumn(), TransferSpeedColumn(),
                      console=console) as bar:
            task = bar.add_task("downloading", total=None)
            paths = client.download(job, args.output, kind=kind,
                                    on_bytes=lambda done, total: bar.update(task, completed=done, total=total))
    for path in paths:
        print(path)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Column, Table

    with _client(args) as client:
        jobs = list(client.jobs(status=args.status, limit=args.limit))
    if args.json:
        for job in jobs:
            print(job.model_dump_json())
        return 0
    # ids are what the other commands take: never wrapped
    table = Table(Column("id", no_wrap=True), "name", "method", "device", "status", "stage", "progress", "created")
    for job in jobs:
        # markup off: names are the users' own text, and "[bold]" in one must be shown, not obeyed
        table.add_row(str(job.id), job.name or "", job.method, job.device, job.status, job.stage or "",
                      f"{job.progress:.0%}", f"{job.created_at:%Y-%m-%d %H:%M:%S}")
    console = Console(markup=False, highlight=False)
    if not console.is_terminal:  # piped: whole cells (rich would cut them to 80 columns), no box drawing
        console, table.box = Console(markup=False, highlight=False, width=240), None
    console.print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from quantserve_client.http import ClientError

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except ClientError as exc:
        print(f"quantserve {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
