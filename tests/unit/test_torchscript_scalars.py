"""TorchScript `int` arguments (silero-vad's `sr`): read from a dataset as stacked scalars and passed as Python
ints; and a model the JIT passes cannot follow is refused as `unsupported`, saying why and what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests import models
from worker.engine import EngineError, quantize
from worker.engine.torchscript import common as ts_common
from worker.engine.torchscript import dynamic as ts_dynamic
from worker.engine.torchscript import refusal


class RateScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, sr: int) -> torch.Tensor:
        return self.fc(x) * (1.0 if sr == 16000 else 2.0)


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Picker(nn.Module):
    """Chooses its submodule by the rate and counts its calls in an attribute, like silero-vad's jit."""

    def __init__(self) -> None:
        super().__init__()
        self.net_16k, self.net_8k = Inner(), Inner()
        self.calls = torch.zeros(1)

    def forward(self, x: torch.Tensor, sr: int) -> torch.Tensor:
        if sr == 16000:
            out = self.net_16k(x)
        else:
            out = self.net_8k(x)
        self.calls = self.calls + 1
        return out


def _save(module: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def _data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    return models.save_npz(tmp_path / "d.npz", x=rng.standard_normal((12, 16)).astype(np.float32),
                           sr=np.array([16000, 8000] * 6, np.int64))


def test_int_arguments_are_0d_inputs_fed_as_python_ints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = _save(RateScaled(), tmp_path / "m.pt")
    module = ts_common.load_module(path)
    assert [s.to_dict() for s in ts_common.input_specs(module)][1] == \
        {"name": "sr", "dtype": "int64", "shape": [], "optional": False}
    run = ts_common.load_runner(path)
    x = np.ones((1, 16), np.float32)
    (at_16k,), (at_8k,) = run({"x": x, "sr": np.array(16000)}), run({"x": x, "sr": np.array(8000)})
    np.testing.assert_allclose(at_8k, 2 * at_16k, rtol=1e-6)

    result = quantize(path, "torchscript", "dynamic", {}, tmp_path / "work", calibration_path=_data(tmp_path),
                      evaluation_path=_data(tmp_path), model_name="rate")
    assert result.metrics["fidelity"]["samples"] == 12
    assert result.metrics["fidelity"]["cosine_min"] > 0.99


def test_a_failing_jit_pass_is_unsupported_with_the_model_construct_and_a_way_out(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    path = _save(Picker(), tmp_path / "picker.pt")
    cause = RuntimeError("Can't handle the access pattern of GetAttr  in getModuleAccessPath")

    def raises(*_args: object) -> None:
        raise cause

    monkeypatch.setattr(ts_dynamic, "_quantize", raises)
    with pytest.raises(EngineError) as caught:
        quantize(path, "torchscript", "dynamic", {}, tmp_path / "work", evaluation_path=_data(tmp_path),
                 model_name="picker")
    error = caught.value
    assert error.code == "unsupported" and error.__cause__ is cause
    message = str(error)
    assert "picks the submodule that runs inside if-branches (net_16k, net_8k" in message
    assert "calls: state kept between calls" in message
    assert "What to do:" in message and "(here net_16k or net_8k)" in message
    assert "RuntimeError: " not in message  # the library's words are quoted, not relayed as the reason


def test_without_a_branch_the_refusal_still_explains() -> None:
    module = torch.jit.script(RateScaled().eval())
    message = str(refusal.jit_refusal(RuntimeError("boom"), module, "static"))
    assert message.startswith("TorchScript static quantization cannot rewrite this model's scripted graph")
    assert "What to do:" in message and message.endswith("(torch: boom)")
