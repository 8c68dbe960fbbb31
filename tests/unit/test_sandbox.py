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
    assert not [k for k in env if k.startswith(("QUANTSERVE_", "AWS_")) and k not in sandbox.ENGINE_SETTINGS]
    assert env["HOME"] == str(tmp_path)


def test_the_engines_own_settings_reach_the_engine_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import subprocess
    import sys

    monkeypatch.setenv("QUANTSERVE_AOTI", "0")
    monkeypatch.setenv("QUANTSERVE_DATABASE_URL", "postgresql+psycopg://user:secret@db/quantserve")
    probe = "import json, os; print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('QUANTSERVE_')}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env=sandbox.child_env(tmp_path), timeout=30)
    assert json.loads(out.stdout) == {"QUANTSERVE_AOTI": "0"}


def test_every_engine_setting_is_documented_in_the_readme() -> None:
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    assert all(f"| `{name}` |" in readme for name in sandbox.ENGINE_SETTINGS)


def test_memory_is_read_from_statm_when_status_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(pid: int) -> int:
        raise PermissionError("no /proc/<pid>/status here")

    monkeypatch.setattr(sandbox, "RSS_READERS", (broken, *sandbox.RSS_READERS[1:]))
    rss = sandbox._rss_mb(os.getpid())
    assert rss is not None and rss > 10  # this Python process holds more than 10 MB


def test_memory_is_read_with_ps_where_there_is_no_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(pid: int) -> int:
        raise FileNotFoundError("no /proc")

    monkeypatch.setattr(sandbox, "RSS_READERS", (broken, broken, sandbox.RSS_READERS[-1]))
    assert (sandbox._rss_mb(os.getpid()) or 0) > 10


def test_unmeasurable_memory_stops_the_job_instead_of_disabling_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(pid: int) -> int:
        raise OSError("no way to read memory")

    monkeypatch.setattr(sandbox, "RSS_READERS", (broken,))
    with pytest.raises(sandbox.MemoryUnmeasurableError):
        sandbox._rss_mb(os.getpid())
    with pytest.raises(sandbox.SandboxError) as failure:
        sandbox._guarded_rss_mb(os.getpid())
    assert failure.value.code == "internal" and failure.value.reason == "memory_unmeasurable"
    assert "QUANTSERVE_JOB_MEMORY_LIMIT_MB" in str(failure.value)


def test_a_process_that_is_gone_has_no_memory_and_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: its pid is free
    assert sandbox._rss_mb(proc.pid) is None


def test_an_engine_process_killed_by_a_crash_is_engine_error(tmp_path: Path) -> None:
    import signal

    (tmp_path / "stderr.log").write_text("Fatal Python error: Segmentation fault")
    with pytest.raises(sandbox.SandboxError) as failure:
        sandbox._outcome(-signal.SIGSEGV, tmp_path / "result.json", tmp_path / "stderr.log")
    assert failure.value.code == "engine_error" and failure.value.reason == "engine_crashed"
    assert "SIGSEGV" in str(failure.value)


def test_the_isolation_mode_says_whether_unshare_works_here() -> None:
    import shutil
    import subprocess

    mode = sandbox.isolation().mode
    works = shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--map-root-user", "--net", "true"], capture_output=True, timeout=10).returncode == 0
    if works:
        assert mode == "netns"
    else:
        assert mode.startswith("none: ") and len(mode) > len("none: "), mode


def test_without_unshare_the_mode_is_none_with_the_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a host with no unshare binary at all
    found = sandbox.isolation.__wrapped__()
    assert found.prefix == () and found.mode.startswith("none: FileNotFoundError"), found


# Prints "connected", or the errno name of the refusal.
_CONNECT = ("import errno, socket, sys\ns = socket.socket(); s.settimeout(5)\n"
            "try:\n    s.connect(('127.0.0.1', int(sys.argv[1]))); print('connected')\n"
            "except OSError as e:\n    print(errno.errorcode.get(e.errno, repr(e)))")


@pytest.mark.skipif(sandbox.isolation().mode != "netns", reason="user namespaces are not allowed on this host")
def test_an_engine_child_cannot_connect_to_a_port_its_parent_listens_on(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = str(server.getsockname()[1])
        # The same probe outside the sandbox connects: the refusal below is the namespace's doing.
        plain = subprocess.run([sys.executable, "-c", _CONNECT, port], capture_output=True, text=True, timeout=30)
        assert plain.stdout.strip() == "connected", plain.stderr
        server.accept()[0].close()
        child = sandbox.spawn(["-c", _CONNECT, port], tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = child.communicate(timeout=30)
        # Loopback is down in the child's namespace: the connect fails before any packet leaves.
        assert out.decode().strip() == "ENETUNREACH", (out, err)
        server.settimeout(0.5)
        with pytest.raises(TimeoutError):
            server.accept()


def test_a_stopped_job_kills_the_engine(tmp_path: Path) -> None:
    with pytest.raises(sandbox.JobStoppedError):
        sandbox.run({"op": "inspect_model", "path": os.devnull, "format": "onnx"}, tmp_path,
                    keep_going=lambda: False, check_every_s=0.0)


def test_every_documented_variable_is_read_and_every_setting_is_documented() -> None:
    import re

    from app.settings import Settings
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("## Reading a report")]
    documented = set(re.findall(r"^\| `(QUANTSERVE_[A-Z0-9_]+)` \|", table, re.M))
    settings = {f"QUANTSERVE_{name.upper()}" for name in Settings.model_fields}
    assert documented - settings - set(sandbox.ENGINE_SETTINGS) == set(), "documented but read by nothing"
    assert settings - documented == set(), "settings missing from README's Configuration table"
