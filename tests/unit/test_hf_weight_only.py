"""hf weight_only: llm-compressor int4/int8 into a compressed-tensors folder, checked by loading it again."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import hf_models
from worker.engine import EngineError, inspect_model, quantize
from worker.engine.errors import UnsupportedModelError


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_models.tiny_llama_zip(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_models.write_text_dataset(tmp_path_factory.mktemp("texts") / "eval.jsonl", 24)


@pytest.fixture(scope="module")
def int4(llama: Path, texts: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - QuantizeResult
    return quantize(llama, "hf", "weight_only", {"dtype": "int4", "group_size": 32},
                    tmp_path_factory.mktemp("int4"), evaluation_path=texts)


def _unzip(archive: Path, dest: Path) -> Path:
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest)
    return dest


def _logits(folder: Path, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder), **kwargs).eval()
    with torch.inference_mode():
        return model(input_ids=ids).logits.flatten()


def test_inspect_reads_architecture_and_parameters_without_running_code(llama: Path, tmp_path: Path) -> None:
    info = inspect_model(llama, "hf")
    assert info.architecture == "LlamaForCausalLM"
    assert [s.name for s in info.inputs] == ["input_ids", "attention_mask"]
    assert info.outputs[0].name == "next_token_logits" and info.outputs[0].shape == ["batch", 400]
    folder = hf_models.tiny_llama_folder(tmp_path / "again")
    from transformers import LlamaForCausalLM

    assert info.num_parameters == sum(p.numel() for p in LlamaForCausalLM.from_pretrained(str(folder)).parameters())


def test_inspect_streams_a_tar_gz_and_refuses_a_damaged_header(tmp_path: Path) -> None:
    import tarfile

    folder = hf_models.tiny_llama_folder(tmp_path / "m", tokenizer=False)
    archive = tmp_path / "m.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="tiny-llama")
    assert inspect_model(archive, "hf").architecture == "LlamaForCausalLM"
    (folder / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(EngineError, match="not a safetensors file"):
        inspect_model(hf_models.zip_folder(folder, tmp_path / "bad.zip"), "hf")


@pytest.mark.parametrize("change,message", [
    ({"auto_map": {"AutoModel": "evil.EvilModel"}}, "custom code"),
    ({"architectures": ["EvilModelForCausalLM"]}, "not a model class"),
    ({"architectures": ["__import__"]}, "not a model class"),
    ({"quantization_config": {"quant_method": "gptq"}}, "already quantized"),
])
def test_configs_that_would_need_foreign_code_or_are_quantized_are_refused(
        tmp_path: Path, change: dict, message: str) -> None:
    folder = hf_models.tiny_llama_folder(tmp_path / "m", tokenizer=False)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    archive = hf_models.zip_folder(folder, tmp_path / "m.zip")
    with pytest.raises(UnsupportedModelError, match=message):
        inspect_model(archive, "hf")


def test_int4_checkpoint_is_packed_smaller_and_reloads_close_to_float(int4, llama: Path, tmp_path: Path) -> None:
    (artifact,) = int4.artifacts
    assert artifact.format == "hf" and artifact.filename.endswith(".int4.zip")
    folder = _unzip(artifact.path, tmp_path / "q")
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    weights = next(iter(qconfig["config_groups"].values()))["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"]) == (4, "group", 32)
    assert (folder / "tokenizer.json").is_file()  # the upload's tokenizer travels with the model

    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.up_proj.weight_packed")
    assert "model.layers.0.mlp.up_proj.weight" not in keys
    assert packed.dtype == torch.int32 and packed.numel() == 256 * 128 // 8  # eight int4 values per int32
    assert "lm_head.weight" in keys  # the output head stays float

    float_folder = _unzip(llama, tmp_path / "f")
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 400, size=(2, 24)))
    from transformers import CompressedTensorsConfig

    f = _logits(float_folder, ids)
    q = _logits(folder, ids, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert torch.nn.functional.cosine_similarity(f, q, dim=0) > 0.95
    assert not torch.equal(f, q)


def test_the_reports_loader_snippet_runs(int4, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (artifact,) = int4.artifacts
    _unzip(artifact.path, tmp_path / artifact.filename.removesuffix(".zip"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(int4.report["loader"], namespace)  # our own generated snippet, as a user would paste it
    model = namespace["model"]
    assert not any("forward" in vars(m) for m in model.modules() if getattr(m, "quantization_scheme", None))
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, 400, size=(1, 12)))
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_int4_metrics_say_what_was_done(int4) -> None:
    metrics = int4.metrics
    assert metrics["size"]["ratio"] < 0.5  # embeddings and the head stay float; every Linear is int4
    layers = {layer["name"]: layer for layer in metrics["layers"]}
    assert layers["lm_head"]["weight_dtype"] == "float32" and layers["lm_head"]["sqnr_db"] is None
    blocks = [layer for name, layer in layers.items() if name != "lm_head"]
    assert len(blocks) == 14 and all(layer["weight_dtype"] == "int4" for layer in blocks)
    assert all(15 < layer["sqnr_db"] < 40 for layer in blocks)
    assert metrics["fidelity"]["source"] == "evaluation" and metrics["fidelity"]["samples"] == 24
    ppl = metrics["perplexity"]
    assert ppl["tokens"] > 100 and ppl["quantized"] != ppl["float"]
    assert any("vLLM" in w for w in metrics["warnings"])
    assert "CompressedTensorsConfig(dequantize=True)" in int4.report["loader"]


def test_int8_per_channel_is_more_faithful_than_int4(llama: Path, texts: Path, int4, tmp_path: Path) -> None:
    int8 = quantize(llama, "hf", "weight_only", {"dtype": "int8", "granularity": "per_channel"}, tmp_path,
                    evaluation_path=texts)
    layers = {layer["name"]: layer for layer in int8.metrics["layers"] if layer["sqnr_db"] is not None}
    layers4 = {layer["name"]: layer for layer in int4.metrics["layers"] if layer["sqnr_db"] is not None}
    assert all(layers[name]["sqnr_db"] > layers4[name]["sqnr_db"] + 10 for name in layers4)
    assert int8.metrics["fidelity"]["sqnr_db"] > int4.metrics["fidelity"]["sqnr_db"]
    assert int4.metrics["size"]["quantized_bytes"] < int8.metrics["size"]["quantized_bytes"]


def test_bfloat16_model_with_a_tied_head_keeps_its_dtype(tmp_path: Path, texts: Path) -> None:
    archive = hf_models.zip_folder(hf_models.tiny_llama_folder(tmp_path / "m", bf16_tied_gqa=True), tmp_path / "m.zip")
    result = quantize(archive, "hf", "weight_only", {"dtype": "int4", "group_size": 32}, tmp_path / "w",
                      evaluation_path=texts)
    layers = {layer["name"]: layer for layer in result.metrics["layers"]}
    assert (layers["lm_head"]["weight_dtype"], layers["lm_head"]["activation_dtype"]) == ("bfloat16", "bfloat16")
    assert layers["model.layers.0.self_attn.k_proj"]["weight_dtype"] == "int4"  # 64 outputs: 2 kv heads
    assert result.metrics["fidelity"]["cosine"] > 0.95 and result.metrics["perplexity"]["tokens"] > 100


def test_a_classifier_with_labelled_texts_gets_accuracy(tmp_path: Path) -> None:
    labelled = hf_models.write_text_dataset(tmp_path / "labelled.jsonl", 16, labels=True)
    archive = hf_models.tiny_bert_classifier_zip(tmp_path)
    assert inspect_model(archive, "hf").outputs[0].shape == ["batch", "labels"]
    result = quantize(archive, "hf", "weight_only", {"dtype": "int8", "granularity": "per_channel"},
                      tmp_path / "w", evaluation_path=labelled)
    metrics = result.metrics
    assert metrics["accuracy"]["metric"] == "top1" and metrics["fidelity"]["top1_agreement"] >= 0.9
    assert metrics["perplexity"] is None  # not a language model: nothing to say about it


def test_exclude_keeps_matching_layers_float(llama: Path, tmp_path: Path) -> None:
    result = quantize(llama, "hf", "weight_only", {"dtype": "int4", "group_size": 64, "exclude": [r"layers\.1\.mlp"]},
                      tmp_path)
    dtypes = {layer["name"]: layer["weight_dtype"] for layer in result.metrics["layers"]}
    assert dtypes["model.layers.1.mlp.down_proj"] == "float32"
    assert dtypes["model.layers.0.mlp.down_proj"] == "int4"
    assert result.metrics["fidelity"]["source"] == "synthetic"
    assert result.metrics["perplexity"] is None
    assert any("perplexity not measured" in w for w in result.metrics["warnings"])
    assert any("exclude" in w for w in result.metrics["warnings"])


def test_gptq_needs_calibration_and_uses_it(llama: Path, texts: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="calibration"):
        quantize(llama, "hf", "weight_only", {"dtype": "int4", "algorithm": "gptq"}, tmp_path / "none")
    logs: list[str] = []
    result = quantize(llama, "hf", "weight_only", {"dtype": "int4", "algorithm": "gptq", "group_size": 128},
                      tmp_path / "gptq", calibration_path=texts, log=lambda _level, message: logs.append(message))
    assert any("gptq: calibrating on 24 samples" in line for line in logs)
    assert result.report["hf_weight_only"]["quantizer"].startswith("llm-compressor GPTQModifier")
    assert result.metrics["fidelity"]["source"] == "calibration"
    assert result.metrics["fidelity"]["cosine"] > 0.95


def test_an_npz_of_input_ids_alone_is_enough(llama: Path, tmp_path: Path) -> None:
    ids = np.random.default_rng(3).integers(0, 400, size=(6, 20)).astype(np.int64)
    tokens = tmp_path / "tokens.npz"
    np.savez(tokens, input_ids=ids)  # attention_mask is optional: all ones
    result = quantize(llama, "hf", "weight_only", {"dtype": "int8"}, tmp_path / "w", evaluation_path=tokens)
    assert result.metrics["fidelity"]["source"] == "evaluation" and result.metrics["fidelity"]["samples"] == 6
    assert result.metrics["perplexity"]["tokens"] == 6 * 19


def test_a_text_dataset_needs_the_tokenizer(tmp_path: Path, texts: Path) -> None:
    archive = hf_models.zip_folder(hf_models.tiny_llama_folder(tmp_path / "m", tokenizer=False), tmp_path / "m.zip")
    with pytest.raises(EngineError, match="no tokenizer files") as caught:
        quantize(archive, "hf", "weight_only", {"dtype": "int4"}, tmp_path / "w", evaluation_path=texts)
    assert caught.value.code == "dataset_mismatch"


def test_real_minilm_int8_keeps_embeddings_faithful(tmp_path: Path, texts: Path) -> None:
    result = quantize(hf_models.minilm_zip(tmp_path), "hf", "weight_only", {"dtype": "int8", "granularity":
                      "per_channel"}, tmp_path / "w", evaluation_path=texts)
    metrics = result.metrics
    assert metrics["fidelity"]["cosine"] >= 0.999
    assert metrics["fidelity"]["top1_agreement"] is None  # hidden states have no classes
    assert metrics["size"]["ratio"] < 0.7  # the 30522x384 word embedding (half the weights) stays float
    assert result.report["hf_weight_only"]["architecture"] == "BertModel"
    assert sum(layer["weight_dtype"] == "int8" for layer in metrics["layers"]) == 6 * 6 + 1  # + the pooler
