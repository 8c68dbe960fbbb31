"""(format, method) -> MethodSpec: the one list that capabilities and the worker both read. torch-free."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple

from worker.engine.config import (
    AutoConfig,
    DynamicConfig,
    MethodConfig,
    QATConfig,
    StaticConfig,
    TorchExportStaticConfig,
    WeightOnlyConfig,
)
from worker.engine.errors import UnsupportedMethodError
from worker.engine.types import Device, Method, ModelFormat, Status


class MethodSpec(NamedTuple):
    format: ModelFormat
    method: Method
    config_model: type[MethodConfig]
    handler: str  # "module:function", imported only when a job runs
    devices: frozenset[Device]
    status: Status
    needs_calibration: bool = False
    needs_training: bool = False
    dtypes: tuple[str, ...] = ("int8",)
    # What this backend cannot do within the shared config on a device: (config, device) -> [(field, why)],
    # checked before queueing. Written per device where the backends differ (torch.export int4 on cuda).
    option_limits: Callable[[Any, Device], list[tuple[str, str]]] | None = None
    # config.target is honoured: the job measures per-layer sensitivity and keeps layers at higher precision
    supports_target: bool = False
    target_metrics: tuple[str, ...] = ()
    # weight_only bits "auto": int4/int8 per layer under a size or latency budget
    supports_auto_bits: bool = False
    # method auto: the candidates its sweep may run (worker/engine/sweep.py), those the model and data allow
    sweep_candidates: tuple[str, ...] = ()

    def config_problems(self, config: MethodConfig, device: Device | str | None = None) -> list[tuple[str, str]]:
        """What `config` asks of this pair that the backend cannot do on `device`. Without a device: only
        the fields that no device of this pair can serve (a caller that does not know the device yet)."""
        problems = self._target_problems(config)
        if getattr(config, "bits", None) == "auto" and not self.supports_auto_bits:
            offered = ", ".join(f"{s.format}/{s.method}" for s in SPECS.values() if s.supports_auto_bits)
            problems.append(("bits", f"{self.format}/{self.method} does not take bits 'auto' yet; offered for: "
                                     f"{offered}"))
        if self.option_limits is None:
            return problems
        if device is not None:
            return problems + self.option_limits(config, Device(device))
        per_device = [self.option_limits(config, d) for d in sorted(self.devices)]
        everywhere = set.intersection(*({field for field, _ in found} for found in per_device))
        return problems + [(field, why) for field, why in per_device[0] if field in everywhere]

    def _target_problems(self, config: MethodConfig) -> list[tuple[str, str]]:
        if config.target is None:
            return []
        if not self.supports_target:
            offered = ", ".join(f"{s.format}/{s.method}" for s in SPECS.values() if s.supports_target)
            return [("target", f"{self.format}/{self.method} does not take a target yet; offered for: {offered}")]
        if config.target.metric not in self.target_metrics:
            return [("target.metric", f"{config.target.metric!r} is not measured by {self.format}/{self.method}; "
                                      f"use one of {', '.join(self.target_metrics)}")]
        return []

    def load_handler(self) -> Callable[..., Any]:
        module_name, _, attr = self.handler.partition(":")
        return getattr(importlib.import_module(module_name), attr)


_CPU = frozenset({Device.cpu})
_CPU_CUDA = frozenset({Device.cpu, Device.cuda})


def _onnx_weight_only_limits(config: WeightOnlyConfig, device: Device) -> list[tuple[str, str]]:  # noqa: ARG001
    """onnxruntime 1.32's MatMulNBits quantizers: block-wise only, HQQ/GPTQ 4-bit only, AWQ needs a GPU."""
    problems = []
    if config.group_size == -1 or config.granularity == "per_channel":
        problems.append(("group_size", "onnxruntime's MatMulNBits has no per-channel mode; use 32, 64 or 128"))
    if config.algorithm == "awq":
        problems.append(("algorithm", "awq needs NVIDIA ModelOpt and a GPU in onnxruntime; use rtn, hqq or gptq"))
    elif config.dtype == "int8" and config.algorithm in ("hqq", "gptq"):
        problems.append(("algorithm", f"{config.algorithm} is 4-bit only in onnxruntime; use dtype int4 or rtn"))
    if config.bits == "auto" and config.algorithm != "rtn":
        # each layer's gain is measured by quantizing it alone: one HQQ/GPTQ pass takes 10-15 s on MiniLM
        problems.append(("algorithm", "bits 'auto' measures every layer with round to nearest; use algorithm rtn"))
    if config.bits == "auto" and config.max_size_ratio is not None and config.group_size > 0:
        floor = int4_size_floor(config.group_size, config.symmetric)
        if config.max_size_ratio < floor:
            problems.append(("max_size_ratio", f"{config.max_size_ratio} is below what int4 blocks of "
                             f"{config.group_size} reach on any model: {floor:.3f} of float32 weights (4 bits and a "
                             "float32 scale per block); raise it, or use a larger group_size"))
    return problems


