"""Per-layer SQNR in metrics.layers for the TorchScript methods (dynamic, static): isolated, by layer order."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from tests import models
from worker.engine import quantize
from worker.engine.config import StaticConfig
from worker.engine.torchscript import layer_sqnr as ts_layer_sqnr
from worker.engine.torchscript.static import _qconfig


def _example() -> torch.Tensor:
    return torch.from_numpy(models.digits_data()[2][:2])


def _batches() -> list[tuple]:
    return [(torch.from_numpy(models.digits_data()[0][:16]),)]


def _layers(path: Path, method: str, config: dict, data: dict, work: Path) -> dict:
    result = quantize(path, "torchscript", method, config, work, calibration_path=data["calibration"],
                      evaluation_path=data["evaluation"], model_name="digits")
    return {layer["name"]: (layer["weight_dtype"], layer["sqnr_db"]) for layer in result.metrics["layers"]}


def _assert_measured(layers: dict, names: set[str], low: float) -> None:
    for name in names:
        weight_dtype, sqnr = layers[name]
        assert weight_dtype == "int8", name
        assert sqnr is not None and math.isfinite(sqnr) and low < sqnr < 150.0, (name, sqnr)


def _dynamic_jit(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic_jit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic_jit(module, {"": per_channel_dynamic_qconfig})


def _static_jit(module: torch.jit.ScriptModule, excluded: tuple[str, ...] = ()) -> torch.jit.ScriptModule:
    from torch.ao.quantization import quantize_jit

    def calibrate(model: torch.jit.ScriptModule, batches: list[tuple]) -> None:
        with torch.no_grad():
            for batch in batches:
                model(*batch)

    qconfig_dict = {"": _qconfig(StaticConfig()), **dict.fromkeys(excluded)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_jit(module, qconfig_dict, calibrate, [_batches()], inplace=False)


def test_dynamic_mlp_measures_each_linear_and_excluding_one_leaves_the_others_unchanged(data: dict,
                                                                                         workdir: Path) -> None:
    path = models.save_torchscript(models.train_digits_mlp(), _example(), workdir / "mlp.pt")
    every = _layers(path, "dynamic", {}, data, workdir / "dyn")
    _assert_measured(every, {"fc1", "fc2", "head"}, 30.0)  # seen: 45.8 / 52.4 / 53.7 dB
    excluded = _layers(path, "dynamic", {"exclude": ["^head$"]}, data, workdir / "dyn-ex")
    assert excluded["head"] == ("float32", None)
    # isolated: each layer sees the float model's input, so the float head changes nothing upstream
    assert excluded["fc1"] == every["fc1"] and excluded["fc2"] == every["fc2"], (every, excluded)


def test_static_cnn_measures_folded_conv_relu_and_linear_layers(data: dict, workdir: Path) -> None:
    path = models.save_torchscript(models.train_digits_cnn(), _example(), workdir / "cnn.pt")
    layers = _layers(path, "static", {}, data, workdir / "static")
    assert set(layers) == {"conv1", "conv2", "head"}
    # seen: 38.0 / 36.3 / 37.7 dB; read before the float batch norm, a folded conv would score below 0
    _assert_measured(layers, {"conv1", "conv2", "head"}, 25.0)
    excluded = _layers(path, "static", {"exclude": ["conv2"]}, data, workdir / "static-ex")
    assert excluded["conv2"] == ("float32", None)
    _assert_measured(excluded, {"conv1", "head"}, 25.0)


def test_scripted_and_traced_models_pair_the_same_layers() -> None:
    cnn = models.train_digits_cnn()
    names = ["conv1", "conv2", "head"]
    traced, scripted = torch.jit.trace(cnn, _example()), torch.jit.script(cnn)
    from_trace = ts_layer_sqnr.layer_sqnr(traced, _static_jit(traced), _batches(), names)
    from_script = ts_layer_sqnr.layer_sqnr(scripted, _static_jit(scripted), _batches(), names)
    assert all(v is not None and v > 25.0 for v in from_trace.values()), from_trace
    assert from_script == pytest.approx(from_trace, abs=0.01)
    # dynamic leaves the convs float: they stay None, the Linear head is measured
    dynamic = ts_layer_sqnr.layer_sqnr(traced, _dynamic_jit(traced), _batches(), names)
    assert dynamic["conv1"] is None and dynamic["conv2"] is None and dynamic["head"] > 30.0, dynamic


def _damage_second_linear(module: torch.jit.ScriptModule) -> None:
    """Swap the packed weight of the second quantized Linear for a noisy one (int8, same shape)."""
    ops = [n for n in module.graph.nodes() if n.kind() == "quantized::linear_dynamic"]
    attribute = ops[1].inputsAt(1).node().s("name")
    weight, bias = getattr(module, attribute).unpack()
    torch.manual_seed(0)
    noisy = weight.dequantize() + 0.5 * weight.dequantize().std() * torch.randn(weight.shape)
    qweight = torch.quantize_per_tensor(noisy, float(noisy.abs().max()) / 127, 0, torch.qint8)
    module._c.setattr(attribute, torch.ops.quantized.linear_prepack(qweight, bias))


def test_a_damaged_layer_scores_far_lower_and_alone() -> None:
    traced = torch.jit.trace(models.train_digits_mlp(), _example())
    names = ["fc1", "fc2", "head"]
    quantized = _dynamic_jit(traced)
    clean = ts_layer_sqnr.layer_sqnr(traced, quantized, _batches(), names)
    _damage_second_linear(quantized)
    damaged = ts_layer_sqnr.layer_sqnr(traced, quantized, _batches(), names)
    assert damaged["fc2"] < clean["fc2"] - 20.0, (clean, damaged)  # seen: 52.4 -> 17.3 dB
    assert damaged["fc1"] == clean["fc1"] and damaged["head"] == clean["head"]  # isolated: others unchanged


def test_unpaired_graphs_leave_none_and_only_warn() -> None:
    mlp = torch.jit.trace(models.train_digits_mlp(), _example())
    cnn = torch.jit.trace(models.train_digits_cnn(), _example())
    assert ts_layer_sqnr.layer_sqnr(mlp, mlp, _batches(), ["fc1"]) == {"fc1": None}  # nothing quantized

    class Ctx:
        calibration_path = None
        logged: list = []

        def log(self, level: str, message: str) -> None:
            self.logged.append((level, message))

    class Samples:
        batches = [{"x": models.digits_data()[2][:1]}]
        source = "evaluation"

    layers = [{"name": "fc1", "weight_dtype": "int8", "sqnr_db": None}]
    spec = type("Spec", (), {"name": "x", "shape": ("batch", 1, 8, 8)})()
    ts_layer_sqnr.fill(Ctx(), layers, mlp, _static_jit(cnn), [spec], Samples())  # linear x3 vs conv, conv, linear
    assert layers[0]["sqnr_db"] is None
    assert Ctx.logged and Ctx.logged[0][0] == "warning" and "cannot pair" in Ctx.logged[0][1], Ctx.logged
