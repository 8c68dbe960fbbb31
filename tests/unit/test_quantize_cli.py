"""`quantserve quantize` runs the engine on a local file and writes the artifact and report.json."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from tests import models


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", "quantize", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_quantize_cli_writes_artifact_and_report(tmp_path: Path) -> None:
    _, _, x, y = models.digits_data()
    model = models.export_onnx(models.train_digits_mlp(), torch.from_numpy(x[:2]), tmp_path / "mlp.onnx")
    evaluation = models.save_npz(tmp_path / "eval.npz", x=x[:100], labels=y[:100])
    run = _cli(model, "--method", "dynamic", "--evaluation", evaluation, "-o", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    artifact, report_path = (Path(line) for line in run.stdout.split())
    report = json.loads(report_path.read_text())
    assert report["metrics"]["fidelity"]["source"] == "evaluation"
    assert report["metrics"]["size"]["ratio"] <= 0.30
    out = ort.InferenceSession(str(artifact)).run(None, {"x": x[:10]})[0]
    assert np.mean(out.argmax(1) == y[:10]) >= 0.7
    assert "size" in run.stderr and "latency" in run.stderr


def test_quantize_cli_refuses_a_pickle_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(pickle.dumps({"w": 1}))
    run = _cli(tmp_path / "model.pt", "--method", "dynamic", "-o", tmp_path / "out")
    assert run.returncode == 2 and "pickle" in run.stderr
    run = _cli(tmp_path / "model.pt", "--method", "dynamic", "--config", "{bad", "-o", tmp_path / "out")
    assert run.returncode == 2


def test_quantize_cli_takes_a_hugging_face_folder_in_place(tmp_path: Path) -> None:
    from tests import hf_models

    folder = hf_models.tiny_llama_folder(tmp_path / "tiny-llama")
    texts = hf_models.write_text_dataset(tmp_path / "texts.jsonl", 8)
    run = _cli(folder, "--method", "weight_only", "--config", '{"dtype": "int4", "group_size": 32}',
               "--evaluation", texts, "-o", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    artifact, report_path = (Path(line) for line in run.stdout.split())
    assert artifact.name == "tiny-llama.int4.zip"
    report = json.loads(report_path.read_text())
    assert report["format"] == "hf" and report["metrics"]["perplexity"]["tokens"] > 0
    assert "perplexity" in run.stderr
    run = _cli(tmp_path / "out", "--method", "weight_only", "-o", tmp_path / "again")  # no config.json there
    assert run.returncode == 2 and "not a Hugging Face folder" in " ".join(run.stderr.split())  # rich wraps lines


def test_quantize_cli_without_the_worker_extra_says_what_to_install(tmp_path: Path) -> None:
    # A real virtualenv with the API's dependencies only, as the API image has: no torch, no rich.
    import os
    import shutil

    root = Path(__file__).resolve().parents[2]
    source = tmp_path / "src"
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build", "tests"))
    env = tmp_path / "api-only"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=120)
    install = subprocess.run([str(env / "bin" / "pip"), "install", "-q", str(source)], capture_output=True,
                             text=True, timeout=600, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert install.returncode == 0, install.stderr[-2000:]
    check = subprocess.run([str(env / "bin" / "python"), "-c", "import torch"], capture_output=True)
    assert check.returncode != 0  # really without the worker extra
    run = subprocess.run([str(env / "bin" / "quantserve"), "quantize", str(tmp_path / "model.onnx"), "--method",
                          "dynamic", "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "pip install 'quantserve[worker]'" in run.stderr and "Traceback" not in run.stderr
    listed = subprocess.run([str(env / "bin" / "quantserve"), "--help"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "quantize" in listed.stdout