def int4_size_floor(group_size: int, symmetric: bool) -> float:
    """The smallest size ratio MatMulNBits int4 reaches on float32 weights: half a byte per weight, a float32
    scale per block, and half a byte of zero point per block when asymmetric; everything else only adds."""
    return (0.5 + (4.0 + (0.0 if symmetric else 0.5)) / group_size) / 4.0


def _torch_static_limits(config: StaticConfig, device: Device) -> list[tuple[str, str]]:  # noqa: ARG001
    """torchao's PT2E and torch.ao's JIT quantization offer min/max and histogram observers only."""
    algorithm = config.calibration.algorithm
    if algorithm in ("entropy", "percentile"):
        return [("calibration.algorithm", f"{algorithm!r} has no PT2E or torch.ao observer; use minmax or histogram")]
    return []


def _torch_weight_only_limits(config: WeightOnlyConfig, device: Device) -> list[tuple[str, str]]:
    """torchao weight-only on a .pt2. cpu: round to nearest only (no GPTQ/AWQ/HQQ path runs on a CPU). cuda:
    torchao's int4 tinygemm layout (torch_export/int4_cuda.py): int4 only, group-wise only (the kernel has
    no per-channel mode), and rtn or hqq (torchao's data-free HQQ qparams for that layout)."""
    problems = []
    if config.bits == "auto":  # torch_export/weight_only_auto.py: Hessian traces per byte, a size budget only
        if config.max_latency_ms is not None:
            problems.append(("max_latency_ms", "torch.export bits 'auto' budgets size only; use max_size_ratio"))
        if config.target is not None:
            problems.append(("target", "bits 'auto' chooses each layer's bits by its budget; give a target or "
                                       "bits 'auto', not both"))
        if device != Device.cpu:
            problems.append(("bits", "bits 'auto' mixes int4 and int8, and the cuda kernel is int4 only; use device "
                                     "cpu"))
    if device == Device.cpu:
        if config.algorithm != "rtn":
            problems.append(("algorithm", f"{config.algorithm!r} is not available: only rtn for torch.export on cpu"))
        return problems
    if config.dtype != "int4":
        problems.append(("dtype", "torch.export weight-only on cuda is int4 (the tinygemm kernel); use dtype "
                                  "int4, or device cpu for int8"))
    if config.group_size == -1 or config.granularity == "per_channel":
        problems.append(("group_size", "the int4 tinygemm kernel is group-wise only; use 32, 64 or 128"))
    if config.algorithm not in ("rtn", "hqq"):
        problems.append(("algorithm", f"{config.algorithm!r} is not available for torch.export on cuda; "
                                      "use rtn or hqq"))
    return problems


def _hf_weight_only_limits(config: WeightOnlyConfig, device: Device) -> list[tuple[str, str]]:  # noqa: ARG001
    """llm-compressor here: round to nearest and GPTQ (AWQ needs per-architecture mappings; HQQ is not in it).
    bits auto (hf/mixed.py) budgets size only: transformers runs the checkpoint unpacked to float, so its latency
    does not depend on the bits."""
    problems = []
    if config.algorithm in ("awq", "hqq"):
        problems.append(("algorithm", f"{config.algorithm!r} is not available for hf models; use rtn or gptq"))
    if config.bits == "auto" and config.max_latency_ms is not None:
        problems.append(("max_latency_ms", "hf bits 'auto' budgets size only: transformers runs compressed-tensors "
                                           "checkpoints with their weights unpacked to float, so latency does not "
                                           "depend on the bits; use max_size_ratio"))
    if config.bits == "auto" and config.target is not None:
        problems.append(("target", "bits 'auto' chooses each layer's bits by its budget; give a target or bits "
                                   "'auto', not both"))
    return problems


# ONNX classifiers and encoders: no perplexity (that is measured for hf causal LMs on text only)
_ONNX_TARGET: dict[str, Any] = {"supports_target": True, "target_metrics": ("accuracy", "top1_agreement", "cosine")}
# torch.export classifiers and encoders: the same measured figures, in eager torch (torch_export/sensitivity.py)
_PT2_TARGET: dict[str, Any] = {"supports_target": True, "target_metrics": ("accuracy", "top1_agreement", "cosine")}
# hf: the same, plus perplexity for causal LMs on text (hf/sensitivity.py measures it on every candidate)
_HF_TARGET: dict[str, Any] = {"supports_target": True,
                              "target_metrics": ("accuracy", "top1_agreement", "cosine", "perplexity")}
# TorchScript classifiers and encoders: the same figures, on the module torch.ao's JIT passes build
# (torchscript/sensitivity.py)
_TS_TARGET: dict[str, Any] = {"supports_target": True, "target_metrics": ("accuracy", "top1_agreement", "cosine")}
# method auto on the other formats: the sweep itself judges every candidate by these (sweep.choose), and passes the
# target on to each candidate whose method takes one
_SWEEP_TARGET: dict[str, Any] = {"supports_target": True,
                                 "target_metrics": ("accuracy", "top1_agreement", "cosine")}

