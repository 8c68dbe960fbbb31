"""The engine's child process: no secrets in its environment, no network, killed on demand."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from worker import sandbox


def test_child_environment_carries_no_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUANTSERVE_DATABASE_URL", "postgresql+psycopg://user:secret@db/quantserve")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nope")
    env = sandbox.child_env(tmp_path)
    assert not [k for k in env if k.startswith(("QUANTSERVE_", "AWS_"))]
    assert env["HOME"] == str(tmp_path)


@pytest.mark.skipif(not sandbox.network_isolation(), reason="user namespaces are not allowed on this host")
def test_engine_process_has_no_network(tmp_path: Path) -> None:
    import subprocess
    import sys

    probe = ("import json, socket, os; s = socket.socket(); s.settimeout(2)\n"
             "try:\n    s.connect(('127.0.0.1', 5432)); print(json.dumps('connected'))\n"
             "except OSError as e:\n    print(json.dumps(str(e)))")
    out = subprocess.run([*sandbox.network_isolation(), sys.executable, "-c", probe], capture_output=True,
                         text=True, env=sandbox.child_env(tmp_path), timeout=30)
    assert json.loads(out.stdout) != "connected", "the sandbox reached PostgreSQL on the host"


def test_a_stopped_job_kills_the_engine(tmp_path: Path) -> None:
    with pytest.raises(sandbox.Stopped):
        sandbox.run({"op": "inspect_model", "path": os.devnull, "format": "onnx"}, tmp_path,
                    keep_going=lambda: False, check_every_s=0.0)
