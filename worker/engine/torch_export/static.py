"""torch.export static int8: PT2E with X86InductorQuantizer, calibrated, delivered as `.pt2` + AOTInductor package.

Calibration algorithms (activations; weights always use min/max of the weights themselves):
- `minmax`: MinMaxObserver, the observed range as is.
- `histogram`: HistogramObserver, the X86 recipe's own default (searches the clipping range that
  minimises the L2 quantization error over a histogram).
- `entropy`, `percentile`: torchao has no PT2E observer for them; the job fails with `unsupported`
  rather than quietly running another algorithm.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from worker.engine import evaluate
from worker.engine.errors import EngineError
from worker.engine.torch_export import common as pt2_common
from worker.engine.torch_export import sensitivity as pt2_sensitivity
from worker.engine.torch_export.deliver import deliver, layer_rows, weights_per_channel
from worker.engine.torch_export.graph import batched, weight_layer_names
from worker.engine.torch_export.x86_recipe import (
    ALGORITHMS,
    CALIBRATION_BATCH,
    calibration_samples,
    choose_reduce_range,
    quantization_config,
    quantizer,
    symmetric_notes,
)
from worker.engine.types import QuantizeResult

if TYPE_CHECKING:
    from worker.engine.config import TorchExportStaticConfig
    from worker.engine.context import JobContext


def run(ctx: JobContext) -> QuantizeResult:
    """Quantize a `.pt2` program's convolutions and Linear layers to int8 weights and uint8 activations."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config: TorchExportStaticConfig = ctx.config
    ctx.progress("loading", 0.02)
    program = pt2_common.load_program(ctx.model_path, scratch=ctx.work_dir)
    specs = pt2_common.input_specs(program)
    samples = evaluate.load_samples(ctx, specs)  # fail on a bad dataset before any work
    calibration = calibration_samples(ctx, specs, config.calibration.num_samples)
    reduce_range, range_note = choose_reduce_range()
    qconfig = quantization_config(config, is_qat=False, reduce_range=reduce_range)

    names = weight_layer_names(program.module())
    if not names:
        raise EngineError("static quantization found no convolution or Linear layer in this program",
                          code="nothing_to_quantize")
    excluded = {name for name in names if config.excludes(name)}
    notes = symmetric_notes(config)
    batches = list(batched(calibration, specs, CALIBRATION_BATCH))

    def convert(kept_float: frozenset[str] = frozenset(), progress: bool = False) -> torch.fx.GraphModule:
        """prepare, calibrate and convert a fresh copy of the program with `excluded | kept_float` float."""
        try:
            with warnings.catch_warnings():
                # the X86 recipe warns for every op it leaves float (e.g. a max-pool on a float input)
                warnings.filterwarnings("ignore", category=UserWarning, module=r"torchao\..*")
                prepared = prepare_pt2e(program.module(), quantizer(qconfig, excluded | kept_float))
                with torch.no_grad():
                    for i, batch in enumerate(batches):
                        prepared(*batch)
                        if progress:
                            ctx.progress("calibrating", 0.05 + 0.30 * (i + 1) / len(batches))
                return convert_pt2e(prepared)
        except EngineError:
            raise
        except Exception as exc:  # PT2E raises many types on graphs it cannot handle
            raise EngineError(f"PT2E static quantization failed on this program: {type(exc).__name__}: "
                              f"{str(exc)[:500]}", code="unsupported") from exc

    ctx.progress("calibrating", 0.05)
    converted = convert(progress=True)
    artifact = ctx.work_dir / f"{ctx.model_name}.int8.pt2"  # deliver()'s name: the plain candidate's size uses it
    ctx.progress("quantizing", 0.38)
    candidates = [row["name"] for row in layer_rows(converted, config.weight_bits)
                  if row["weight_dtype"] != "float32"]
    sensed = pt2_sensitivity.analyse(ctx, float_module=program.module(), plain=converted, build=convert,
                                     candidates=candidates, specs=specs, samples=samples, span=(0.38, 0.44),
                                     plain_bytes=lambda gm: pt2_sensitivity.saved_bytes(
                                         gm, program, specs, artifact, weights_per_channel))
    if sensed.kept:  # the target keeps these float: the same build the search measured, delivered
        excluded |= set(sensed.kept)
        converted = convert(frozenset(sensed.kept))
    ctx.log("info", f"calibrated on {len(calibration)} samples with {ALGORITHMS[config.calibration.algorithm]}")
    details = {"quantizer": "X86InductorQuantizer (static)", "weight_bits": config.weight_bits,
               "granularity": config.granularity, "calibration_samples": len(calibration),
               "activation_observer": ALGORITHMS[config.calibration.algorithm], "reduce_range": reduce_range,
               "activation_range": range_note, "kept_float": sorted(excluded)}
    result = deliver(ctx, float_program=program, converted=converted, specs=specs, samples=samples,
                     bits=config.weight_bits, method_key="torch_export_static", notes=notes, details=details)
    return pt2_sensitivity.attach(result, sensed)


