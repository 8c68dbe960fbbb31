"""The engine's child-process entry: `python -m worker.engine.runner REQUEST.json`.

The worker runs every validation and quantization here, in a process with a cleaned environment (no database
URL, no keys: worker/sandbox.py) and its own scratch folder, so a hostile or runaway model can be killed
without touching the worker. Events go to stdout as JSON lines; the result goes to the file named in the
request. What is enforced, and where:

- here, by setrlimit: no core dumps (RLIMIT_CORE 0); no file larger than the request's `max_file_bytes`
  (RLIMIT_FSIZE, from QUANTSERVE_MAX_ARTIFACT_BYTES; a write past it fails with EFBIG, reported as
  `unsupported`, reason `file_too_large`); at most MAX_OPEN_FILES open files (RLIMIT_NOFILE);
- by the supervising worker (worker/sandbox.py): resident memory (QUANTSERVE_JOB_MEMORY_LIMIT_MB, read from
  /proc), wall-clock time (QUANTSERVE_JOB_TIME_LIMIT_S), no network (`unshare -rn`, where the host allows it).

Not set, on purpose: RLIMIT_AS (torch and onnxruntime reserve address space they never use, and crash at
import under a cap), RLIMIT_NPROC (it counts every thread of every process of the user, so the worker's other
jobs and torch's thread pools would trip it), RLIMIT_CPU (the wall-clock limit already bounds a job).
"""

from __future__ import annotations

import errno
import json
import resource
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The job error codes of API.md; each means one thing (README, "When a job fails"). The engine's finer codes
# are folded into them and kept as `reason`.
JOB_ERROR_CODES = {"invalid_input", "unsupported", "engine_error", "target_not_met", "timeout", "out_of_memory",
                   "worker_lost", "internal"}
_FOLDED = {"dataset_mismatch": "invalid_input", "evaluation_failed": "invalid_input",
           "unsupported_format": "invalid_input", "nothing_to_quantize": "unsupported"}
MAX_OPEN_FILES = 4096  # torch's Inductor compile workers and onnxruntime use a few hundred at most


def public_error(code: str, message: str, reason: str | None = None) -> dict[str, str | None]:
    """{"code", "message", "reason"}: `code` is one of JOB_ERROR_CODES; `reason` the finer cause, if any."""
    if code in JOB_ERROR_CODES:
        return {"code": code, "message": message, "reason": reason}
    return {"code": _FOLDED.get(code, "invalid_input"), "message": message, "reason": reason or code}


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


_OOM_MARKERS = ("bad_alloc", "failed to allocate memory", "can't allocate memory", "cannot allocate memory",
                "failed to map segment", "out of memory")


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """exc, then every exception behind it: __cause__ and __context__ alike, since `raise ... from None`
    hides the context from tracebacks but keeps it. Each once, so a cycle ends."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]


def _oom_reason(exc: BaseException) -> str | None:
    """Why `exc` is an exhausted memory, or None. Native libraries say so in their own words, not as
    MemoryError; torch.cuda.OutOfMemoryError is matched by name, so this module never imports torch."""
    for e in exception_chain(exc):
        if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, torch.cuda.OutOfMemoryError
            return "cuda_out_of_memory" if "cuda" in str(e).lower() or "cuda" in type(e).__module__ else \
                "device_out_of_memory"
        if isinstance(e, MemoryError):
            return "memory_error"
        if any(marker in f"{type(e).__name__} {e}".lower() for marker in _OOM_MARKERS):
            return "allocation_failed"
    return None


def _file_too_large(exc: BaseException) -> bool:
    return any(isinstance(e, OSError) and e.errno == errno.EFBIG for e in exception_chain(exc))


def _root(exc: BaseException) -> BaseException:
    *_, root = exception_chain(exc)
    return root


def _with_cause(message: str, exc: BaseException) -> str:
    """message, plus the text of the deepest exception behind exc (short) unless the message already says it."""
    root = _root(exc)
    text = str(root)[:300]
    if root is exc or (text and text[:80] in message):
        return message
    return f"{message} (cause: {type(root).__name__}: {text})"


def _versions() -> str:
    from worker.engine.report import runtime_versions

    return ", ".join(f"{name} {version}" for name, version in runtime_versions().items())


def _error(exc: BaseException, op: str, max_file_bytes: int) -> dict[str, str | None]:
    """The job error of an exception raised by the engine. Order matters: resource exhaustion first, because
    handlers wrap a library's MemoryError in their own EngineError."""
    from worker.engine.errors import EngineError

    if (oom := _oom_reason(exc)) is not None:
        root = _root(exc)
        message = f"the job needed more memory than it could get ({type(root).__name__}: {str(root)[:300]})"
        if root is not exc:
            message += f"; while: {str(exc)[:300]}"
        return public_error("out_of_memory", message, oom)
    if _file_too_large(exc):
        return public_error("unsupported", f"the engine tried to write a file larger than the limit of "
                            f"{max_file_bytes} bytes (QUANTSERVE_MAX_ARTIFACT_BYTES): the model is too large "
                            "for this deployment", "file_too_large")
    if isinstance(exc, EngineError):
        return public_error(exc.code, _with_cause(str(exc), exc), getattr(exc, "reason", None))
    if op == "quantize":  # a library failed where it should not have: ours to fix, so say what to report
        return public_error("engine_error", f"the quantization library failed: {type(exc).__name__}: "
                            f"{str(exc)[:500]} (runtimes: {_versions()}); please report this", "library_failure")
    return public_error("internal", f"{type(exc).__name__}: {str(exc)[:500]}")


