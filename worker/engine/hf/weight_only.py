"""Weight-only int4/int8 of a Hugging Face model with llm-compressor, saved as compressed-tensors.

llm-compressor (RTN through QuantizationModifier, GPTQ through GPTQModifier) computes the integer
weights; compressed-tensors packs them (int4: eight to an int32) into safetensors with a
`quantization_config` in config.json. That is the checkpoint vLLM serves with int4/int8 kernels on
NVIDIA GPUs and that transformers loads when compressed-tensors is installed. torchao's CPU int4
path was not used: it stores one int8 per int4 value (no smaller than int8) and runs at ~0.5x
(ENGINE.md). transformers unpacks the weights to float, on a CPU and on a GPU alike (CUDA_NOTE), so the
latency measured here is float-like; the report says so.

On cuda, the float model, llm-compressor's pass (GPTQ's Hessians and solves: where the GPU pays) and both
measured models live on the GPU. The quantized model is measured as a user gets it there (CUDA_NOTE).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.engine import accelerator, evaluate, report
from worker.engine.errors import EngineError
from worker.engine.hf import common as hf_common
from worker.engine.hf import measure as hf_measure
from worker.engine.types import ArtifactFile, QuantizeResult

if TYPE_CHECKING:
    import torch

    from worker.engine.config import WeightOnlyConfig
    from worker.engine.context import JobContext

GPTQ_SAMPLES = 256
MODIFIERS = {"rtn": "QuantizationModifier", "gptq": "GPTQModifier"}
CPU_NOTE = ("on a CPU, transformers runs this checkpoint with its integer weights unpacked to float at load "
            "(CompressedTensorsConfig(dequantize=True), see the report's loader), so it runs at float speed "
            "here; the int4/int8 kernels that make it faster run in vLLM on NVIDIA GPUs (not measured on this "
            "worker)")
# What transformers 5.17 gives a user on a GPU, read from its source: CompressedTensorsHfQuantizer has no kernel
# for pack-quantized int weights (its only kernel path is FP8, `use_optimized_inference`); with the default
# dequantize=False compressed-tensors 0.19 leaves the weights packed and decompresses the whole model to float
# on the first forward (ModelCompressor.add_decompress_hook), and its CompressedLinear, the old
# run_compressed=True path, now raises "no longer supported". So plain from_pretrained and dequantize=True end
# in the same float weights; we load with dequantize=True (at load, not inside the first timed call) and
# measure that, on the GPU.
CUDA_NOTE = ("on the GPU, transformers runs this checkpoint with its integer weights unpacked to float (it has no "
             "int4/int8 kernel for compressed-tensors pack-quantized weights: plain from_pretrained unpacks them on "
             "the first forward, CompressedTensorsConfig(dequantize=True) at load), so the latency measured on cuda "
             "is float-like and GPU memory float-sized; vLLM serves it with int4/int8 kernels, smaller in GPU "
             "memory and faster (not measured on this worker)")


class Plan:
    """Which Linear layers get which weight scheme, and which stay float and why."""

    def __init__(self) -> None:
        self.grouped: list[str] = []
        self.per_channel: list[str] = []  # too narrow for, or not divisible by, the group size
        self.kept: dict[str, str] = {}

    def quantized(self) -> list[str]:
        return self.grouped + self.per_channel


def plan_layers(model: torch.nn.Module, config: WeightOnlyConfig) -> Plan:
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    group = -1 if config.granularity == "per_channel" else config.group_size
    plan = Plan()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if module is head:
            plan.kept[name] = "output head, kept float as llm-compressor recommends"
        elif config.excludes(name):
            plan.kept[name] = "exclude"
        elif group == -1:
            plan.per_channel.append(name)
        elif module.in_features % group:
            plan.per_channel.append(name)
        else:
            plan.grouped.append(name)
    if group == -1:
        plan.grouped, plan.per_channel = plan.per_channel, []
    return plan


def _scheme(names: list[str], config: WeightOnlyConfig, group: int):  # noqa: ANN202 - QuantizationScheme
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    strategy = {"strategy": "channel"} if group == -1 else {"strategy": "group", "group_size": group}
    weights = QuantizationArgs(num_bits=4 if config.dtype == "int4" else 8, type="int",
                               symmetric=config.symmetric, **strategy)
    return QuantizationScheme(targets=[f"re:^{re.escape(n)}$" for n in names], weights=weights)


def _quantize(ctx: JobContext, model: torch.nn.Module, plan: Plan, tokenizer: Any) -> None:
    """llm-compressor's one-shot pass, in place: RTN needs no data, GPTQ runs on the calibration texts."""
    # Its INFO lines go to stdout and would flood the job log (and the CLI's output); ours say what matters.
    # oneshot() reconfigures its logger from these variables on every call. Disabling it outright breaks
    # GPTQ, which then logs at a level ("METRIC") that was never registered.
    os.environ["LLM_COMPRESSOR_LOG_DISABLED"] = "false"
    os.environ["LLM_COMPRESSOR_LOG_LEVEL"] = "ERROR"
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    config: WeightOnlyConfig = ctx.config
    group = -1 if config.granularity == "per_channel" else config.group_size
    groups = {"group_0": _scheme(plan.grouped, config, group)}
    if plan.per_channel:
        groups["group_1"] = _scheme(plan.per_channel, config, -1)
    if config.algorithm == "rtn":
        oneshot(model=model, recipe=QuantizationModifier(config_groups=groups))
        return
    from datasets import Dataset

    if tokenizer is None:
        raise EngineError("gptq needs the model's tokenizer files in the upload", code="dataset_mismatch")
    feeds = hf_measure.calibration_feeds(ctx, tokenizer, limit=GPTQ_SAMPLES)
    rows = {"input_ids": [f["input_ids"][0].tolist() for f in feeds],
            "attention_mask": [f["attention_mask"][0].tolist() for f in feeds]}
    ctx.log("info", f"gptq: calibrating on {len(feeds)} samples")
    oneshot(model=model, dataset=Dataset.from_dict(rows), processor=tokenizer,
            recipe=GPTQModifier(config_groups=groups), num_calibration_samples=len(feeds),
            max_seq_length=max(len(r) for r in rows["input_ids"]))


