"""Static int8 on torch.export (PT2E) and TorchScript (fbgemm): small, accurate, loadable, measured.

AOTInductor compilation takes 12-45 s here, so the default run sets QUANTSERVE_AOTI=0 (the module
switch pt2e_deliver.AOTI_ENV) and checks the portable `.pt2`; tests marked `slow` compile the package.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - the int8 .pt2 uses quantized_decomposed ops

from tests import models
from worker.engine import EngineError, quantize
from worker.engine.torch_export.aoti import AOTI_ENV, rename_frozen_params, widen_single_channel_convs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("torch_static")


@pytest.fixture(scope="module")
def data(workdir: Path) -> dict[str, Path]:
    x_train, _, x_test, y_test = models.digits_data()
    return {"calibration": models.save_npz(workdir / "cal.npz", x=x_train[:256]),
            "evaluation": models.save_npz(workdir / "eval.npz", x=x_test, labels=y_test)}


@pytest.fixture(scope="module")
def cnn_files(workdir: Path) -> dict[str, Path]:
    """The trained digits CNN (conv-BN-ReLU x2, Linear head) saved both ways."""
    cnn, example = models.train_digits_cnn(), torch.from_numpy(models.digits_data()[2][:2])
    return {"torch_export": models.save_torch_export(cnn, example, workdir / "cnn.pt2"),
            "torchscript": models.save_torchscript(cnn, example, workdir / "cnn.pt")}


def _static(path: Path, fmt: str, data: dict, work: Path, config: dict | None = None):  # noqa: ANN202
    return quantize(path, fmt, "static", config or {}, work, calibration_path=data["calibration"],
                    evaluation_path=data["evaluation"], model_name="digits-cnn")


@pytest.fixture(scope="module")
def pt2_result(cnn_files: dict, data: dict, workdir: Path):  # noqa: ANN201
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(AOTI_ENV, "0")
        return _static(cnn_files["torch_export"], "torch_export", data, workdir / "pt2")


def _held_out_top1(module) -> tuple[float, np.ndarray]:  # noqa: ANN001
    _, _, x_test, y_test = models.digits_data()
    with torch.no_grad():
        out = module(torch.from_numpy(x_test)).numpy()
    return float(np.mean(out.argmax(1) == y_test)), out


def _assert_close_to_float(module) -> None:  # noqa: ANN001
    float_top1, reference = _held_out_top1(models.train_digits_cnn())
    top1, out = _held_out_top1(module)
    assert abs(top1 - float_top1) <= 0.01, (top1, float_top1)
    assert np.mean(out.argmax(1) == reference.argmax(1)) >= 0.97
    assert np.corrcoef(out.ravel(), reference.ravel())[0, 1] > 0.99


def test_pt2_static_is_under_030_of_float_and_keeps_top1(cnn_files: dict, pt2_result) -> None:  # noqa: ANN001
    (artifact,) = pt2_result.artifacts  # no AOTI package when compilation is switched off
    assert artifact.kind == "model" and artifact.filename == "digits-cnn.int8.pt2"
    ratio = artifact.path.stat().st_size / cnn_files["torch_export"].stat().st_size
    assert ratio <= 0.30, ratio

    program = torch.export.load(str(artifact.path))  # plain torch, once quantized_decomposed is registered
    tensors = {**program.state_dict, **program.constants}
    assert sum(t.numel() for t in tensors.values() if t.dtype == torch.int8) == 32 * 9 + 32 * 32 * 9 + 10 * 512
    assert not [n for n, t in tensors.items() if t.is_floating_point() and t.dim() >= 2]  # no float weights left
    assert not [n for n in program.graph.nodes if "batch_norm" in str(n.target)]  # folded into the convs
    _assert_close_to_float(program.module())

    metrics = pt2_result.metrics
    assert metrics["size"]["ratio"] == pytest.approx(ratio, abs=1e-3)
    assert abs(metrics["accuracy"]["delta"]) <= 0.01 and metrics["fidelity"]["top1_agreement"] >= 0.97
    assert {layer["name"]: layer["weight_dtype"] for layer in metrics["layers"]} == {
        "conv1": "int8", "conv2": "int8", "head": "int8"}
    assert any(AOTI_ENV in w for w in metrics["warnings"])  # says plainly that the fast package is missing
    details = pt2_result.report["torch_export_static"]
    assert details["activation_observer"] == "MinMaxObserver" and details["aoti"] == {"skipped": f"{AOTI_ENV}=0"}
    assert details["pt2"]["int8_bytes"] > 10 * details["pt2"]["float_bytes"]


def test_aoti_rewrites_keep_the_int8_programs_numbers(pt2_result) -> None:  # noqa: ANN001
    """What the AOTI package is built from: weights renamed away from Inductor's `_frozen_paramN`, the
    1-channel conv widened with a zero channel (a dynamic batch plus a 1-channel conv miscompiled)."""
    (artifact,) = pt2_result.artifacts
    module = torch.export.load(str(artifact.path)).module()
    x = torch.from_numpy(models.digits_data()[2])
    with torch.no_grad():
        reference = module(x)
        assert rename_frozen_params(module) == 3
        assert len(widen_single_channel_convs(module)) == 1
        rewritten = module(x)
    assert not [n for n in module.graph.nodes if n.op == "get_attr" and "_frozen_param" in str(n.target)]
    assert torch.allclose(rewritten, reference, atol=1e-5)
    assert torch.export.export(module, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))


def test_torchscript_static_quantizes_every_layer_and_keeps_top1(cnn_files: dict, data: dict, tmp_path: Path) -> None:
    result = _static(cnn_files["torchscript"], "torchscript", data, tmp_path)
    (artifact,) = result.artifacts
    assert artifact.filename == "digits-cnn.int8.pt" and artifact.format == "torchscript"
    assert artifact.path.stat().st_size < 0.4 * cnn_files["torchscript"].stat().st_size
    module = torch.jit.load(str(artifact.path))
    kinds = [node.kind() for node in module.inlined_graph.nodes()]
    assert sum(k.startswith(("quantized::conv", "quantized::linear")) for k in kinds) == 3
    _assert_close_to_float(module)
    metrics = result.metrics
    assert abs(metrics["accuracy"]["delta"]) <= 0.01
    assert metrics["latency"]["runtime"].startswith(f"torch {torch.__version__} (TorchScript")
    assert result.report["torchscript_static"]["quantized_ops"] == 3
    sensitivity = metrics["sensitivity"]  # issue 14: each layer quantized alone, measured, worst first
    assert {layer["name"] for layer in sensitivity["layers"]} == {"conv1", "conv2", "head"}
    assert sensitivity["suggested_reaches_goal"] and "target" not in metrics


def test_per_tensor_and_exclude_keep_fast_weights_and_named_layers_float(cnn_files: dict, data: dict,
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AOTI_ENV, "0")
    result = _static(cnn_files["torch_export"], "torch_export", data, tmp_path,
                     {"granularity": "per_tensor", "exclude": ["^head$"], "calibration": {"algorithm": "histogram"}})
    dtypes = {layer["name"]: layer["weight_dtype"] for layer in result.metrics["layers"]}
    assert dtypes == {"conv1": "int8", "conv2": "int8", "head": "float32"}
    details = result.report["torch_export_static"]
    # Inductor lowers only per-channel weights to int8 kernels: per-tensor ones are rewritten, same numbers
    assert details["per_tensor_weights_rewritten"] == 2 and details["kept_float"] == ["head"]
    assert details["activation_observer"] == "HistogramObserver"
    assert abs(result.metrics["accuracy"]["delta"]) <= 0.02


@pytest.mark.parametrize("fmt", ["torch_export", "torchscript"])
def test_calibration_without_a_library_observer_is_unsupported(fmt: str, cnn_files: dict, data: dict,
                                                                tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="entropy.*minmax") as info:
        _static(cnn_files[fmt], fmt, data, tmp_path, {"calibration": {"algorithm": "entropy"}})
    assert info.value.code == "unsupported"


def test_static_without_calibration_data_says_what_is_missing(cnn_files: dict, data: dict, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="calibration dataset"):
        quantize(cnn_files["torch_export"], "torch_export", "static", {}, tmp_path,
                 evaluation_path=data["evaluation"])


def test_failed_aoti_compile_delivers_the_pt2_with_a_plain_warning(cnn_files: dict, data: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setenv(AOTI_ENV, "1")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    result = _static(cnn_files["torch_export"], "torch_export", data, tmp_path)
    assert [a.kind for a in result.artifacts] == ["model"]
    assert not list(tmp_path.glob("*.aoti.pt2"))
    assert any("could not be built" in w and "C++ compiler" in w for w in result.metrics["warnings"])
    assert "eager" in result.metrics["latency"]["runtime"]


@pytest.mark.slow
def test_pt2_static_delivers_a_fast_aoti_package_that_matches_float(cnn_files: dict, data: dict,
                                                                    tmp_path: Path) -> None:
    result = _static(cnn_files["torch_export"], "torch_export", data, tmp_path)
    by_kind = {a.kind: a for a in result.artifacts}
    assert set(by_kind) == {"model", "compiled_model"}
    package = by_kind["compiled_model"]
    assert package.filename == "digits-cnn.int8.aoti.pt2"
    _assert_close_to_float(torch._inductor.aoti_load_package(str(package.path)))
    _assert_close_to_float(torch.export.load(str(by_kind["model"].path)).module())

    details = result.report["torch_export_static"]
    latency = result.metrics["latency"]
    assert "AOTInductor" in latency["runtime"] and latency == details["aoti"]["latency"]
    assert details["aoti"]["error"] is None and details["aoti"]["compile_s"] > 0
    # the fast deliverable is faster than the portable program, which runs Q/DQ around float kernels
    assert latency["quantized_ms_p50"] < details["pt2"]["latency"]["quantized_ms_p50"]
    assert set(details["aoti"]["vs_float_compiled"]) >= {"baseline", "float_aoti_ms_p50", "int8_aoti_ms_p50",
                                                         "speedup"}
    # the package runs oneDNN int8 convs: with freezing skipped (grad on) it dequantized weights per call
    assert details["aoti"]["inductor_configs"]["freezing"] and details["aoti"]["widened_single_channel_convs"] == [
        "conv1"]
    with zipfile.ZipFile(package.path) as archive:
        code = "".join(archive.read(n).decode() for n in archive.namelist() if n.endswith("wrapper.cpp"))
    assert code.count("qconv_pointwise") >= 2 and "dequantize_per_channel" not in code
