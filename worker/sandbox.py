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
from typing import IO, Any, NamedTuple

log = logging.getLogger("quantserve.worker")

# What the child may inherit: nothing secret (no database URL, no broker URL, no keys).
_PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "TZ", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE",
                "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
                "LD_LIBRARY_PATH")
# The engine's own operator settings (README, "Configuration"), each read by the engine in the child. Listed
# one by one, never by prefix: QUANTSERVE_DATABASE_URL and the broker URL carry passwords.
ENGINE_SETTINGS = ("QUANTSERVE_AOTI",)  # "0": no AOTInductor package (worker/engine/torch_export/aoti.py)


class SandboxError(Exception):
    def __init__(self, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class JobStoppedError(Exception):
    """The supervisor asked the child to stop (cancel, lost lease)."""


class Isolation(NamedTuple):
    """How engine children are cut off from the network: `mode` is "netns", or "none: <why>"."""

    mode: str
    prefix: tuple[str, ...]  # what goes before the child's command line


@functools.cache
def isolation() -> Isolation:
    """`unshare -rn`: the engine runs in its own network namespace with no interfaces up, so a model file
    that manages to run code cannot reach the network, not even the worker's own ports on 127.0.0.1.

    Probed once per process by running it. Docker's default seccomp profile refuses the unprivileged user
    namespace it needs, so in compose this is "none: ..." and the internal network (docker-compose.yml) is what
    stands between a job and the outside; the worker says which at start-up and in its workers row."""
    command = ("unshare", "--map-root-user", "--net")
    try:
        subprocess.run([*command, "true"], check=True, capture_output=True, timeout=10)
    except subprocess.CalledProcessError as exc:
        why = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or [f"exit {exc.returncode}"]
        return Isolation(f"none: {why[0]}", ())
    except (OSError, subprocess.SubprocessError) as exc:  # no unshare binary, or it hung
        return Isolation(f"none: {exc.__class__.__name__}: {exc}", ())
    return Isolation("netns", command)


def spawn(argv: list[str], work_dir: Path, *, stdout: int | IO[bytes] | None,
          stderr: int | IO[bytes] | None) -> subprocess.Popen:
    """Start `python <argv>` as an engine child: network isolation where the host has it, the cleaned
    environment, its own process group (a kill reaches its helpers too)."""
    return subprocess.Popen([*isolation().prefix, sys.executable, *argv], cwd=work_dir, env=child_env(work_dir),
                            stdout=stdout, stderr=stderr, start_new_session=True)


def child_env(work_dir: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in (*_PASSTHROUGH, *ENGINE_SETTINGS) if k in os.environ}
    env.update(HOME=str(work_dir), TMPDIR=str(work_dir), PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run(request: dict[str, Any], work_dir: Path, *, on_event: Callable[[dict[str, Any]], None] | None = None,
        keep_going: Callable[[], bool] = lambda: True, check_every_s: float = 1.0,
        time_limit_s: float = 3600.0, memory_limit_mb: int = 0, max_file_bytes: int = 0) -> dict[str, Any]:
    """Run one engine request; returns its result dict, or raises SandboxError / JobStoppedError.

    memory_limit_mb: resident memory, watched here (0 = none); max_file_bytes: the child's RLIMIT_FSIZE,
    set by the runner (0 = none)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    request = {**request, "result_path": str(work_dir / "result.json"), "max_file_bytes": max_file_bytes}
    request_path = work_dir / "request.json"
    request_path.write_text(json.dumps(request))
    stderr_path = work_dir / "stderr.log"
    with open(stderr_path, "wb") as stderr:
        proc = spawn(["-m", "worker.engine.runner", str(request_path)], work_dir, stdout=subprocess.PIPE,
                     stderr=stderr)
        events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=_read_events, args=(proc, events), daemon=True).start()
        started = last_check = time.monotonic()
        try:
            while proc.poll() is None:
                _drain(events, on_event, timeout=0.2)
                now = time.monotonic()
                if memory_limit_mb and (rss := _guarded_rss_mb(proc.pid)) > memory_limit_mb:
                    raise SandboxError("out_of_memory", f"the job used {rss} MB of memory, over its limit of "
                                         f"{memory_limit_mb} MB (QUANTSERVE_JOB_MEMORY_LIMIT_MB)", "memory_limit")
                if now - started > time_limit_s:
                    raise SandboxError("timeout", f"the job ran longer than its limit of {time_limit_s:.0f} s "
                                         "(QUANTSERVE_JOB_TIME_LIMIT_S)", "time_limit")
                if now - last_check >= check_every_s:
                    last_check = now
                    if not keep_going():
                        raise JobStoppedError()
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


class MemoryUnmeasurableError(Exception):
    """No way to read the engine's resident memory here: the memory limit cannot be enforced."""


def _rss_from_status(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
        if line.startswith("State:") and "Z" in line.split()[1:2]:
            return 0  # exited, not yet reaped: no memory left, and no VmRSS line
    raise ValueError("no VmRSS line")


def _rss_from_statm(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_from_ps(pid: int) -> int:
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
    return int(out.stdout.strip()) * 1024  # KiB; empty output (no such process) raises ValueError


# Tried in order: /proc/<pid>/status, then /proc/<pid>/statm (both Linux), then `ps` (any POSIX system).
RSS_READERS: tuple[Callable[[int], int], ...] = (_rss_from_status, _rss_from_statm, _rss_from_ps)
_warned: set[str] = set()


def _rss_mb(pid: int) -> int | None:
    """Resident memory of the engine process in MB, by the first reader that works; None once the process is
    gone. Raises MemoryUnmeasurableError when it is alive and no reader works: never 0, which would silently turn
    the memory limit off."""
    failures = []
    for reader in RSS_READERS:
        try:
            return reader(pid) // 2**20
        except (OSError, ValueError, IndexError, subprocess.SubprocessError) as exc:
            failures.append(f"{reader.__name__}: {exc.__class__.__name__}: {exc}")
            if not _alive(pid):
                return None
            if reader.__name__ not in _warned:
                _warned.add(reader.__name__)
                log.warning("reading the engine's memory with %s failed (%s); trying the next way", reader.__name__,
                            failures[-1])
    raise MemoryUnmeasurableError("; ".join(failures))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's (cannot happen for our child, but do not call it dead)
        return True
    return True


def _guarded_rss_mb(pid: int) -> int:
    try:
        rss = _rss_mb(pid)
    except MemoryUnmeasurableError as exc:
        log.error("cannot measure the engine's memory (%s): stopping the job rather than run it without its "
                  "memory limit", exc)
        raise SandboxError("internal", "the worker cannot measure the engine's memory on this host, so "
                             "QUANTSERVE_JOB_MEMORY_LIMIT_MB cannot be enforced; the job was stopped rather than "
                             "run unguarded (unset the limit on such hosts, or run the worker on Linux)",
                             "memory_unmeasurable") from exc
    return 0 if rss is None else rss  # gone: its exit status tells the rest


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
        raise SandboxError(error["code"], error["message"], error.get("reason"))
    tail = stderr_path.read_text(errors="replace")[-2000:] if stderr_path.exists() else ""
    if returncode == -signal.SIGKILL or "MemoryError" in tail or "std::bad_alloc" in tail:
        # Nobody here sent SIGKILL (cancel and limits raise before reaching this): the kernel's OOM killer did.
        raise SandboxError("out_of_memory", "the engine process ran out of memory and was killed by the system",
                             "killed_by_system")
    if returncode < 0:  # a native library crashed it (SIGSEGV, SIGABRT, ...): a failure of the engine, not ours
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        raise SandboxError("engine_error", f"the engine process crashed ({name}); please report this: "
                             f"{tail[-500:]}", "engine_crashed")
    raise SandboxError("internal", f"the engine process exited with status {returncode}: {tail[-500:]}")
