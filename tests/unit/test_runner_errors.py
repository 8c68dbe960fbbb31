"""The engine process reports what really happened: the whole exception chain, one meaning per error code."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT
from worker.engine import runner
from worker.engine.errors import EngineError


def _raised(make) -> BaseException:
    try:
        make()
    except BaseException as exc:  # noqa: BLE001 - the test wants whatever was raised
        return exc
    raise AssertionError("nothing was raised")


def _wrapped_from_none(inner: BaseException, message: str = "PT2E static quantization failed") -> BaseException:
    """What the handlers do: `raise EngineError(...) from None` inside `except`, which keeps __context__."""
    def make() -> None:
        try:
            raise inner
        except Exception:
            raise EngineError(message, code="unsupported") from None
    return _raised(make)


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.cuda.OutOfMemoryError, which the runner matches by class name."""


def test_the_chain_is_walked_through_cause_and_context_and_survives_a_cycle() -> None:
    first, second = ValueError("first"), KeyError("second")
    first.__context__, second.__cause__ = second, first  # a cycle
    assert list(runner.exception_chain(first)) == [first, second]


@pytest.mark.parametrize("inner,reason", [
    (MemoryError(), "memory_error"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes"),
     "allocation_failed"),
    (OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "cuda_out_of_memory"),
])
def test_out_of_memory_hidden_behind_raise_from_none_is_out_of_memory(inner: BaseException, reason: str) -> None:
    error = runner._error(_wrapped_from_none(inner), "quantize", 0)
    assert error["code"] == "out_of_memory" and error["reason"] == reason
    assert type(inner).__name__ in error["message"] and "PT2E static quantization failed" in error["message"]


def test_an_engine_errors_explicit_cause_is_kept_in_the_message() -> None:
    def make() -> None:
        try:
            raise ValueError("weights of layer fc1 are NaN")
        except ValueError as exc:
            raise EngineError("calibration failed", code="evaluation_failed") from exc
    error = runner._error(_raised(make), "quantize", 0)
    assert error == {"code": "invalid_input", "reason": "evaluation_failed",
                     "message": "calibration failed (cause: ValueError: weights of layer fc1 are NaN)"}


def test_a_cause_already_in_the_message_is_not_repeated() -> None:
    exc = _wrapped_from_none(ValueError("op Foo is not supported"), "quantizer failed: ValueError: op Foo is not "
                                                                    "supported")
    assert runner._error(exc, "quantize", 0)["message"] == "quantizer failed: ValueError: op Foo is not supported"


def test_a_library_exception_during_quantize_is_engine_error_with_versions() -> None:
    error = runner._error(RuntimeError("Trying to create tensor with negative dimension -1"), "quantize", 0)
    assert error["code"] == "engine_error" and error["reason"] == "library_failure"
    assert "RuntimeError: Trying to create tensor with negative dimension -1" in error["message"]
    assert "onnxruntime " in error["message"] and "python " in error["message"]


def test_an_unexpected_exception_outside_quantize_is_internal() -> None:
    error = runner._error(KeyError("path"), "inspect_model", 0)
    assert error["code"] == "internal" and error["reason"] is None


def test_engine_codes_fold_into_public_codes_and_keep_the_fine_one_as_reason() -> None:
    assert runner.public_error("dataset_mismatch", "m") == {"code": "invalid_input", "message": "m",
                                                            "reason": "dataset_mismatch"}
    assert runner.public_error("engine_error", "m")["code"] == "engine_error"
    assert runner.JOB_ERROR_CODES == {"invalid_input", "unsupported", "engine_error", "target_not_met", "timeout",
                                      "out_of_memory", "worker_lost", "internal"}


def test_readme_explains_every_job_error_code() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### When a job fails"):]
    for code in runner.JOB_ERROR_CODES:
        assert f"| `{code}` |" in section, code


def _run_runner(tmp_path: Path, body: str, max_file_bytes: int) -> dict:
    """runner.main in a real child (rlimits are per process), with `_run` replaced by `body`."""
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"op": "quantize", "result_path": str(tmp_path / "result.json"),
                                   "max_file_bytes": max_file_bytes}))
    script = "\n".join(["import sys", "from worker.engine import runner", "def _run(request):",
                         textwrap.indent(textwrap.dedent(body), "    "), "runner._run = _run",
                         f"sys.exit(runner.main(['runner', {str(request)!r}]))"])
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads((tmp_path / "result.json").read_text())


def test_a_file_past_the_size_limit_fails_cleanly_as_file_too_large(tmp_path: Path) -> None:
    outcome = _run_runner(tmp_path, """
        with open("big.bin", "wb") as fh:
            fh.write(b"0" * 300_000)
        return {}
    """, max_file_bytes=100_000)
    assert outcome["ok"] is False
    assert outcome["error"]["code"] == "unsupported" and outcome["error"]["reason"] == "file_too_large"
    assert "100000 bytes (QUANTSERVE_MAX_ARTIFACT_BYTES)" in outcome["error"]["message"]
    assert (tmp_path / "big.bin").stat().st_size <= 100_000


def test_the_child_runs_under_the_limits_it_was_given(tmp_path: Path) -> None:
    outcome = _run_runner(tmp_path, """
        import resource
        return {name: list(resource.getrlimit(getattr(resource, name)))
                for name in ("RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE")}
    """, max_file_bytes=1 << 30)
    limits = outcome["result"]
    assert limits["RLIMIT_FSIZE"] == [1 << 30, 1 << 30]
    assert limits["RLIMIT_NOFILE"][0] <= runner.MAX_OPEN_FILES
    assert limits["RLIMIT_NOFILE"][0] == min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], runner.MAX_OPEN_FILES)
    assert limits["RLIMIT_CORE"] == [0, 0]
