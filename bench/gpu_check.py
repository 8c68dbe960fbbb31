"""GPU check (not a test): the `gpu`-marked tests, then a small benchmark of the three CUDA paths, in one call.

Run on a machine with an NVIDIA GPU (compute capability 8.0+ for torch.export int4), from the repo root:

    make .venv/.installed
    .venv/bin/python -c "import torch; print(torch.__version__, torch.version.cuda)"   # must not print None
    # If it prints None (a CPU wheel, as pyproject's pin gets from the CPU index), put the CUDA build of the
    # same version in its place; pick the cuXYZ the driver supports (`nvidia-smi` shows its CUDA version):
    #   .venv/bin/pip install --force-reinstall --no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
    # (From PyPI itself, torch==2.13.0 on Linux x86-64 is already a CUDA build.)
    .venv/bin/python bench/gpu_check.py            # tests, then benchmark; ~3-5 min on an H200
    .venv/bin/python bench/gpu_check.py --bench    # benchmark only

It prints, per path: size ratio, cosine (mean / worst sample) against the float model, speed-up against the
float model on the same device at batch 1, and the engine's wall time; and writes bench/out/gpu_check.json.
QAT trains on cuda but delivers a CPU program: its latency is the CPU's (AOTInductor off here, to keep the
run short). The CPU paths are not run (`make bench-engine` does those).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import hf_models, models  # noqa: E402
from worker import engine  # noqa: E402
from worker.engine.torch_export.aoti import AOTI_ENV  # noqa: E402


class WideMLP(torch.nn.Module):
    """Four 4096x4096 Linear layers (256 MB of float32 weights): batch-1 decoding is bound by reading them."""

    def __init__(self, width: int = 4096, layers: int = 4) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return x


def _cases(tmp: Path) -> list[tuple[str, str, str, str, Path, dict[str, Any], dict[str, Path]]]:
    """(label, format, method, device, model, config, datasets)."""
    x_train, _, x_test, y_test = models.digits_data()
    example = torch.from_numpy(x_test[:2])
    digits_eval = models.save_npz(tmp / "digits_eval.npz", x=x_test, labels=y_test)
    cnn = models.save_torch_export(models.train_digits_cnn(), example, tmp / "cnn.pt2")
    training = models.save_npz(tmp / "digits_train.npz", x=x_train)
    mlp = models.save_torch_export(models.train_digits_mlp(), example, tmp / "mlp.pt2")
    torch.manual_seed(0)
    wide = models.save_torch_export(WideMLP().eval(), torch.randn(2, 4096), tmp / "wide.pt2")
    wide_eval = models.save_npz(tmp / "wide_eval.npz", x=np.random.default_rng(0).standard_normal(
        (32, 4096)).astype(np.float32))
    llama = hf_models.zip_folder(hf_models.tiny_llama_folder(tmp / "llama", hidden=1024, layers=4),
                                 tmp / "llama.zip")
    texts = hf_models.write_text_dataset(tmp / "texts.jsonl", 64)
    qat = {"epochs": 2, "batch_size": 64}
    int4 = {"dtype": "int4", "group_size": 128}
    return [
        ("digits CNN", "torch_export", "qat", "cuda", cnn, qat, {"training_path": training,
                                                                 "evaluation_path": digits_eval}),
        ("digits MLP", "torch_export", "weight_only", "cuda", mlp, {"dtype": "int4", "group_size": 32},
         {"evaluation_path": digits_eval}),
        ("MLP 4x4096", "torch_export", "weight_only", "cuda", wide, int4, {"evaluation_path": wide_eval}),
        ("MLP 4x4096 hqq", "torch_export", "weight_only", "cuda", wide, {**int4, "algorithm": "hqq"},
         {"evaluation_path": wide_eval}),
        ("llama h1024 x4", "hf", "weight_only", "cuda", llama, int4, {"evaluation_path": texts}),
        ("llama h1024 x4 gptq", "hf", "weight_only", "cuda", llama, {**int4, "algorithm": "gptq"},
         {"evaluation_path": texts, "calibration_path": texts}),
    ]


def _row(label: str, fmt: str, method: str, device: str, config: dict, result: Any, wall_s: float) -> dict:
    metrics = result.metrics
    latency, fidelity = metrics["latency"], metrics["fidelity"]
    return {"path": f"{fmt}/{method}", "model": label, "device": device, "config": config,
            "size_ratio": metrics["size"]["ratio"], "cosine": fidelity["cosine"], "cosine_min": fidelity["cosine_min"],
            "accuracy_delta": (metrics.get("accuracy") or {}).get("delta"),
            "speedup": latency["speedup"], "float_ms": latency["float_ms_p50"],
            "quantized_ms": latency["quantized_ms_p50"], "measured_on": latency["device"],
            "runtime": latency["runtime"], "wall_s": round(wall_s, 1), "warnings": metrics["warnings"]}


def bench() -> list[dict]:
    os.environ[AOTI_ENV] = "0"
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        tmp = Path(scratch)
        for label, fmt, method, device, model, config, datasets in _cases(tmp):
            start = time.perf_counter()
            try:
                result = engine.quantize(model, fmt, method, config, tmp / f"work-{len(rows)}", device=device,
                                         model_name="model", **datasets)
            except Exception as exc:  # report and go on: one failing path must not hide the others
                rows.append({"path": f"{fmt}/{method}", "model": label, "device": device,
                             "error": f"{type(exc).__name__}: {exc}"[:500]})
                print(f"FAILED {fmt}/{method} {label} on {device}: {rows[-1]['error']}", flush=True)
                continue
            rows.append(_row(label, fmt, method, device, config, result, time.perf_counter() - start))
            r = rows[-1]
            print(f"{r['path']:<26} {label:<20} {device:<4} size {r['size_ratio']:.3f}x  cosine {r['cosine']:.4f} "
                  f"(min {r['cosine_min']:.4f})  speed-up {r['speedup']:.2f}x on {r['measured_on']} "
                  f"({r['float_ms']:.3f} -> {r['quantized_ms']:.3f} ms)  wall {r['wall_s']} s", flush=True)
    return rows


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print(f"no CUDA here (torch {torch.__version__}, CUDA build: {torch.version.cuda}); see this script's "
              "header for installing the CUDA build of torch", file=sys.stderr)
        return 2
    major, minor = torch.cuda.get_device_capability(0)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)} "
          f"(sm{major}{minor})", flush=True)
    status = 0
    if "--bench" not in argv:
        status = subprocess.call([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
                                 cwd=ROOT)
        print(f"pytest -m gpu: exit {status}", flush=True)
    rows = bench()
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                                    "pytest_exit": status, "rows": rows}, indent=2))
    print(f"wrote {out / 'gpu_check.json'}")
    return status or int(any("error" in r for r in rows))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