def _package(folder: Path, out_dir: Path, archive: Path) -> None:
    """Copy the upload's side files (tokenizer, generation config) and zip the folder, weights stored as is."""
    for item in folder.iterdir():
        weights = item.name.endswith(hf_common.WEIGHT_SUFFIX) or item.name in hf_common.WEIGHT_FILES
        if item.is_file() and not weights and not (out_dir / item.name).exists():
            shutil.copy2(item, out_dir / item.name)
    with zipfile.ZipFile(archive, "w") as zf:
        for item in sorted(out_dir.iterdir()):
            stored = item.name.endswith(hf_common.WEIGHT_SUFFIX)  # packed integers do not deflate
            zf.write(item, item.name, compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)


def _layers(float_model: torch.nn.Module, plan: Plan, dtype: str, sqnr: dict[str, float]) -> list[dict]:
    import torch

    quantized = set(plan.quantized())
    rows = []
    for name, module in float_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            stored = str(module.weight.dtype).removeprefix("torch.")  # bfloat16 checkpoints stay bfloat16
            rows.append({"name": name, "op": "Linear", "weight_dtype": dtype if name in quantized else stored,
                         "activation_dtype": stored, "sqnr_db": sqnr.get(name)})
    return rows


def _notes(plan: Plan, config: WeightOnlyConfig, other_weights: list[str], device: str) -> list[str]:
    notes = [CUDA_NOTE if device == "cuda" else CPU_NOTE]
    if plan.per_channel and config.granularity != "per_channel":
        notes.append(f"group_size {config.group_size} does not divide the input width of {len(plan.per_channel)} "
                     f"layer(s), so they use one scale per output channel: {', '.join(plan.per_channel[:10])}")
    excluded = sorted(n for n, why in plan.kept.items() if why == "exclude")
    if excluded:
        notes.append(f"kept float as asked (exclude): {', '.join(excluded[:10])}")
    if other_weights:
        notes.append(f"{len(other_weights)} weight layer(s) that are not Linear stayed float (embeddings, norms, "
                     f"convolutions): {', '.join(other_weights[:5])}")
    return notes


def _other_weights(model: torch.nn.Module) -> list[str]:
    import torch

    return [name for name, module in model.named_modules()
            if not isinstance(module, torch.nn.Linear) and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() >= 2]


