"""QAT on torch.export programs: trains without labels, converts without losing what it trained, says why it fails.

As in test_torch_static.py, the default run sets QUANTSERVE_AOTI=0 (no AOTInductor compile); the
recovery test trains a 32x32 CNN for a few epochs and is marked `slow`. Training on cuda is tested in
test_cuda_paths.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - the int8 .pt2 uses quantized_decomposed ops

from tests import models
from worker.engine import EngineError, quantize
from worker.engine.config import QATConfig
from worker.engine.torch_export.aoti import AOTI_ENV


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("torch_qat")


@pytest.fixture(scope="module")
def digits(workdir: Path) -> dict[str, Path]:
    """8x8 digits: a training set with NO labels, an evaluation set with labels, the trained CNN as .pt2."""
    x_train, _, x_test, y_test = models.digits_data()
    return {"training": models.save_npz(workdir / "train.npz", x=x_train),
            "evaluation": models.save_npz(workdir / "eval.npz", x=x_test, labels=y_test),
            "model": models.save_torch_export(models.train_digits_cnn(), torch.from_numpy(x_test[:2]),
                                              workdir / "cnn.pt2")}


def test_qat_distillation_needs_no_labels_and_convert_keeps_the_trained_model(
        digits: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AOTI_ENV, "0")
    stages: list[tuple[str, float]] = []
    logs: list[str] = []
    result = quantize(digits["model"], "torch_export", "qat", {"epochs": 1, "batch_size": 64}, tmp_path,
                      training_path=digits["training"], evaluation_path=digits["evaluation"], model_name="cnn",
                      progress=lambda stage, fraction: stages.append((stage, fraction)),
                      log=lambda level, message: logs.append(message))
    (artifact,) = result.artifacts
    assert artifact.filename == "cnn.int8.pt2"
    assert artifact.path.stat().st_size <= 0.30 * digits["model"].stat().st_size

    details = result.report["torch_export_qat"]
    assert details["loss"] == "distillation" and details["device"] == "cpu" and len(details["epoch_losses"]) == 1
    # the converted artifact computes what the fake-quant model computed at the end of training
    assert details["fake_quant_vs_converted"]["cosine_min"] >= 0.999
    assert abs(result.metrics["accuracy"]["delta"]) <= 0.02
    assert [layer["weight_dtype"] for layer in result.metrics["layers"]] == ["int8"] * 3

    program = torch.export.load(str(artifact.path))
    assert not [n for n in program.graph.nodes if "batch_norm" in str(n.target)]  # folded into the convs
    with torch.no_grad():
        out = program.module()(torch.from_numpy(models.digits_data()[2][:1]))  # batch 1 works again
    assert out.shape == (1, 10)

    training = [f for stage, f in stages if stage == "training"]
    assert training and training == sorted(training) and 0 < training[0] < training[-1] <= 0.45
    assert any("epoch 1/1" in line for line in logs)
    assert [f for _, f in stages] == sorted(f for _, f in stages)  # progress never goes backwards


def test_cross_entropy_without_labels_is_a_clear_error(digits: dict, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="cross_entropy.*labels.*distillation") as info:
        quantize(digits["model"], "torch_export", "qat", {"loss": "cross_entropy"}, tmp_path,
                 training_path=digits["training"], evaluation_path=digits["evaluation"])
    assert info.value.code == "dataset_mismatch"


def test_qat_config_refuses_unknown_bits() -> None:
    with pytest.raises(ValueError):
        QATConfig.model_validate({"weight_bits": 2})
    assert QATConfig().weight_bits == 8


@pytest.mark.slow
def test_qat_recovers_at_least_half_of_what_4bit_ptq_loses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W4 per-tensor on the 32x32 CNN: PTQ loses ~3 points; distillation QAT (no labels) wins them back
    in the converted artifact (before the convert fix, convert lost them again)."""
    monkeypatch.setenv(AOTI_ENV, "0")
    x_train, _, x_test, y_test = models.digits_data_32()
    model = models.save_torch_export(models.train_digits_cnn32(), torch.from_numpy(x_test[:2]), tmp_path / "cnn.pt2")
    training = models.save_npz(tmp_path / "train.npz", x=x_train)
    calibration = models.save_npz(tmp_path / "cal.npz", x=x_train[:256])
    evaluation = models.save_npz(tmp_path / "eval.npz", x=x_test, labels=y_test)
    low_bit = {"weight_bits": 4, "granularity": "per_tensor"}

    ptq = quantize(model, "torch_export", "static", low_bit, tmp_path / "ptq", calibration_path=calibration,
                   evaluation_path=evaluation).metrics["accuracy"]
    qat_result = quantize(model, "torch_export", "qat", {**low_bit, "epochs": 3}, tmp_path / "qat",
                          training_path=training, evaluation_path=evaluation)
    qat = qat_result.metrics["accuracy"]
    drop = ptq["float"] - ptq["quantized"]
    assert drop >= 0.015, ptq  # the case is only meaningful where PTQ loses
    assert qat["quantized"] >= ptq["quantized"] + drop / 2, (ptq, qat)
    assert qat_result.report["torch_export_qat"]["fake_quant_vs_converted"]["cosine_min"] >= 0.999

    with torch.no_grad():  # the saved artifact itself, on the whole held-out set
        out = torch.export.load(str(qat_result.artifacts[0].path)).module()(torch.from_numpy(x_test))
    assert np.mean(out.numpy().argmax(1) == y_test) >= ptq["quantized"] + drop / 2 - 0.01
