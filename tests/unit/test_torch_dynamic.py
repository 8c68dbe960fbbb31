"""Dynamic int8 on TorchScript and torch.export programs: smaller, faithful, loadable, and no pickle run."""

from __future__ import annotations

import json
import pathlib
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import models
from worker.engine import EngineError, inspect_model, quantize
from worker.engine.types import ModelFormat

METRIC_KEYS = {"size", "fidelity", "accuracy", "perplexity", "latency", "layers", "duration_s", "warnings"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("torch_dynamic")


@pytest.fixture(scope="module")
def digits_eval(workdir: Path) -> Path:
    _, _, x_test, y_test = models.digits_data()
    return models.save_npz(workdir / "digits_eval.npz", x=x_test, labels=y_test)


@pytest.fixture(scope="module")
def mlp_files(workdir: Path) -> dict[str, Path]:
    """The trained digits MLP (64-256-256-10: Linear-heavy) saved both ways."""
    mlp, example = models.train_digits_mlp(), torch.from_numpy(models.digits_data()[2][:2])
    return {"torchscript": models.save_torchscript(mlp, example, workdir / "mlp.pt"),
            "torch_export": models.save_torch_export(mlp, example, workdir / "mlp.pt2")}


@pytest.fixture(scope="module")
def mlp_results(mlp_files: dict[str, Path], digits_eval: Path, workdir: Path) -> dict:
    return {fmt: quantize(path, fmt, "dynamic", {}, workdir / f"work-{fmt}", evaluation_path=digits_eval,
                          model_name="digits-mlp")
            for fmt, path in mlp_files.items()}


def _load(fmt: str, path: Path):  # noqa: ANN202 - a torch callable
    if fmt == "torchscript":
        return torch.jit.load(str(path))
    return torch.export.load(str(path)).module()


@pytest.mark.parametrize("fmt", ["torchscript", "torch_export"])
def test_linear_heavy_model_shrinks_below_030_and_keeps_top1(fmt: str, mlp_files: dict, mlp_results: dict) -> None:
    result = mlp_results[fmt]
    (artifact,) = [a for a in result.artifacts if a.kind == "model"]
    assert artifact.format == fmt and artifact.filename == artifact.path.name
    assert artifact.filename == ("digits-mlp.int8.pt" if fmt == "torchscript" else "digits-mlp.int8.pt2")
    ratio = artifact.path.stat().st_size / mlp_files[fmt].stat().st_size
    assert ratio <= 0.30, ratio

    # the artifact loads with plain torch and agrees with the float model
    x = torch.from_numpy(models.digits_data()[2])
    with torch.no_grad():
        reference = models.train_digits_mlp()(x).numpy()
        quantized = _load(fmt, artifact.path)(x).numpy()
    assert np.mean(quantized.argmax(1) == reference.argmax(1)) >= 0.95
    assert np.corrcoef(quantized.ravel(), reference.ravel())[0, 1] > 0.99

    metrics = result.metrics
    assert set(metrics) >= METRIC_KEYS
    assert metrics["size"]["ratio"] == pytest.approx(ratio, abs=1e-3)
    assert metrics["fidelity"]["source"] == "evaluation" and metrics["fidelity"]["top1_agreement"] >= 0.95
    assert abs(metrics["accuracy"]["delta"]) <= 0.03
    assert metrics["latency"]["runtime"].startswith(f"torch {torch.__version__}")
    assert metrics["latency"]["float_ms_p50"] > 0 and metrics["latency"]["quantized_ms_p50"] > 0
    assert {layer["name"]: layer["weight_dtype"] for layer in metrics["layers"]} == {
        "fc1": "int8", "fc2": "int8", "head": "int8"}
    sensitivity = metrics["sensitivity"]  # issue 14: every report ranks its quantized layers, in both formats
    assert {layer["name"] for layer in sensitivity["layers"]} == {"fc1", "fc2", "head"}
    assert sensitivity["suggested_reaches_goal"] and sensitivity["source"] == "evaluation"
    assert set(result.report) >= {"versions", "host"}


def test_pt2_artifact_holds_int8_weights_and_no_float_copies(mlp_results: dict) -> None:
    program = torch.export.load(str(mlp_results["torch_export"].artifacts[0].path))
    tensors = {**program.state_dict, **program.constants}
    int8 = [t for t in tensors.values() if t.dtype == torch.int8]
    assert sum(t.numel() for t in int8) == 64 * 256 + 256 * 256 + 256 * 10
    assert not [n for n, t in tensors.items() if t.is_floating_point() and t.dim() == 2]  # no float weights
    assert any(n.target is torch.ops.aten._int_mm.default for n in program.graph.nodes)


def test_pt2_inspect_reports_inputs_outputs_and_parameters(mlp_files: dict) -> None:
    info = inspect_model(mlp_files["torch_export"], ModelFormat.torch_export)
    (spec,) = info.inputs
    assert spec.name == "x" and spec.dtype == "float32"
    assert isinstance(spec.shape[0], str) and spec.shape[1:] == [1, 8, 8]
    assert [o.shape[1:] for o in info.outputs] == [[10]] and info.outputs[0].dtype == "float32"
    assert info.num_parameters == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert info.architecture == "DigitsMLP"


def test_torchscript_inspect_names_inputs_without_inventing_shapes(mlp_files: dict) -> None:
    info = inspect_model(mlp_files["torchscript"], ModelFormat.torchscript)
    assert [(s.name, s.dtype, s.shape) for s in info.inputs] == [("x", "unknown", [])]
    assert info.num_parameters == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes]) -> Path:
    """Copy a .pt2 zip, replacing the members whose names end with a key of `replace`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            for suffix, value in replace.items():
                if info.filename.endswith(suffix):
                    data = value
            zout.writestr(info, data)
    return dst


class _TouchMarker:
    """A pickle payload with no os.system: unpickling it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (self.marker,))


