"""The README's Python and CLI walk-throughs, run as written with the client against `quantserve serve`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tests.conftest import ROOT, free_port, stop, wait_http


def readme_block(marker: str, lang: str) -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- {marker}:start -->\s*```{lang}\n(.*?)```\s*<!-- {marker}:end -->", readme, re.S)
    assert block, f"README.md has no {marker} block"
    return block.group(1)


def model_script() -> str:
    """Step 1 of the curl walk-through: the Python that writes mlp.onnx."""
    heredoc = re.search(r"python - <<'PY'\n(.*?)\nPY\n", readme_block("walkthrough", "sh"), re.S)
    assert heredoc, "the curl walk-through no longer builds mlp.onnx with a python heredoc"
    return heredoc.group(1)


def test_readme_python_and_cli_walkthroughs_run_as_written_on_the_embedded_server(tmp_path: Path) -> None:
    port = free_port()  # not 8000: the curl walk-through's test owns that port; the client reads $QUANTSERVE_URL
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTSERVE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["QUANTSERVE_URL"] = f"http://127.0.0.1:{port}"
    subprocess.run([sys.executable, "-c", model_script()], cwd=tmp_path, env=env, check=True, timeout=120)
    server = subprocess.Popen([str(Path(sys.executable).parent / "quantserve"), "serve", "--data-dir", "./.quantserve",
                               "--port", str(port)], cwd=tmp_path, env={**env, "QUANTSERVE_URL": ""},
                              stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=90, proc=server)
        python = subprocess.run([sys.executable, "-c", readme_block("walkthrough-python", "python")], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=300)
        assert python.returncode == 0, f"Python walk-through failed:\n{python.stdout[-3000:]}\n{python.stderr[-3000:]}"
        cli = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block("walkthrough-cli", "sh") + 'echo "$JOB"'],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0, f"CLI walk-through failed:\n{cli.stdout[-3000:]}\n{cli.stderr[-3000:]}"
    finally:
        stop(server)

    # Python: progress was reported while it ran, and the job's answers came back typed and complete.
    lines = python.stdout.splitlines()
    assert lines[0] == "ready onnx [['batch', 64]]", lines[:3]
    progress = [line for line in lines if line.split(" ")[0] in ("queued", "running", "succeeded", "failed")]
    assert progress[-1].startswith("succeeded"), progress
    assert len(progress) >= 2 and progress[0].split(" ")[0] in ("queued", "running"), progress
    size = json.loads(next(x for x in lines if x.startswith("{'original_bytes'")).replace("'", '"'))
    assert size["quantized_bytes"] < size["original_bytes"]
    original = tmp_path / "mlp.onnx"
    (quantized,) = [p for p in (tmp_path / "out").iterdir() if p.suffix == ".onnx"]
    assert quantized.stat().st_size == size["quantized_bytes"]
    assert quantized.stat().st_size <= 0.30 * original.stat().st_size
    assert not list((tmp_path / "out").glob("*.part")), "a finished download left its .part behind"
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    ref = ort.InferenceSession(str(original)).run(None, {"input": x})[0]
    out = ort.InferenceSession(str(quantized)).run(None, {"input": x})[0]
    assert np.mean(ref.argmax(1) == out.argmax(1)) >= 0.9
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert 'id="chart-comparison"' in page and 'id="chart-layers"' in page and "mlp" in page

    # CLI: a second job (a new Idempotency-Key, so not the first job again), listed, every artifact downloaded.
    job_id = cli.stdout.split()[-1]
    assert re.fullmatch(r"[0-9a-f-]{36}", job_id), cli.stdout
    assert cli.stdout.count("succeeded") >= 2, f"`quantserve jobs` should list both jobs as succeeded:\n{cli.stdout}"
    assert job_id in cli.stdout.split()[:-1], "`quantserve jobs` does not list the job just submitted"
    files = {p.name: p for p in (tmp_path / "out-cli").iterdir()}
    assert {"report.json", "report.html", quantized.name} <= set(files), files
    report = json.loads(files["report.json"].read_text())
    assert report["job_id"] == job_id
    assert files[quantized.name].stat().st_size == report["metrics"]["size"]["quantized_bytes"]
    assert not list((tmp_path / "out-cli").glob("*.part"))
