"""The README's curl walk-through, run literally against `quantserve serve` started as `make run` does."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tests.conftest import ROOT, stop, wait_http


def _walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- walkthrough:start -->\s*```sh\n(.*?)```\s*<!-- walkthrough:end -->", readme, re.S)
    assert block, "README.md has no walk-through block"
    return block.group(1)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_readme_walkthrough_runs_as_written_on_the_embedded_server(tmp_path: Path) -> None:
    assert _port_free(8000), "port 8000 is taken; the README's walk-through talks to localhost:8000"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTSERVE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    quantserve = Path(sys.executable).parent / "quantserve"
    # What `make run` runs, from a fresh folder: nothing but the data dir it creates.
    server = subprocess.Popen([str(quantserve), "serve", "--data-dir", "./.quantserve"], cwd=tmp_path, env=env,
                              stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_http("http://localhost:8000/healthz", timeout=90, proc=server)
        key_file = tmp_path / ".quantserve" / "bootstrap.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert str(key_file.resolve()) in (tmp_path / "serve.log").read_text()
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", _walkthrough()], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"walk-through failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    finally:
        stop(server)
    original, quantized = tmp_path / "mlp.onnx", tmp_path / "mlp.int8.onnx"
    assert quantized.stat().st_size <= 0.30 * original.stat().st_size
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    ref = ort.InferenceSession(str(original)).run(None, {"input": x})[0]
    out = ort.InferenceSession(str(quantized)).run(None, {"input": x})[0]
    assert np.mean(ref.argmax(1) == out.argmax(1)) >= 0.9
    assert '"metrics"' in (tmp_path / "report.json").read_text()
    assert 'id="chart-layers"' in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_stopping_serve_also_stops_its_worker(tmp_path: Path) -> None:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTSERVE_")}
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--data-dir", str(tmp_path / "d"),
                               "--port", str(free)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{free}/healthz", timeout=90, proc=server)
    time.sleep(3)  # let the worker finish starting
    workers = _children(server.pid)
    assert workers, "serve started no worker process"
    stop(server)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.5)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
             and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
    assert not alive, f"worker processes outlived serve: {alive}"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]