def test_pt2_with_malicious_sample_inputs_never_runs_the_pickle(mlp_files: dict, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _rewrite(mlp_files["torch_export"], tmp_path / "evil.pt2",
                    {"data/sample_inputs/model.pt": pickle.dumps(_TouchMarker(marker))})

    info = inspect_model(evil, ModelFormat.torch_export)  # the program itself is fine: it loads
    assert info.inputs[0].name == "x"
    result = quantize(evil, "torch_export", "dynamic", {}, tmp_path / "work")
    assert result.metrics["fidelity"]["source"] == "synthetic"
    assert not marker.exists()

    # control: the payload is live; torch.export.load on the raw file falls back to full pickle
    with pytest.raises(RuntimeError):
        torch.export.load(str(evil))
    assert marker.exists()


def test_pt2_with_code_in_guards_or_pickled_weights_is_refused(mlp_files: dict, tmp_path: Path) -> None:
    src = mlp_files["torch_export"]
    with zipfile.ZipFile(src) as z:
        program_name = next(n for n in z.namelist() if n.endswith("models/model.json"))
        program = json.loads(z.read(program_name))
        weights_name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        weights = json.loads(z.read(weights_name))
    program["guards_code"] = [f"__import__('pathlib').Path({str(tmp_path / 'pwned')!r}).touch() or True"]
    guarded = _rewrite(src, tmp_path / "guards.pt2", {"models/model.json": json.dumps(program).encode()})
    next(iter(weights["config"].values()))["use_pickle"] = True
    pickled = _rewrite(src, tmp_path / "pickled.pt2", {"model_weights_config.json": json.dumps(weights).encode()})
    for path in (guarded, pickled):
        with pytest.raises(EngineError, match="refused .pt2 archive"):
            inspect_model(path, ModelFormat.torch_export)
    assert not (tmp_path / "pwned").exists()

    # control: torch itself exec's guards_code when the unlifted module is called
    torch.export.load(str(guarded)).module()(torch.zeros(2, 1, 8, 8))
    assert (tmp_path / "pwned").exists()


def test_pt2_exclude_and_per_tensor_keep_named_layers_float(mlp_files: dict, digits_eval: Path,
                                                            tmp_path: Path) -> None:
    result = quantize(mlp_files["torch_export"], "torch_export", "dynamic",
                      {"exclude": ["^head$"], "granularity": "per_tensor"}, tmp_path, evaluation_path=digits_eval)
    dtypes = {layer["name"]: layer["weight_dtype"] for layer in result.metrics["layers"]}
    assert dtypes == {"fc1": "int8", "fc2": "int8", "head": "float32"}
    assert result.metrics["fidelity"]["top1_agreement"] >= 0.95


def test_lstm_stays_float_and_says_so_in_both_formats(workdir: Path, digits_eval: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    lstm, example = models.DigitsLSTM().eval(), torch.from_numpy(models.digits_data()[2][:2])
    paths = {"torchscript": models.save_torchscript(lstm, example, tmp_path / "lstm.pt"),
             "torch_export": models.save_torch_export(lstm, example, tmp_path / "lstm.pt2")}
    for fmt, path in paths.items():
        metrics = quantize(path, fmt, "dynamic", {}, tmp_path / fmt, evaluation_path=digits_eval).metrics
        dtypes = {layer["name"]: (layer["op"], layer["weight_dtype"]) for layer in metrics["layers"]}
        assert dtypes == {"lstm": ("LSTM", "float32"), "head": ("Linear", "int8")}, fmt
        assert any("lstm" in w and "float" in w for w in metrics["warnings"]), metrics["warnings"]


def test_pt2_transformer_quantizes_linears_and_embedding(tmp_path: Path) -> None:
    model, ids = models.tiny_transformer(), models.token_ids(48)
    path = models.save_torch_export(model, torch.from_numpy(ids[:2]), tmp_path / "tiny.pt2")
    data = models.save_npz(tmp_path / "ids.npz", input_ids=ids)
    result = quantize(path, "torch_export", "dynamic", {}, tmp_path / "work", evaluation_path=data)
    dtypes = {layer["name"]: layer["weight_dtype"] for layer in result.metrics["layers"]}
    assert dtypes.pop("embed") == "uint8" and set(dtypes.values()) == {"int8"} and len(dtypes) == 12
    assert result.metrics["size"]["ratio"] <= 0.35
    assert result.metrics["fidelity"]["cosine_min"] >= 0.999
    out = torch.export.load(str(result.artifacts[0].path)).module()(torch.from_numpy(ids[:3]))
    assert out.shape == (3, 64)
