"""The engine's child-process entry: `python -m worker.engine.runner REQUEST.json`.

The worker runs every validation and quantization here, in a process with a cleaned environment
(no database URL, no keys), its own scratch folder and resource limits, so a hostile or runaway
model can be killed without touching the worker. Events go to stdout as JSON lines; the result
goes to the file named in the request.
"""

from __future__ import annotations

import json
import resource
import sys
import traceback
from pathlib import Path
from typing import Any

# The job error codes of API.md; the engine's finer codes are folded into them (and kept as `reason`).
JOB_ERROR_CODES = {"invalid_input", "unsupported", "timeout", "out_of_memory", "worker_lost", "internal"}
_FOLDED = {"dataset_mismatch": "invalid_input", "evaluation_failed": "invalid_input",
           "unsupported_format": "invalid_input", "nothing_to_quantize": "unsupported"}


def public_error(code: str, message: str) -> dict[str, str]:
    if code in JOB_ERROR_CODES:
        return {"code": code, "message": message}
    return {"code": _FOLDED.get(code, "invalid_input"), "message": message, "reason": code}


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


_OOM_MARKERS = ("bad_alloc", "failed to allocate memory", "can't allocate memory", "cannot allocate memory",
                "failed to map segment", "out of memory")


def _is_out_of_memory(exc: BaseException) -> bool:
    """Native libraries report an exhausted address space in their own words, not as MemoryError."""
    text = f"{exc.__class__.__name__} {exc}".lower()
    return isinstance(exc, MemoryError) or any(marker in text for marker in _OOM_MARKERS)


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


def _apply_limits() -> None:
    # No core dumps of user models. Memory is guarded by the supervisor, which watches resident memory:
    # an RLIMIT_AS cap makes torch and onnxruntime crash at import (they reserve address space they never use).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


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
                "metrics": result.metrics, "report": result.report}
    raise ValueError(f"unknown op {op!r}")


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[1]).read_text())
    result_path = Path(request["result_path"])
    die_with_parent()
    _apply_limits()
    from worker.engine.types import EngineError

    try:
        outcome = {"ok": True, "result": _run(request)}
    except EngineError as exc:
        code = "out_of_memory" if exc.__cause__ is not None and _is_out_of_memory(exc.__cause__) else exc.code
        outcome = {"ok": False, "error": public_error(code, str(exc))}
    except Exception as exc:  # out of memory, a bug, or an unexpected library failure
        traceback.print_exc(file=sys.stderr)
        if _is_out_of_memory(exc):
            outcome = {"ok": False, "error": {
                "code": "out_of_memory",
                "message": f"the job needed more memory than its limit allows ({str(exc)[:200]})"}}
        else:
            outcome = {"ok": False, "error": {"code": "internal", "message": f"{exc.__class__.__name__}: {exc}"}}
    result_path.write_text(json.dumps(outcome, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
