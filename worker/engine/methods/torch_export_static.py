"""torch.export static int8: PT2E with X86InductorQuantizer, calibrated, delivered as `.pt2` + AOTInductor package.

Calibration algorithms (activations; weights always use min/max of the weights themselves):
- `minmax`: MinMaxObserver, the observed range as is.
- `histogram`: HistogramObserver, the X86 recipe's own default (searches the clipping range that
  minimises the L2 quantization error over a histogram).
- `entropy`, `percentile`: torchao has no PT2E observer for them; the job fails with `unsupported`
  rather than quietly running another algorithm.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import evaluate, report
from worker.engine.formats import torch_export as pt2_format
from worker.engine.types import EngineError, QuantizeResult, TensorSpec

if TYPE_CHECKING:
    import torch

    from worker.engine import JobContext
    from worker.engine.config import QATConfig, TorchExportStaticConfig

CALIBRATION_BATCH = 32  # batches, not single samples: HistogramObserver's work is per call
_ALGORITHMS = {"minmax": "MinMaxObserver", "histogram": "HistogramObserver"}
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
        if algorithm not in _ALGORITHMS:
            raise EngineError(f"calibration algorithm {algorithm!r} is not available for torch.export static "
                              f"quantization (PT2E has no such observer); use one of {sorted(_ALGORITHMS)}",
                              code="unsupported")
        act_ctr = getattr(obs, _ALGORITHMS[algorithm]).with_args(eps=EPS)
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


def weight_layer_names(gm: torch.fx.GraphModule) -> list[str]:
    """Module paths of the conv/linear layers, graph order."""
    from worker.engine.methods.pt2e_deliver import _WEIGHT_OPS
    from worker.engine.methods.pt2e_lowering import module_path

    names = [module_path(n)[0] for n in gm.graph.nodes if n.op == "call_function" and n.target in _WEIGHT_OPS]
    return list(dict.fromkeys(names))


def excluded_layers(names: list[str], patterns: tuple[str, ...]) -> set[str]:
    regexes = [re.compile(p) for p in patterns]
    return {n for n in names if any(r.search(n) for r in regexes)}


def choose_reduce_range() -> tuple[bool, str]:
    """Full 8-bit activations, also without VNNI: measured on this AVX2-only CPU, the AOTI package's oneDNN
    int8 kernels scored the same SQNR as the eager Q/DQ program (44 dB on the 32x32 CNN): no vpmaddubsw
    saturation as ORT showed (ENGINE.md). pt2e_deliver warns if a compiled package ever falls behind."""
    vnni = report.host_info().get("vnni")
    return False, f"full 8-bit activations (CPU VNNI: {vnni})"


def batched(samples: list[dict[str, np.ndarray]], specs: list[TensorSpec], size: int) -> Iterator[tuple]:
    """Stack batch-1 samples into batches of `size` when every input's batch dim is symbolic."""
    import torch

    if not all(s.shape and isinstance(s.shape[0], str) for s in specs):
        size = 1  # a fixed batch dimension: feed samples as they come
    for start in range(0, len(samples), size):
        chunk = samples[start : start + size]
        yield tuple(torch.from_numpy(np.concatenate([c[s.name] for c in chunk])) for s in specs)


def calibration_samples(ctx: JobContext, specs: list[TensorSpec], num_samples: int) -> list[dict[str, np.ndarray]]:
    if ctx.calibration_path is None:
        raise EngineError("static quantization needs a calibration dataset (an .npz of typical inputs) to "
                          "choose activation ranges; give calibration_dataset_id", code="invalid_input")
    return evaluate.load_npz(Path(ctx.calibration_path), specs, num_samples, "calibration").batches


def run(ctx: JobContext) -> QuantizeResult:
    """Quantize a `.pt2` program's convolutions and Linear layers to int8 weights and uint8 activations."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from worker.engine.methods import pt2e_deliver

    config: TorchExportStaticConfig = ctx.config
    ctx.progress("loading", 0.02)
    program = pt2_format.load_program(ctx.model_path, scratch=ctx.work_dir)
    specs = pt2_format.input_specs(program)
    samples = evaluate.load_samples(ctx, specs)  # fail on a bad dataset before any work
    calibration = calibration_samples(ctx, specs, config.calibration.num_samples)
    reduce_range, range_note = choose_reduce_range()
    qconfig = quantization_config(config, is_qat=False, reduce_range=reduce_range)

    module = program.module()
    names = weight_layer_names(module)
    if not names:
        raise EngineError("static quantization found no convolution or Linear layer in this program",
                          code="nothing_to_quantize")
    excluded = excluded_layers(names, config.exclude)
    notes = symmetric_notes(config)
    ctx.progress("calibrating", 0.05)
    try:
        with warnings.catch_warnings():
            # the X86 recipe warns for every op it leaves float (e.g. a max-pool on a float input)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchao\..*")
            prepared = prepare_pt2e(module, quantizer(qconfig, excluded))
            batches = list(batched(calibration, specs, CALIBRATION_BATCH))
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    prepared(*batch)
                    ctx.progress("calibrating", 0.05 + 0.30 * (i + 1) / len(batches))
            ctx.progress("quantizing", 0.38)
            converted = convert_pt2e(prepared)
    except EngineError:
        raise
    except Exception as exc:  # PT2E raises many types on graphs it cannot handle
        raise EngineError(f"PT2E static quantization failed on this program: {type(exc).__name__}: "
                          f"{str(exc)[:500]}", code="unsupported") from None
    ctx.log("info", f"calibrated on {len(calibration)} samples with {_ALGORITHMS[config.calibration.algorithm]}")
    details = {"quantizer": "X86InductorQuantizer (static)", "weight_bits": config.weight_bits,
               "granularity": config.granularity, "calibration_samples": len(calibration),
               "activation_observer": _ALGORITHMS[config.calibration.algorithm], "reduce_range": reduce_range,
               "activation_range": range_note, "kept_float": sorted(excluded)}
    return pt2e_deliver.deliver(ctx, float_program=program, converted=converted, specs=specs, samples=samples,
                                bits=config.weight_bits, method_key="torch_export_static", notes=notes,
                                details=details)


def symmetric_notes(config: TorchExportStaticConfig | QATConfig) -> list[str]:
    notes = []
    if not config.symmetric:
        notes.append("asymmetric weights are not offered by the x86 int8 kernels; weights were quantized "
                     "symmetrically")
    if config.weight_bits == 4:
        notes.append("4-bit weights are stored and run as int8 (values -8..7): the model is no smaller or "
                     "faster than with 8-bit weights, only less exact")
    return notes
