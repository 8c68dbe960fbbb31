"""The CUDA paths: QAT trains on cuda, torch.export int4 and hf weight-only quantize and measure on cuda.

Tests marked `gpu` skip cleanly without CUDA (bench/gpu_check.sh runs them on a GPU machine). The others run
everywhere: the registry offers cuda for exactly these three pairs, options are checked per device, and a
cuda job on a host without CUDA fails with `unsupported`, saying what the host has: never on the CPU.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import hf_models, models
from worker.engine import EngineError, JobContext, quantize
from worker.engine.config import QATConfig, WeightOnlyConfig
from worker.engine.registry import SPECS, resolve
from worker.engine.torch_export.aoti import AOTI_ENV
from worker.engine.types import Device, Method, ModelFormat

CUDA_PAIRS = {("hf", "weight_only"), ("torch_export", "qat"), ("torch_export", "weight_only")}
# the smallest config each pair accepts on cuda (torch.export weight-only is int4, group-wise, there)
CUDA_CONFIGS = {("hf", "weight_only"): {}, ("torch_export", "qat"): {"epochs": 1},
                ("torch_export", "weight_only"): {"dtype": "int4", "group_size": 32}}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a host without CUDA")


def test_the_registry_offers_cuda_for_exactly_the_three_cuda_paths() -> None:
    assert {(f.value, m.value) for (f, m), spec in SPECS.items() if Device.cuda in spec.devices} == CUDA_PAIRS
    assert all(Device.cpu in spec.devices for spec in SPECS.values())


def test_torch_export_weight_only_options_are_checked_per_device() -> None:
    spec = resolve("torch_export", "weight_only")
    hqq_int4 = WeightOnlyConfig(dtype="int4", group_size=32, algorithm="hqq")
    assert spec.config_problems(hqq_int4, "cpu") == [
        ("algorithm", "'hqq' is not available: only rtn for torch.export on cpu")]
    assert spec.config_problems(hqq_int4, "cuda") == []
    int8_per_channel = WeightOnlyConfig(dtype="int8", group_size=-1)
    assert spec.config_problems(int8_per_channel, "cpu") == []
    assert [field for field, _ in spec.config_problems(int8_per_channel, "cuda")] == ["dtype", "group_size"]
    # without a device (a caller that does not know it yet): only what no device can do
    assert spec.config_problems(hqq_int4) == [] and spec.config_problems(int8_per_channel) == []
    assert [f for f, _ in spec.config_problems(WeightOnlyConfig(algorithm="awq", dtype="int4"))] == ["algorithm"]


@without_cuda
@pytest.mark.parametrize(("fmt", "method"), sorted(CUDA_PAIRS))
def test_a_cuda_job_on_a_host_without_cuda_is_unsupported_and_says_what_is_here(fmt: str, method: str,
                                                                               tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"asks for device 'cuda'.*no usable CUDA device \(torch ") as info:
        quantize(tmp_path / "model", fmt, method, CUDA_CONFIGS[(fmt, method)], tmp_path / "work", device="cuda")
    assert info.value.code == "unsupported"
    assert "device 'cpu'" in str(info.value)  # says what to do
    assert not (tmp_path / "work").exists()  # refused before any work


@without_cuda
@pytest.mark.parametrize(("fmt", "method"), sorted(CUDA_PAIRS))
def test_a_handler_called_directly_refuses_cuda_it_does_not_have(fmt: str, method: str, tmp_path: Path) -> None:
    """The handlers check too (nothing trains or measures on the CPU in place of the GPU asked for)."""
    spec = resolve(fmt, method)
    ctx = JobContext(model_path=tmp_path / "model", format=ModelFormat(fmt), method=Method(method),
                     config=spec.config_model.model_validate(CUDA_CONFIGS[(fmt, method)]), work_dir=tmp_path,
                     device=Device.cuda)
    with pytest.raises(EngineError, match="no usable CUDA device") as info:
        spec.load_handler()(ctx)
    assert info.value.code == "unsupported"


# ---- on a GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_qat_trains_on_cuda_and_delivers_a_cpu_artifact(data: dict[str, Path], workdir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AOTI_ENV, "0")
    x_train, _, x_test, _ = models.digits_data()
    model = models.save_torch_export(models.train_digits_cnn(), torch.from_numpy(x_test[:2]), workdir / "cnn.pt2")
    training = models.save_npz(workdir / "train.npz", x=x_train)
    result = quantize(model, "torch_export", "qat", QATConfig(epochs=2, batch_size=64), tmp_path, device="cuda",
                      training_path=training, evaluation_path=data["evaluation"], model_name="cnn")
    details = result.report["torch_export_qat"]
    assert details["device"] == "cuda" and details["training_device"]["device"] == "cuda"
    assert details["training_device"]["name"] and details["converted_on"] == "cpu"
    assert details["fake_quant_vs_converted"]["cosine_min"] >= 0.999  # convert on the CPU kept what cuda trained
    assert abs(result.metrics["accuracy"]["delta"]) <= 0.02
    assert result.metrics["latency"]["device"] == "cpu"  # the artifact is measured where it runs
    program = torch.export.load(str(result.artifacts[0].path))  # a CPU program
    assert all(t.device.type == "cpu" for t in program.state_dict.values())
    assert not [n for n in program.graph.nodes if "batch_norm" in str(n.target)]
    with torch.no_grad():
        assert program.module()(torch.from_numpy(x_test[:3])).shape == (3, 10)


@pytest.mark.gpu
@needs_cuda
def test_int4_tinygemm_op_computes_what_torchaos_int4_linear_computes() -> None:
    """Our lowered call (K cut to a multiple of 128) against torchao's own Int4TilePackedTo4dTensor linear
    (K padded to 1024): same int4 numbers, same kernel."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    from worker.engine.torch_export import int4_cuda, ops

    torch.manual_seed(0)
    weight, x = 0.05 * torch.randn(70, 320, device="cuda"), torch.randn(5, 3, 320, device="cuda")
    qweight, scale_and_zero = int4_cuda.pack(weight, 32, "rtn")
    assert qweight.shape == (9, 3, 32, 4) and scale_and_zero.shape == (12, 72, 2)  # K' = 384, N' = 72
    ours = ops.int4_tinygemm_linear(x, qweight, scale_and_zero, None, 32, 70)
    reference = torch.nn.Sequential(torch.nn.Linear(320, 70, bias=False, device="cuda", dtype=torch.bfloat16))
    reference[0].weight.data = weight.bfloat16()
    quantize_(reference, Int4WeightOnlyConfig(group_size=32, int4_packing_format="tile_packed_to_4d",
                                              set_inductor_config=False))
    with torch.no_grad():
        theirs = reference(x.bfloat16()).float()
    assert ours.shape == (5, 3, 70) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=0.02, rtol=0.02)
    exact = torch.nn.functional.linear(x, weight)
    assert torch.nn.functional.cosine_similarity(ours.flatten(), exact.flatten(), dim=0) > 0.99


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("algorithm", ["rtn", "hqq"])
def test_torch_export_int4_on_cuda_loads_with_plain_torch_and_runs_on_the_gpu(algorithm: str, workdir: Path,
                                                                              tmp_path: Path) -> None:
    x_test, y_test = models.digits_data()[2:]
    mlp = models.train_digits_mlp()
    path = models.save_torch_export(mlp, torch.from_numpy(x_test[:2]), workdir / "mlp.pt2")
    evaluation = models.save_npz(workdir / "mlp_eval.npz", x=x_test, labels=y_test)
    result = quantize(path, "torch_export", "weight_only", {"dtype": "int4", "group_size": 32,
                                                            "algorithm": algorithm},
                      tmp_path, device="cuda", evaluation_path=evaluation, model_name="mlp")
    (artifact,) = result.artifacts
    assert artifact.filename == "mlp.int4.pt2" and artifact.path.stat().st_size <= 0.25 * path.stat().st_size

    program = torch.export.load(str(artifact.path))  # torch alone: no torchao import needed, nothing pickled
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten._weight_int4pack_mm.default" in targets and not [t for t in targets if "torchao" in t]
    tensors = {**program.state_dict, **program.constants}
    assert all(t.device.type == "cuda" for t in tensors.values())
    assert not [n for n, t in tensors.items() if t.is_floating_point() and t.dim() == 2]  # no float weight left
    with torch.no_grad():
        out = program.module()(torch.from_numpy(x_test).cuda()).cpu()
        reference = mlp(torch.from_numpy(x_test))
    assert np.mean(out.numpy().argmax(1) == reference.numpy().argmax(1)) >= 0.9

    metrics = result.metrics
    assert metrics["latency"]["device"] == "cuda" and "on cuda" in metrics["latency"]["runtime"]
    assert metrics["fidelity"]["top1_agreement"] >= 0.9 and abs(metrics["accuracy"]["delta"]) <= 0.05
    layers = {layer["name"]: layer for layer in metrics["layers"]}
    assert {n: (layer["weight_dtype"], layer["activation_dtype"]) for n, layer in layers.items()} == {
        n: ("int4", "bfloat16") for n in ("fc1", "fc2", "head")}
    assert all(layer["sqnr_db"] is not None and layer["sqnr_db"] > 10 for layer in layers.values())
    details = result.report["torch_export_weight_only"]
    assert details["device"]["device"] == "cuda" and details["algorithm"] == algorithm
    assert "tile_packed_to_4d" in details["quantizer"] and "torch.export.load" in details["loader"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_hf_weight_only_quantizes_and_measures_on_cuda(algorithm: str, tmp_path: Path) -> None:
    llama = hf_models.tiny_llama_zip(tmp_path)
    texts = hf_models.write_text_dataset(tmp_path / "texts.jsonl", 24)
    result = quantize(llama, "hf", "weight_only", {"dtype": "int4", "group_size": 32, "algorithm": algorithm},
                      tmp_path / "work", device="cuda", evaluation_path=texts, calibration_path=texts)
    details = result.report["hf_weight_only"]
    assert details["device"]["device"] == "cuda" and details["quantized_on"].startswith("cuda")
    metrics = result.metrics
    assert metrics["latency"]["device"] == "cuda" and "eager on cuda" in metrics["latency"]["runtime"]
    assert any("on the GPU, transformers runs this checkpoint" in w for w in metrics["warnings"])
    assert not any(w.startswith("on a CPU") for w in metrics["warnings"])
    assert metrics["fidelity"]["cosine"] > 0.95 and metrics["perplexity"]["tokens"] > 100
    blocks = [layer for layer in metrics["layers"] if layer["name"] != "lm_head"]
    assert len(blocks) == 14 and all(layer["sqnr_db"] is not None and layer["sqnr_db"] > 15 for layer in blocks)

    folder = tmp_path / "q"
    with zipfile.ZipFile(result.artifacts[0].path) as zf:
        zf.extractall(folder)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder), device_map="cuda").eval()  # plain, as a user would
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 400, size=(1, 16))).cuda()
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=ids).logits).all()
