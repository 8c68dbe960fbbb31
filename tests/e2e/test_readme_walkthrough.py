"""The README's curl walk-through, run literally against `quantserve serve` started as `make run` does."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
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
