"""Runs the engine in a supervised child process: clean environment, limits, events, kill on demand."""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("quantserve.worker")

# What the child may inherit: nothing secret (no database URL, no broker URL, no keys).
_PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "TZ", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE",
                "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
                "LD_LIBRARY_PATH")


class SandboxFailure(Exception):
    def __init__(self, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class Stopped(Exception):
    """The supervisor asked the child to stop (cancel, lost lease)."""


@functools.cache
def network_isolation() -> list[str]:
    """`unshare -rn`: the engine runs in its own network namespace with no interfaces up, so a model file
    that manages to run code cannot reach the network. Where user namespaces are not allowed (some
    container runtimes), jobs run without it and the worker logs that once."""
    command = ["unshare", "--map-root-user", "--net"]
    try:
        subprocess.run([*command, "true"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        log.warning("network isolation of the engine is not available here (unshare failed); "
                    "jobs run with the worker's network access")
        return []
    return command


def child_env(work_dir: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASSTHROUGH if k in os.environ}
    env.update(HOME=str(work_dir), TMPDIR=str(work_dir), PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run(request: dict[str, Any], work_dir: Path, *, on_event: Callable[[dict[str, Any]], None] | None = None,
        keep_going: Callable[[], bool] = lambda: True, check_every_s: float = 1.0,
        time_limit_s: float = 3600.0, memory_limit_mb: int = 0) -> dict[str, Any]:
    """Run one engine request; returns its result dict, or raises SandboxFailure / Stopped."""
    work_dir.mkdir(parents=True, exist_ok=True)
    request = {**request, "result_path": str(work_dir / "result.json")}
    request_path = work_dir / "request.json"
    request_path.write_text(json.dumps(request))
    stderr_path = work_dir / "stderr.log"
    with open(stderr_path, "wb") as stderr:
        command = [*network_isolation(), sys.executable, "-m", "worker.engine.runner", str(request_path)]
        proc = subprocess.Popen(command, cwd=work_dir,
                                env=child_env(work_dir), stdout=subprocess.PIPE, stderr=stderr,
                                start_new_session=True)  # its own group: a kill reaches its helpers too
        events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=_read_events, args=(proc, events), daemon=True).start()
        started = last_check = time.monotonic()
        try:
            while proc.poll() is None:
                _drain(events, on_event, timeout=0.2)
                now = time.monotonic()
                if memory_limit_mb and (rss := _rss_mb(proc.pid)) > memory_limit_mb:
                    raise SandboxFailure("out_of_memory", f"the job used {rss} MB of memory, over its limit of "
                                         f"{memory_limit_mb} MB (QUANTSERVE_JOB_MEMORY_LIMIT_MB)")
                if now - started > time_limit_s:
                    raise SandboxFailure("timeout", f"the job ran longer than its limit of {time_limit_s:.0f} s")
                if now - last_check >= check_every_s:
                    last_check = now
                    if not keep_going():
                        raise Stopped()
        except BaseException:
            _kill(proc)
            raise
        _drain(events, on_event, timeout=0.5)
    return _outcome(proc.returncode, work_dir / "result.json", stderr_path)


def _read_events(proc: subprocess.Popen, events: queue.Queue) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        try:
            events.put(json.loads(raw))
        except ValueError:  # a library printed to stdout: keep it as a log line
            events.put({"event": "log", "level": "info", "message": raw.decode("utf-8", "replace").rstrip()})


def _drain(events: queue.Queue, on_event: Callable[[dict[str, Any]], None] | None, timeout: float) -> None:
    try:
        event = events.get(timeout=timeout)
    except queue.Empty:
        return
    while True:
        if on_event is not None:
            on_event(event)
        try:
            event = events.get_nowait()
        except queue.Empty:
            return


def _rss_mb(pid: int) -> int:
    """Resident memory of the engine process, from /proc (0 where that is not available)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return 0


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _outcome(returncode: int, result_path: Path, stderr_path: Path) -> dict[str, Any]:
    if result_path.exists():
        outcome = json.loads(result_path.read_text())
        if outcome["ok"]:
            return outcome["result"]
        error = outcome["error"]
        raise SandboxFailure(error["code"], error["message"], error.get("reason"))
    tail = stderr_path.read_text(errors="replace")[-2000:] if stderr_path.exists() else ""
    if returncode == -signal.SIGKILL or "MemoryError" in tail or "std::bad_alloc" in tail:
        # Nobody here sent SIGKILL (cancel and limits raise before reaching this): the kernel's OOM killer did.
        raise SandboxFailure("out_of_memory", "the engine process ran out of memory and was killed by the system")
    raise SandboxFailure("internal", f"the engine process exited with status {returncode}: {tail[-500:]}")