def die_with_parent(sig: int = 9) -> None:
    """Ask Linux to send `sig` (default SIGKILL) to this process when its parent dies, so no orphan keeps
    running: the engine when its worker is killed, the embedded worker when `quantserve serve` stops."""
    import ctypes
    import os

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG
    except OSError:  # not glibc/Linux: the job lease still fences a stale result out
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def apply_limits(max_file_bytes: int = 0) -> None:
    """The rlimits of the module docstring; 0 = no file-size limit. Never raises a hard limit."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _lower(resource.RLIMIT_NOFILE, MAX_OPEN_FILES)
    if max_file_bytes > 0:
        _lower(resource.RLIMIT_FSIZE, max_file_bytes)


def _lower(limit: int, value: int) -> None:
    soft, hard = resource.getrlimit(limit)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    if soft == resource.RLIM_INFINITY or soft > value:
        resource.setrlimit(limit, (value, value))  # hard too: a model that runs code cannot raise it again


def _run(request: dict[str, Any]) -> dict[str, Any]:
    from worker import engine

    op = request["op"]
    if op == "inspect_model":
        info = engine.inspect_model(Path(request["path"]), request["format"])
        return {"inputs": [t.to_dict() for t in info.inputs], "outputs": [t.to_dict() for t in info.outputs],
                "num_parameters": info.num_parameters, "architecture": info.architecture}
    if op == "inspect_dataset":
        ds = engine.inspect_dataset(Path(request["path"]), request["kind"], max_bytes=request.get("max_bytes"))
        return {"num_samples": ds.num_samples, "has_labels": ds.has_labels,
                "arrays": {k: {"dtype": a.dtype, "shape": list(a.shape)} for k, a in ds.arrays.items()}}
    if op == "quantize":
        work_dir = Path(request["work_dir"])
        datasets = {f"{role}_path": Path(p) for role, p in request.get("datasets", {}).items()}
        result = engine.quantize(
            Path(request["model_path"]), request["format"], request["method"], request["config"], work_dir,
            device=request.get("device", "cpu"), model_name=request.get("model_name", "model"),
            progress=lambda stage, fraction: _emit({"event": "progress", "stage": stage, "progress": fraction}),
            log=lambda level, message: _emit({"event": "log", "level": level, "message": message}),
            **datasets,
        )
        return {"artifacts": [{"kind": a.kind, "path": str(a.path), "filename": a.filename, "format": a.format}
                              for a in result.artifacts],
                "metrics": result.metrics, "report": result.report,
                # a failure that still delivers its artifacts (target_not_met): the worker stores both at once
                "error": None if result.error is None else public_error(result.error["code"], result.error["message"])}
    raise ValueError(f"unknown op {op!r}")


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[1]).read_text())
    result_path = Path(request["result_path"])
    die_with_parent()
    max_file_bytes = int(request.get("max_file_bytes") or 0)
    apply_limits(max_file_bytes)
    try:
        outcome = {"ok": True, "result": _run(request)}
    except Exception as exc:  # an EngineError (the user's to fix), out of memory, a library failure, or a bug
        traceback.print_exc(file=sys.stderr)
        outcome = {"ok": False, "error": _error(exc, request.get("op", ""), max_file_bytes)}
    result_path.write_text(json.dumps(outcome, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
