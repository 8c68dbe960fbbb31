"""Upload part of `make bench-api`: two concurrent 1 GiB raw uploads vs `cp` + SHA-256, the API's RSS, polls."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import httpx

BLOCK = 16 * 1024 * 1024


def make_npz(path: Path, size: int) -> Path:
    """An uncompressed .npz of about `size` bytes (one float32 array): a dataset the API accepts."""
    rows = size // (64 * 4)
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, 64), }}".encode()
    header += b" " * (-(len(header) + 10 + 1) % 64) + b"\n"
    block = os.urandom(BLOCK)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf, zf.open("x.npy", "w", force_zip64=True) as fh:
        fh.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header)
        left = rows * 64 * 4
        while left > 0:
            fh.write(block[: min(left, BLOCK)])
            left -= min(left, BLOCK)
    return path


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (uvicorn's workers are children)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo += [int(c) for c in children]
    return total


def measure_uploads(base: str, key: str, poll_url: str, api_pid: int, work: Path, size: int) -> list[str]:
    source = make_npz(work / "big.npz", size)
    real = source.stat().st_size
    started = time.monotonic()
    copy = work / "big.copy"
    shutil.copyfile(source, copy)
    digest = hashlib.sha256()
    with open(copy, "rb") as fh:
        while chunk := fh.read(BLOCK):
            digest.update(chunk)
    cp_s = time.monotonic() - started
    copy.unlink()

    baseline = tree_rss(api_pid)
    peak, polls, worst, done = baseline, [], 0.0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(api_pid))
            time.sleep(0.05)

    def poll() -> None:
        nonlocal worst
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            while not done.is_set():
                t = time.monotonic()
                polls.append(client.get(poll_url).status_code)
                worst = max(worst, time.monotonic() - t)
                time.sleep(0.01)

    threads = [threading.Thread(target=sample), threading.Thread(target=poll)]
    for t in threads:
        t.start()
    began = time.monotonic()
    uploads = [subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
                                 "-H", f"Authorization: Bearer {key}", "-T", str(source),
                                 f"{base}/v1/datasets/upload?name=big{i}"], stdout=subprocess.PIPE, text=True)
               for i in range(2)]
    results = [u.communicate()[0].split() for u in uploads]
    wall = time.monotonic() - began
    done.set()
    for t in threads:
        t.join()
    source.unlink()
    each = [real / float(seconds) / 1e6 for _, seconds in results]
    statuses = [code for code, _ in results]
    return [f"- upload of {real / 1024**3:.2f} GiB, two at once (PUT /v1/datasets/upload): "
            f"{each[0]:,.0f} and {each[1]:,.0f} MB/s each, {2 * real / wall / 1e6:,.0f} MB/s together, "
            f"answers {statuses}; `cp` + SHA-256 of the same file: {real / cp_s / 1e6:,.0f} MB/s",
            f"- API RSS during the two uploads: {baseline / 1e6:.0f} MB before, peak {peak / 1e6:.0f} MB "
            f"(+{(peak - baseline) / 1e6:.0f} MB)",
            f"- polls meanwhile: {len(polls)} answered, statuses {sorted(set(polls))}, slowest {worst * 1000:.0f} ms"]
