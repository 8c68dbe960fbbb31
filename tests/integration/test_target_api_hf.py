"""Issue 14 on hf weight_only through the API: a target job keeps layers at int8 in one compressed-tensors checkpoint,
and capabilities say what hf takes (target with perplexity, bits auto with a size budget only).

The model is the tiny Llama of tests/hf_models.py (plumbing, not language skill): int4 g32 keeps its next-token
logits at cosine ~0.987, so a 0.005 cosine target fails plain and holds with a few layers at int8.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from tests import hf_models
from tests.conftest import Service, wait_for
from tests.integration.helpers import download, submit, upload_dataset, upload_model


@pytest.fixture(scope="module")
def llama(service: Service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("target_hf")
    client = service.client("target-hf")
    model = upload_model(client, hf_models.tiny_llama_zip(tmp))
    assert model["status"] == "ready", model["error"]
    texts = upload_dataset(client, hf_models.write_text_dataset(tmp / "texts.jsonl", 16))
    return {"model_id": model["id"], "evaluation_dataset_id": texts["id"]}


def test_hf_target_keeps_layers_at_int8_and_delivers_that_checkpoint(service: Service, llama: dict[str, str],
                                                                     tmp_path: Path) -> None:
    client = service.client("target-hf")
    response = submit(client, {**llama, "method": "weight_only", "config": {
        "dtype": "int4", "group_size": 32, "target": {"metric": "cosine", "max_drop": 0.005}}})
    assert response.status_code == 202, response.text
    job = wait_for(client, f"/v1/jobs/{response.json()['id']}", until=("succeeded", "failed"), timeout=300)
    assert job["status"] == "succeeded", job["error"]
    metrics = job["metrics"]
    target, fidelity = metrics["target"], metrics["fidelity"]
    assert target["met"] and target["before"]["cosine"] < 0.995 <= fidelity["cosine"]
    assert target["kept_int8"] and metrics["sensitivity"]["suggested_reaches_goal"]
    int8 = {layer["name"] for layer in metrics["layers"] if layer["weight_dtype"] == "int8"}
    assert int8 == set(target["kept_int8"])
    assert target["cost"]["bytes_after"] == metrics["size"]["quantized_bytes"] > target["cost"]["bytes_before"]
    (artifact,) = [a for a in job["artifacts"] if a["kind"] == "model"]
    with zipfile.ZipFile(download(client, artifact, tmp_path / artifact["filename"])) as zf:
        groups = json.loads(zf.read("config.json"))["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [4, 8]
    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["hf_weight_only"]["kept_int8_for_target"] == target["kept_int8"]


def test_capabilities_offer_hf_targets_with_perplexity_and_refuse_a_latency_budget(
        service: Service, llama: dict[str, str]) -> None:
    client = service.client("target-hf")
    weight_only = client.get("/v1/capabilities").json()["formats"]["hf"]["methods"]["weight_only"]
    assert weight_only["supports_target"] and weight_only["supports_auto_bits"]
    assert set(weight_only["target_metrics"]) == {"accuracy", "top1_agreement", "cosine", "perplexity"}
    response = submit(client, {**llama, "method": "weight_only", "config": {"bits": "auto", "max_latency_ms": 5}})
    assert response.status_code == 422, response.text
    assert any("unpacked to float" in e["msg"] for e in response.json()["errors"])