# Written out by hand, one line per backend path that exists and is tested.
SPECS: Final[Mapping[tuple[ModelFormat, Method], MethodSpec]] = {
    (s.format, s.method): s
    for s in (
        MethodSpec(ModelFormat.onnx, Method.dynamic, DynamicConfig,
                   "worker.engine.onnx.dynamic:run", _CPU, Status.stable, **_ONNX_TARGET),
        MethodSpec(ModelFormat.onnx, Method.static, StaticConfig,
                   "worker.engine.onnx.static:run", _CPU, Status.stable, needs_calibration=True, **_ONNX_TARGET),
        MethodSpec(ModelFormat.onnx, Method.weight_only, WeightOnlyConfig,
                   "worker.engine.onnx.weight_only:run", _CPU, Status.stable, dtypes=("int8", "int4"),
                   option_limits=_onnx_weight_only_limits, supports_auto_bits=True, **_ONNX_TARGET),
        MethodSpec(ModelFormat.onnx, Method.auto, AutoConfig, "worker.engine.onnx.auto:run", _CPU,
                   Status.experimental, dtypes=("int8", "int4"), **_ONNX_TARGET,
                   sweep_candidates=("dynamic", "static_minmax", "static_entropy", "weight_only_int8",
                                     "weight_only_int4")),
        MethodSpec(ModelFormat.torchscript, Method.dynamic, DynamicConfig,
                   "worker.engine.torchscript.dynamic:run", _CPU, Status.legacy, **_TS_TARGET),
        MethodSpec(ModelFormat.torch_export, Method.dynamic, DynamicConfig,
                   "worker.engine.torch_export.dynamic:run", _CPU, Status.experimental, **_PT2_TARGET),
        MethodSpec(ModelFormat.torch_export, Method.static, TorchExportStaticConfig,
                   "worker.engine.torch_export.static:run", _CPU, Status.stable, needs_calibration=True,
                   option_limits=_torch_static_limits, **_PT2_TARGET),
        MethodSpec(ModelFormat.torchscript, Method.static, StaticConfig,
                   "worker.engine.torchscript.static:run", _CPU, Status.legacy, needs_calibration=True,
                   option_limits=_torch_static_limits, **_TS_TARGET),
        MethodSpec(ModelFormat.torch_export, Method.weight_only, WeightOnlyConfig,
                   "worker.engine.torch_export.weight_only:run", _CPU_CUDA, Status.experimental,
                   dtypes=("int8", "int4"), option_limits=_torch_weight_only_limits, **_PT2_TARGET,
                   supports_auto_bits=True),
        MethodSpec(ModelFormat.hf, Method.weight_only, WeightOnlyConfig,
                   "worker.engine.hf.weight_only:run", _CPU_CUDA, Status.experimental, dtypes=("int8", "int4"),
                   option_limits=_hf_weight_only_limits, supports_auto_bits=True, **_HF_TARGET),
        MethodSpec(ModelFormat.torch_export, Method.auto, AutoConfig, "worker.engine.torch_export.auto:run", _CPU,
                   Status.experimental, dtypes=("int8", "int4"), **_PT2_TARGET,
                   sweep_candidates=("dynamic", "static_minmax", "static_histogram", "weight_only_int8",
                                     "weight_only_int4")),
        MethodSpec(ModelFormat.torchscript, Method.auto, AutoConfig, "worker.engine.torchscript.auto:run", _CPU,
                   Status.experimental, **_SWEEP_TARGET,
                   sweep_candidates=("dynamic", "static_minmax", "static_histogram")),
        MethodSpec(ModelFormat.hf, Method.auto, AutoConfig, "worker.engine.hf.auto:run", _CPU,
                   Status.experimental, dtypes=("int8", "int4"), supports_target=True,
                   target_metrics=("accuracy", "top1_agreement", "cosine", "perplexity"),
                   sweep_candidates=("weight_only_int8", "weight_only_int4")),
        # cuda: training only; convert and delivery run on the CPU (tests/unit/test_cuda_paths.py, marker gpu)
        MethodSpec(ModelFormat.torch_export, Method.qat, QATConfig,
                   "worker.engine.torch_export.qat:run", _CPU_CUDA, Status.experimental, needs_training=True,
                   **_PT2_TARGET),
    )
}


def resolve(fmt: str, method: str) -> MethodSpec:
    try:
        return SPECS[(ModelFormat(fmt), Method(method))]
    except (KeyError, ValueError):
        raise UnsupportedMethodError(fmt, method, supported()) from None


def supported() -> list[str]:
    """Every offered pair as "format/method"."""
    return sorted(f"{f}/{m}" for f, m in SPECS)


def devices() -> list[str]:
    return sorted({d.value for spec in SPECS.values() for d in spec.devices})
