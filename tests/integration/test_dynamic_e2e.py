"""Upload -> dynamic job -> poll -> download -> load in its runtime, for each format, on PG + Redis + Celery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests import models
from tests.conftest import Service, wait_for
from tests.integration.helpers import download, submit, upload_dataset, upload_model


def _float_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _run_quantized(fmt: str, path: Path, x: np.ndarray) -> np.ndarray:
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        if fmt == "torchscript":
            return torch.jit.load(str(path))(torch.from_numpy(x)).numpy()
        return torch.export.load(str(path)).module()(torch.from_numpy(x)).numpy()


def _save(fmt: str, model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    if fmt == "onnx":
        return models.export_onnx(model, example, path)
    if fmt == "torchscript":
        return models.save_torchscript(model, example, path)
    return models.save_torch_export(model, example, path)


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("torchscript", ".pt"), ("torch_export", ".pt2")])
def test_dynamic_job_gives_smaller_model_close_to_float(any_service: Service, tmp_path: Path, fmt: str,
                                                        suffix: str) -> None:
    mlp = models.train_digits_mlp()
    _, _, x_test, y_test = models.digits_data()
    model_path = _save(fmt, mlp, torch.from_numpy(x_test[:2]), tmp_path / f"digits-mlp{suffix}")
    eval_path = models.save_npz(tmp_path / "eval.npz", x=x_test, labels=y_test)

    client = any_service.client()  # the local folder and an S3 store
    model = upload_model(client, model_path)
    assert model["status"] == "ready", model["error"]
    assert model["format"] == fmt
    dataset = upload_dataset(client, eval_path)
    assert dataset["status"] == "ready", dataset["error"]
    assert dataset["num_samples"] == len(x_test) and dataset["has_labels"]

    response = submit(client, {"model_id": model["id"], "method": "dynamic",
                               "evaluation_dataset_id": dataset["id"]})
    assert response.status_code == 202, response.text
    job = wait_for(client, f"/v1/jobs/{response.json()['id']}", until=("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1 and job["progress"] == 1.0

    metrics = job["metrics"]
    print(f"\n{fmt}: job {job['duration_s']} s, size {metrics['size']}, latency {metrics['latency']}, "
          f"accuracy {metrics['accuracy']}")  # the numbers behind a closing note (pytest -s)
    assert metrics["size"]["ratio"] <= 0.30, metrics["size"]
    assert metrics["fidelity"]["source"] == "evaluation"
    assert metrics["fidelity"]["top1_agreement"] >= 0.95
    assert metrics["accuracy"]["metric"] == "top1"
    assert abs(metrics["accuracy"]["delta"]) <= 0.03
    assert metrics["latency"]["float_ms_p50"] > 0 and metrics["latency"]["quantized_ms_p50"] > 0
    assert any(layer["weight_dtype"] == "int8" for layer in metrics["layers"])

    kinds = {a["kind"]: a for a in job["artifacts"]}
    assert set(kinds) >= {"model", "report"}
    artifact_path = download(client, kinds["model"], tmp_path / kinds["model"]["filename"])
    assert artifact_path.stat().st_size <= 0.30 * model_path.stat().st_size
    quantized = _run_quantized(fmt, artifact_path, x_test)
    reference = _float_logits(mlp, x_test)
    agreement = float(np.mean(quantized.argmax(1) == reference.argmax(1)))
    assert agreement >= 0.95
    assert np.corrcoef(quantized.ravel(), reference.ravel())[0, 1] > 0.99

    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["metrics"]["size"] == metrics["size"]
    assert report["config"]["granularity"] == "per_channel"

    log_lines = client.get(f"/v1/jobs/{job['id']}/logs").text.splitlines()
    assert log_lines and '"queued' in log_lines[0] and "succeeded" in log_lines[-1]
