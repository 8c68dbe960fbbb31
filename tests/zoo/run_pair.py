"""One zoo model through one quantizer, in a child process with its own empty CWD and TMPDIR.

`outcome(model, variant)` (the parent side) runs `python -m tests.zoo.run_pair MODEL VARIANT FOLDER` once
and caches FOLDER/outcome.json; the child writes its artifact under FOLDER/work. A native crash then fails
one pair, not the whole run, and whatever the quantizer leaves in FOLDER/cwd or FOLDER/tmp is listed in
the outcome's `leftovers` (the machine's own /tmp is shared with other processes; this one is not).

Variants: the engine's methods (`dynamic`, `static`, `weight_only`, ...) through `worker.engine.quantize`
with CONFIGS below, and onnxruntime.quantization used directly: `ort_dynamic` (quantize_dynamic with its
defaults), `ort_static` (quantize_static with its defaults) and `ort_best`, the best a user gets from the
library by hand (ENGINE.md, "Models you did not export yourself"): onnx.version_converter to opset 13 where
lower, quant_pre_process (which folds Constant-node weights into initializers; symbolic shape inference
first, skip_symbolic_shape=True when it fails), then quantize_static per-channel. Issue 12 measures the
engine's static int8 against it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from tests.zoo import corpus
from tests.zoo.corpus import MODELS, ZooModel

# One config per engine method: the defaults, int4 for weight-only (what issue 12 asks of it), and method auto's
# whole default sweep (issue 14: every candidate the registry allows for the model and its data).
CONFIGS: dict[str, dict[str, Any]] = {"dynamic": {}, "static": {}, "weight_only": {"dtype": "int4"}, "qat": {},
                                      "auto": {}}
ORT_VARIANTS = ("ort_dynamic", "ort_static", "ort_best")
REPO = Path(__file__).resolve().parents[2]
# Written by `import onnxruntime` itself into TMPDIR (51 bytes: a timestamp and a session uuid, reused by
# every later process): the runtime's, not a job's scratch file.
RUNTIME_FILES = {"tmp/.ses"}


def folder(model: ZooModel, variant: str) -> Path:
    return corpus.cache_dir() / "runs" / model.name / variant


def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.is_dir() else []


def outcome(model: ZooModel, variant: str, *, fresh: bool = False, timeout_s: int = 1800) -> dict[str, Any]:
    """The cached outcome of (model, variant), running it first if needed (or if fresh)."""
    root = folder(model, variant)
    result_path = root / "outcome.json"
    if result_path.is_file() and not fresh:
        return json.loads(result_path.read_text())
    shutil.rmtree(root, ignore_errors=True)
    for sub in ("cwd", "tmp", "work"):
        (root / sub).mkdir(parents=True)
    env = {**os.environ, "TMPDIR": str(root / "tmp"), "TEMP": str(root / "tmp"), "TMP": str(root / "tmp"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "tests.zoo.run_pair", model.name, variant, str(root)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=root / "cwd", env=env, capture_output=True, text=True, timeout=timeout_s)
        returncode, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired as exc:
        returncode, stderr = None, (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) \
            else (exc.stderr or "")
    (root / "stderr.txt").write_text(stderr)
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        why = f"timed out after {timeout_s} s" if returncode is None else f"the process died (exit {returncode})"
        result = {"model": model.name, "variant": variant, "ok": False, "seconds": time.perf_counter() - start,
                  "error": {"type": "crash", "code": None, "message": f"{why}: {stderr.strip()[-1500:]}"}}
    found = [f"cwd/{p}" for p in _files_under(root / "cwd")] + [f"tmp/{p}" for p in _files_under(root / "tmp")]
    result["leftovers"] = [p for p in found if p not in RUNTIME_FILES]
    result_path.write_text(json.dumps(result, indent=1, default=str))
    return result


# ---- the child ----------------------------------------------------------------------------------------

def _engine(model: ZooModel, method: str, work: Path) -> dict[str, Any]:
    from worker import engine

    result = engine.quantize(corpus.model_path(model), model.format, method, CONFIGS[method], work,
                             calibration_path=corpus.calibration_path(model),
                             evaluation_path=corpus.evaluation_path(model), model_name=model.name)
    artifacts = [{"kind": a.kind, "path": str(a.path), "filename": a.filename, "format": a.format}
                 for a in result.artifacts]
    return {"artifacts": artifacts, "metrics": result.metrics}


class _Reader:
    """onnxruntime's CalibrationDataReader over the zoo's calibration set."""

    def __init__(self, model: ZooModel, source: Path) -> None:
        from tests.zoo.measure import OnnxRunner, sample_feeds

        self.feeds = iter(sample_feeds(corpus.calibration_path(model), OnnxRunner(source).ranks))

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def _pre_process(source: Path, out: Path, notes: list[str]) -> Path:
    """quant_pre_process as a user would try it: plain, then without symbolic shape inference."""
    from onnxruntime.quantization import quant_pre_process

    for options in ({}, {"skip_symbolic_shape": True}):
        label = "pre_process" + (" skip_symbolic_shape" if options else "")
        try:
            quant_pre_process(str(source), str(out), **options)
        except Exception as exc:  # noqa: BLE001 - which step fails is part of the finding
            notes.append(f"{label} failed: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        notes.append(label)
        return out
    return source


def _ort(model: ZooModel, variant: str, work: Path) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    source, notes = corpus.model_path(model), []
    out = work / f"{variant}.onnx"
    if variant == "ort_dynamic":
        quantize_dynamic(source, out)
    elif variant == "ort_static":
        quantize_static(source, out, _Reader(model, source))
    elif variant == "ort_best":
        proto = onnx.load(str(source))
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        if opset < 13:
            from onnx import version_converter

            converted = work / "opset13.onnx"
            onnx.save(version_converter.convert_version(proto, 13), str(converted))
            notes.append(f"opset {opset} -> 13")
            source = converted
        source = _pre_process(source, work / "preprocessed.onnx", notes)
        quantize_static(source, out, _Reader(model, source), per_channel=True)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return {"artifacts": [{"kind": "model", "path": str(out), "filename": out.name, "format": "onnx"}],
            "metrics": {}, "notes": notes}


def _child(name: str, variant: str, root: Path) -> None:
    model, work = MODELS[name], root / "work"
    result: dict[str, Any] = {"model": name, "variant": variant}
    start = time.perf_counter()
    try:
        body = _ort(model, variant, work) if variant in ORT_VARIANTS else _engine(model, variant, work)
        result.update(ok=True, **body)
    except Exception as exc:  # every failure is the finding: record its type, code and message
        result.update(ok=False, error={"type": type(exc).__name__, "code": getattr(exc, "code", None),
                                       "message": str(exc), "traceback": traceback.format_exc()[-4000:]})
    result["seconds"] = round(time.perf_counter() - start, 2)
    (root / "outcome.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
