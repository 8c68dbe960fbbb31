"""`make bench-storage`: upload and download throughput through the API, local folder vs S3 (SeaweedFS), and RSS.

Each backend gets its own embedded API (SQLite database and broker, one process, no worker: only the byte path is
measured). The S3 store is a local SeaweedFS, so the number shows quantserve's own overhead (multipart parts,
hashing, the spooled copy for format detection), not a network's. Run: python bench/storage.py [--mib 512]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.uploads import tree_rss  # noqa: E402
from tests.conftest import free_port, stop, wait_http  # noqa: E402
from tests.s3server import seaweedfs  # noqa: E402


def _cli(env: dict[str, str], *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout


def _measure(name: str, env: dict[str, str], source: Path, runs: int, work: Path) -> dict:
    _cli(env, "migrate")
    key = _cli(env, "keys", "create", "--tenant", "bench").strip().splitlines()[-1]
    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "app.cli", "api", "--port", str(port), "--workers", "1"],
                           env=env, cwd=ROOT, stdout=open(work / f"api-{name}.log", "ab"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/healthz", proc=api)
        size, digest = source.stat().st_size, hashlib.sha256(source.read_bytes()).hexdigest()
        baseline, peak, done = tree_rss(api.pid), 0, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_rss(api.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        ups, downs = [], []
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
            for i in range(runs):
                with open(source, "rb") as fh:
                    t = time.monotonic()
                    response = client.put("/v1/models/upload", params={"name": f"b{i}"}, content=fh)
                    ups.append(size / (time.monotonic() - t) / 1e6)
                assert response.status_code == 201, response.text
                assert response.json()["sha256"] == digest
                t, h = time.monotonic(), hashlib.sha256()
                with client.stream("GET", f"/v1/models/{response.json()['id']}/download") as download:
                    for chunk in download.iter_bytes(1 << 20):
                        h.update(chunk)
                downs.append(size / (time.monotonic() - t) / 1e6)
                assert h.hexdigest() == digest
        done.set()
        sampler.join()
        return {"name": name, "up": statistics.median(ups), "down": statistics.median(downs),
                "rss_base": baseline, "rss_peak": peak}
    finally:
        stop(api)


def make_onnx(path: Path, mib: int) -> Path:
    """An ONNX model of about `mib` MiB (one float initializer): an upload the API accepts as a model."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).random(mib * 256 * 1024, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [mib * 256 * 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [mib * 256 * 1024])], [weight])
    onnx.save(helper.make_model(graph), path)
    return path


def _direct(server, bucket: str, source: Path, runs: int) -> float:
    """The server's own ceiling: boto3 alone sending the same file as sequential 8 MiB parts, no API."""
    from app.storage_s3 import PART_BYTES

    client, speeds = server.client(), []
    for _ in range(runs):
        t = time.monotonic()
        upload = client.create_multipart_upload(Bucket=bucket, Key="direct")["UploadId"]
        parts = []
        with open(source, "rb") as fh:
            while data := fh.read(PART_BYTES):
                n = len(parts) + 1
                etag = client.upload_part(Bucket=bucket, Key="direct", UploadId=upload, PartNumber=n, Body=data)["ETag"]
                parts.append({"PartNumber": n, "ETag": etag})
        client.complete_multipart_upload(Bucket=bucket, Key="direct", UploadId=upload,
                                         MultipartUpload={"Parts": parts})
        speeds.append(source.stat().st_size / (time.monotonic() - t) / 1e6)
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="size of the uploaded file")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qs-bench-storage-") as tmp:
        work = Path(tmp)
        source = make_onnx(work / "upload.onnx", args.mib)
        mib = source.stat().st_size / 1024**2
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("QUANTSERVE_", "AWS_"))}
        results = [_measure("local folder", {**base_env, "QUANTSERVE_DATA_DIR": str(work / "local")},
                            source, args.runs, work)]
        with seaweedfs(work / "weed", work / "weed.log") as server:
            bucket = server.new_bucket()
            env = {**base_env, "QUANTSERVE_DATA_DIR": str(work / "s3"), **server.env(bucket)}
            results.append(_measure("S3 (SeaweedFS, loopback)", env, source, args.runs, work))
            direct = _direct(server, bucket, source, args.runs)
    print(f"\n{mib:,.0f} MiB ONNX model, PUT /v1/models/upload then GET .../download, "
          f"median of {args.runs}\n")
    print("| store | upload MB/s | download MB/s | API RSS before | API RSS peak |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['up']:,.0f} | {r['down']:,.0f} | {r['rss_base'] / 1e6:.0f} MB | "
              f"{r['rss_peak'] / 1e6:.0f} MB |")
    print(f"| boto3 alone to the same SeaweedFS (sequential 8 MiB parts, no API) | {direct:,.0f} | | | |")


if __name__ == "__main__":
    main()
