"""Every method is reachable through the API with the fields of API.md, on a real worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import models
from tests.conftest import Service, wait_for
from tests.integration.helpers import submit, upload_dataset, upload_model


@pytest.fixture(scope="module")
def digits_sets(service: Service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("methods")
    x_train, y_train, x_test, y_test = models.digits_data()
    client = service.client("methods")
    return {
        "calibration": upload_dataset(client, models.save_npz(tmp / "cal.npz", x=x_train[:128]))["id"],
        "training": upload_dataset(client, models.save_npz(tmp / "train.npz", x=x_train[:512]))["id"],
        "evaluation": upload_dataset(client, models.save_npz(tmp / "eval.npz", x=x_test, labels=y_test))["id"],
    }


def _run(service: Service, model_path: Path, body: dict) -> dict:
    client = service.client("methods")
    model = upload_model(client, model_path)
    assert model["status"] == "ready", model["error"]
    response = submit(client, {"model_id": model["id"], **body})
    assert response.status_code == 202, response.text
    job = wait_for(client, f"/v1/jobs/{response.json()['id']}", until=("succeeded", "failed"), timeout=300)
    assert job["status"] == "succeeded", job["error"]
    return job


def test_onnx_static_with_calibration_through_the_api(service: Service, digits_sets: dict, tmp_path: Path) -> None:
    cnn = models.train_wide_digits_cnn()
    path = models.export_onnx(cnn, torch.zeros(2, 1, 8, 8), tmp_path / "cnn.onnx")
    job = _run(service, path, {"method": "static", "calibration_dataset_id": digits_sets["calibration"],
                               "evaluation_dataset_id": digits_sets["evaluation"],
                               "config": {"calibration": {"algorithm": "entropy", "num_samples": 64}}})
    assert job["config"]["calibration"] == {"algorithm": "entropy", "percentile": 99.999, "num_samples": 64}
    metrics = job["metrics"]
    assert metrics["size"]["ratio"] <= 0.30
    assert metrics["accuracy"]["delta"] >= -0.01
    assert any(layer["op"] == "Conv" and layer["weight_dtype"] == "int8" for layer in metrics["layers"])


def test_onnx_weight_only_int4_through_the_api(service: Service, tmp_path: Path) -> None:
    transformer = models.linear_heavy_transformer()
    path = models.export_onnx(transformer, torch.from_numpy(models.token_ids(2)), tmp_path / "lm.onnx")
    job = _run(service, path, {"method": "weight_only", "config": {"dtype": "int4", "group_size": 128}})
    assert job["metrics"]["size"]["ratio"] <= 0.20
    assert job["metrics"]["fidelity"]["cosine"] >= 0.95


@pytest.mark.parametrize("config,field", [
    ({"dtype": "int4", "algorithm": "gptq"}, ["body", "calibration_dataset_id"]),
    ({"dtype": "int4", "algorithm": "awq"}, ["body", "config", "algorithm"]),
    ({"dtype": "int4", "group_size": -1}, ["body", "config", "group_size"]),
    ({"dtype": "int8", "algorithm": "hqq"}, ["body", "config", "algorithm"]),
])
def test_weight_only_options_onnx_cannot_do_are_422(service: Service, tmp_path: Path, config: dict,
                                                    field: list) -> None:
    client = service.client("methods")
    path = models.export_onnx(models.wide_mlp(), torch.zeros(2, 1, 8, 8), tmp_path / "w.onnx")
    model = upload_model(client, path)
    response = submit(client, {"model_id": model["id"], "method": "weight_only", "config": config})
    assert response.status_code == 422, response.text
    assert field in [e["loc"] for e in response.json()["errors"]]


def test_torch_export_static_delivers_int8_program_and_compiled_package(service: Service, digits_sets: dict,
                                                                        tmp_path: Path) -> None:
    path = models.save_torch_export(models.train_wide_digits_cnn(), torch.zeros(2, 1, 8, 8), tmp_path / "cnn.pt2")
    job = _run(service, path, {"method": "static", "calibration_dataset_id": digits_sets["calibration"],
                               "evaluation_dataset_id": digits_sets["evaluation"]})
    kinds = {a["kind"]: a for a in job["artifacts"]}
    assert {"model", "report"} <= set(kinds)
    assert kinds["model"]["filename"].endswith(".int8.pt2")
    assert job["metrics"]["size"]["ratio"] <= 0.30
    assert job["metrics"]["accuracy"]["delta"] >= -0.01
    if "compiled_model" not in kinds:  # the package is optional only where compiling failed, and then it says so
        assert any("AOTInductor" in w for w in job["metrics"]["warnings"])


def test_torchscript_static_through_the_api(service: Service, digits_sets: dict, tmp_path: Path) -> None:
    path = models.save_torchscript(models.train_wide_digits_cnn(), torch.zeros(2, 1, 8, 8), tmp_path / "cnn.pt")
    job = _run(service, path, {"method": "static", "calibration_dataset_id": digits_sets["calibration"],
                               "evaluation_dataset_id": digits_sets["evaluation"]})
    assert job["metrics"]["size"]["ratio"] <= 0.30
    assert job["metrics"]["accuracy"]["delta"] >= -0.01


def test_qat_with_distillation_and_no_labels_through_the_api(service: Service, digits_sets: dict,
                                                             tmp_path: Path) -> None:
    path = models.save_torch_export(models.train_wide_digits_cnn(), torch.zeros(2, 1, 8, 8), tmp_path / "cnn.pt2")
    job = _run(service, path, {"method": "qat", "training_dataset_id": digits_sets["training"],
                               "evaluation_dataset_id": digits_sets["evaluation"],
                               "config": {"epochs": 1, "batch_size": 64}})
    assert job["config"]["loss"] == "distillation"
    assert job["metrics"]["accuracy"]["delta"] >= -0.02
    logs = service.client("methods").get(f"/v1/jobs/{job['id']}/logs").text
    assert "epoch" in logs


def test_cross_entropy_qat_on_a_dataset_without_labels_is_422(service: Service, digits_sets: dict,
                                                              tmp_path: Path) -> None:
    client = service.client("methods")
    path = models.save_torch_export(models.train_digits_cnn(), torch.zeros(2, 1, 8, 8), tmp_path / "cnn.pt2")
    model = upload_model(client, path)
    response = submit(client, {"model_id": model["id"], "method": "qat", "training_dataset_id": digits_sets["training"],
                               "config": {"loss": "cross_entropy", "epochs": 1}})
    assert response.status_code == 422 and response.json()["code"] == "dataset_mismatch", response.text
    assert "labels" in response.json()["detail"]


def test_torch_export_weight_only_int4_through_the_api(service: Service, digits_sets: dict, tmp_path: Path) -> None:
    path = models.save_torch_export(models.train_digits_mlp(), torch.zeros(2, 1, 8, 8), tmp_path / "mlp.pt2")
    job = _run(service, path, {"method": "weight_only", "evaluation_dataset_id": digits_sets["evaluation"],
                               "config": {"dtype": "int4", "group_size": 32}})
    assert job["metrics"]["size"]["ratio"] <= 0.25
    assert job["metrics"]["fidelity"]["top1_agreement"] >= 0.9
    if job["metrics"]["latency"]["speedup"] < 1:
        assert any("slower" in w for w in job["metrics"]["warnings"])


def test_hf_weight_only_int4_with_a_text_dataset_through_the_api(service: Service, tmp_path: Path) -> None:
    import zipfile

    from tests import hf_models
    from tests.integration.helpers import download

    client = service.client("methods")
    model = upload_model(client, hf_models.tiny_llama_zip(tmp_path))
    assert (model["status"], model["format"], model["architecture"]) == ("ready", "hf", "LlamaForCausalLM"), model
    assert [i["name"] for i in model["inputs"]] == ["input_ids", "attention_mask"]
    assert [i["optional"] for i in model["inputs"]] == [False, True]
    texts = upload_dataset(client, hf_models.write_text_dataset(tmp_path / "texts.jsonl", 16))
    assert (texts["status"], texts["kind"], texts["num_samples"]) == ("ready", "text", 16), texts

    refused = submit(client, {"model_id": model["id"], "method": "weight_only", "config": {"algorithm": "awq"}})
    assert refused.status_code == 422
    assert ["body", "config", "algorithm"] in [e["loc"] for e in refused.json()["errors"]]

    response = submit(client, {"model_id": model["id"], "method": "weight_only", "evaluation_dataset_id": texts["id"],
                               "config": {"dtype": "int4", "group_size": 64}})
    assert response.status_code == 202, response.text
    job = wait_for(client, f"/v1/jobs/{response.json()['id']}", until=("succeeded", "failed"), timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["perplexity"]["source"] == "evaluation"
    assert job["metrics"]["fidelity"]["samples"] == 16
    (artifact,) = [a for a in job["artifacts"] if a["kind"] == "model"]
    assert artifact["format"] == "hf" and artifact["filename"].endswith(".int4.zip")
    with zipfile.ZipFile(download(client, artifact, tmp_path / artifact["filename"])) as zf:
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(zf.namelist())
    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    assert "from_pretrained" in report["loader"]
