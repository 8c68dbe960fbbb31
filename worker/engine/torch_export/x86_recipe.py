"""Our static/QAT config mapped onto torchao's X86 PT2E recipe; shared by torch.export static and QAT and
by TorchScript static (the same observers and calibration rules)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import evaluate, report
from worker.engine.errors import EngineError
from worker.engine.types import TensorSpec

if TYPE_CHECKING:
    from worker.engine.config import QATConfig, TorchExportStaticConfig
    from worker.engine.context import JobContext

CALIBRATION_BATCH = 32  # batches, not single samples: HistogramObserver's work is per call
ALGORITHMS = {"minmax": "MinMaxObserver", "histogram": "HistogramObserver",
              # auto: choosing by held-out fidelity is ONNX-only so far; PT2E keeps its minmax default
              "auto": "MinMaxObserver"}


EPS = 2.0**-12  # the X86 recipe's eps for every observer


def _trained_grid_fake_quantize() -> type:
    """FusedMovingAvgObsFakeQuantize whose convert uses the scale training used (the W4A8 QAT collapse).

    The fused kernel picks scales like ATen's choose_qparams: symmetric over [-8, 7] it takes
    max(|min|/8, max/7). convert_pt2e asks the observer instead, whose Python formula is
    max(|min|, max)/7.5: every converted weight moved to a grid 7% off the one training fitted, which
    undid QAT at 4 bits (PTQ 91.9 %, fake-quant 94.4 %, converted 91.4 % on the per-tensor digits CNN;
    with this class the converted model scores the fake-quant model's 94.4 %). At 8 bits the two
    formulas differ by 127 vs 127.5, too little to notice. So convert reads the buffers training used.
    """
    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize

    class TrainedGridFakeQuantize(FusedMovingAvgObsFakeQuantize):
        def calculate_qparams(self):  # noqa: ANN202 - (scale, zero_point) tensors
            return self.scale.detach().clone(), self.zero_point.detach().clone()

    return TrainedGridFakeQuantize


def quantization_config(config: TorchExportStaticConfig | QATConfig, *, is_qat: bool, reduce_range: bool):
    """Our config mapped onto the X86 recipe: activation observer, weight bits and granularity."""
    import torch
    from torchao.quantization.pt2e import observer as obs
    from torchao.quantization.pt2e.quantizer import QuantizationSpec
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        get_default_x86_inductor_quantization_config,
    )

    base = get_default_x86_inductor_quantization_config(is_qat=is_qat, is_dynamic=False, reduce_range=reduce_range)
    per_channel = config.granularity == "per_channel"
    bits = config.weight_bits
    if is_qat:
        fake_quant = _trained_grid_fake_quantize()
        act_ctr = fake_quant.with_args(eps=EPS)
        weight_ctr = fake_quant.with_args(eps=EPS, observer=obs.MovingAveragePerChannelMinMaxObserver
                                          if per_channel else obs.MovingAverageMinMaxObserver)
    else:
        algorithm = config.calibration.algorithm
        if algorithm not in ALGORITHMS:
            raise EngineError(f"calibration algorithm {algorithm!r} is not available for torch.export static "
                              f"quantization (PT2E has no such observer); use one of {sorted(ALGORITHMS)}",
                              code="unsupported")
        act_ctr = getattr(obs, ALGORITHMS[algorithm]).with_args(eps=EPS)
        weight_ctr = (obs.PerChannelMinMaxObserver if per_channel else obs.MinMaxObserver).with_args(eps=EPS)
    activation = dataclasses.replace(base.input_activation, observer_or_fake_quant_ctr=act_ctr)
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-(2 ** (bits - 1)), quant_max=2 ** (bits - 1) - 1,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
        ch_axis=0 if per_channel else None, is_dynamic=False, observer_or_fake_quant_ctr=weight_ctr)
    return dataclasses.replace(base, input_activation=activation, output_activation=activation, weight=weight)


def quantizer(qconfig: Any, excluded: set[str]):  # noqa: ANN201 - torchao X86InductorQuantizer
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    result = X86InductorQuantizer().set_global(qconfig)
    for name in sorted(excluded):
        result.set_module_name_qconfig(name, None)
    return result


def choose_reduce_range() -> tuple[bool, str]:
    """Full 8-bit activations, also without VNNI: measured on this AVX2-only CPU, the AOTI package's oneDNN
    int8 kernels scored the same SQNR as the eager Q/DQ program (44 dB on the 32x32 CNN): no vpmaddubsw
    saturation as ORT showed (ENGINE.md). pt2e_deliver warns if a compiled package ever falls behind."""
    vnni = report.host_info().get("vnni")
    return False, f"full 8-bit activations (CPU VNNI: {vnni})"


def calibration_samples(ctx: JobContext, specs: list[TensorSpec], num_samples: int) -> list[dict[str, np.ndarray]]:
    if ctx.calibration_path is None:
        raise EngineError("static quantization needs a calibration dataset (an .npz of typical inputs) to "
                          "choose activation ranges; give calibration_dataset_id", code="invalid_input")
    return evaluate.load_npz(Path(ctx.calibration_path), specs, num_samples, "calibration").batches


def symmetric_notes(config: TorchExportStaticConfig | QATConfig) -> list[str]:
    notes = []
    if not config.symmetric:
        notes.append("asymmetric weights are not offered by the x86 int8 kernels; weights were quantized "
                     "symmetrically")
    if config.weight_bits == 4:
        notes.append("4-bit weights are stored and run as int8 (values -8..7): the model is no smaller or "
                     "faster than with 8-bit weights, only less exact")
    return notes