def run(ctx: JobContext) -> QuantizeResult:
    """Quantize the Linear weights of an `hf` model to int4/int8 and deliver a compressed-tensors folder."""
    import compressed_tensors
    import torch
    import transformers

    config: WeightOnlyConfig = ctx.config
    device = accelerator.torch_device(ctx.device)
    ctx.progress("loading", 0.02)
    folder = hf_common.unpack(ctx.model_path, ctx.work_dir)
    tokenizer = hf_common.load_tokenizer(folder)
    float_model = hf_common.load_model(folder, device=device)
    vocab = int(getattr(float_model.config, "vocab_size", 0) or 1000)
    samples = hf_measure.samples(ctx, tokenizer, vocab)  # fail on a bad dataset before any work
    plan = plan_layers(float_model, config)
    if not plan.quantized():
        raise EngineError("weight-only quantization found no Linear layer to quantize in this model "
                          "(all excluded, or the architecture uses other layer types)", code="nothing_to_quantize")

    ctx.progress("quantizing", 0.10)
    model = copy.deepcopy(float_model)  # llm-compressor rewrites it in place; the float one stays the reference
    try:
        _quantize(ctx, model, plan, tokenizer)
    except EngineError:
        raise
    except Exception as exc:  # llm-compressor raises many types on models it cannot trace or quantize
        raise EngineError(f"llm-compressor could not quantize this model: {type(exc).__name__}: {str(exc)[:500]}",
                          code="unsupported") from exc
    # llm-compressor 0.14 runs its pass on the first accelerator it sees (utils/dev.get_main_device), whatever
    # device the model is on: on a GPU host a cpu job's pass runs on the GPU too. Say where it ran.
    from llmcompressor.utils.dev import get_main_device

    quantized_on = str(get_main_device())
    ctx.log("info", f"quantized {len(plan.quantized())} Linear layer(s) to {config.dtype} ({config.algorithm}) "
                    f"on {quantized_on}")

    ctx.progress("packaging", 0.60)
    out_dir = ctx.work_dir / "quantized"
    model.save_pretrained(str(out_dir), save_compressed=True)
    del model
    archive = ctx.work_dir / f"{ctx.model_name}.{config.dtype}.zip"
    _package(folder, out_dir, archive)
    if device == "cuda":
        torch.cuda.empty_cache()
    # measure what was saved, as a user loads it, on the job's device
    quant_model = hf_common.load_model(out_dir, device=device, quantized=True)

    sqnr = hf_measure.layer_sqnr(float_model, quant_model, set(plan.quantized()), samples.batches)
    layers = _layers(float_model, plan, config.dtype, sqnr)
    metrics = evaluate.measure(
        ctx, hf_common.runner_for_model(float_model), hf_common.runner_for_model(quant_model), samples,
        original_bytes=hf_common.weights_bytes(folder), quantized_bytes=hf_common.weights_bytes(out_dir),
        runtime=f"transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__} "
                f"(eager on {device}, dequantize=True, plain forward)",
        layers=layers, latency_runs=50, extra_warnings=_notes(plan, config, _other_weights(float_model), device))
    if hf_common.is_causal_lm(float_model):
        metrics["perplexity"], reason = hf_measure.perplexity_metric(float_model, quant_model, samples)
        if reason:
            metrics["warnings"].append(reason)
    group = "per_channel" if config.granularity == "per_channel" else config.group_size
    return QuantizeResult(
        artifacts=[ArtifactFile(kind="model", path=archive, filename=archive.name, format="hf")],
        metrics=metrics,
        report={"versions": {**report.runtime_versions(), "transformers": transformers.__version__,
                             "compressed-tensors": compressed_tensors.__version__, "torch": torch.__version__},
                "host": report.host_info(),
                "hf_weight_only": {
                    "quantizer": f"llm-compressor {MODIFIERS[config.algorithm]} ({config.algorithm})",
                    "format": "compressed-tensors pack-quantized", "dtype": config.dtype, "group_size": group,
                    "symmetric": config.symmetric, "architecture": type(float_model).__name__,
                    "device": accelerator.describe(device), "quantized_on": quantized_on,
                    "measured_as": "CompressedTensorsConfig(dequantize=True), re-quantizing forward removed",
                    "size_counts": "*.safetensors weights only (tokenizer and config files excluded)",
                    "kept_float": dict(sorted(plan.kept.items()))},
                "loader": _loader_snippet(float_model, archive.name)},
    )


def _loader_snippet(model: torch.nn.Module, filename: str) -> str:
    folder = filename.removesuffix(".zip")
    cls = type(model).__name__
    return (f"# unzip {filename} -d {folder}; needs transformers and compressed-tensors\n"
            f"from transformers import {cls}, CompressedTensorsConfig\n"
            "# on a CPU and on a GPU alike, transformers unpacks the integer weights to float (it has no\n"
            "# int4/int8 kernel for this format): do it once, at load\n"
            f"model = {cls}.from_pretrained(\"{folder}\", "
            f"quantization_config=CompressedTensorsConfig(dequantize=True))\n"
            f"for module in model.modules():  # the weights are exact now: drop the per-call re-quantizing\n"
            f"    if getattr(module, \"quantization_scheme\", None) is not None and \"forward\" in vars(module):\n"
            f"        del module.forward\n"
            "# on a GPU: model = model.to(\"cuda\")\n"
            f"# serving on NVIDIA GPUs: vllm serve ./{folder}")
