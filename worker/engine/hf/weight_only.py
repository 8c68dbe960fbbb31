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

Every report ranks the layers (hf/sensitivity.py, metrics.sensitivity); config.target keeps the most sensitive at
int8 (int4 jobs) or float (int8 jobs) until it holds, and bits auto picks int4/int8 per layer under
max_size_ratio (hf/mixed.py). Either way one more llm-compressor pass writes the chosen mix (compress.py: a config
group per bits), and that checkpoint is what is measured and delivered.
"""

from __future__ import annotations

import copy
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from worker.engine import accelerator, bits_auto, evaluate, report
from worker.engine import sensitivity_analysis as analysis
from worker.engine.errors import EngineError
from worker.engine.hf import common as hf_common
from worker.engine.hf import compress, mixed
from worker.engine.hf import measure as hf_measure
from worker.engine.hf import sensitivity as hf_sensitivity
from worker.engine.hf.compress import Plan, plan_layers
from worker.engine.types import ArtifactFile, QuantizeResult

if TYPE_CHECKING:
    import torch

    from worker.engine.config import WeightOnlyConfig
    from worker.engine.context import JobContext

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


def _layers(float_model: torch.nn.Module, plan: Plan, config: WeightOnlyConfig, sqnr: dict[str, float]) -> list[dict]:
    import torch

    quantized = set(plan.quantized())
    rows = []
    for name, module in float_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            stored = str(module.weight.dtype).removeprefix("torch.")  # bfloat16 checkpoints stay bfloat16
            dtype = f"int{plan.bits(name, config)}" if name in quantized else stored
            rows.append({"name": name, "op": "Linear", "weight_dtype": dtype, "activation_dtype": stored,
                         "sqnr_db": sqnr.get(name)})
    return rows


def _notes(plan: Plan, config: WeightOnlyConfig, other_weights: list[str], device: str) -> list[str]:
    notes = [CUDA_NOTE if device == "cuda" else CPU_NOTE]
    if plan.per_channel and config.granularity != "per_channel":
        notes.append(f"group_size {config.group_size} does not divide the input width of {len(plan.per_channel)} "
                     f"layer(s), so they use one scale per output channel: {', '.join(plan.per_channel[:10])}")
    excluded = sorted(n for n, why in plan.kept.items() if why == "exclude")
    if excluded:
        notes.append(f"kept float as asked (exclude): {', '.join(excluded[:10])}")
    for_target = [n for n, why in plan.kept.items() if why == "target"]
    if for_target:
        notes.append(f"kept float for the target (metrics.target): {', '.join(for_target[:10])}")
    at_int8 = [n for n in plan.quantized() if n in plan.at_int8]
    if at_int8 and config.dtype == "int4":
        why = "bits auto" if config.bits == "auto" else "for the target"
        notes.append(f"{len(at_int8)} layer(s) at int8, the rest int4 ({why}): {', '.join(at_int8[:10])}")
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
    """Quantize the Linear weights of an `hf` model to int4/int8 (some layers at int8 or float for a target or bits
    auto) and deliver a compressed-tensors folder; metrics.sensitivity ranks its layers."""
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
    built = 0

    def build(chosen: Plan, *, algorithm: str | None = None, read_back: bool = False,
              keep: bool = True) -> tuple[Path | None, dict[str, torch.Tensor]]:
        """One llm-compressor pass on a copy of the float model (it rewrites the model in place), saved unless
        keep=False; read_back: its rounded weights too."""
        nonlocal built
        model = copy.deepcopy(float_model)
        compress.run_pass(ctx, model, chosen, tokenizer, algorithm=algorithm)
        weights = compress.rounded_weights(model, chosen.quantized(), float_model.device) if read_back else {}
        built += 1
        return (compress.save(model, ctx.work_dir / f"quantized-{built}") if keep else None), weights

    ctx.progress("quantizing", 0.10)
    plain_dir, job_weights = build(plan, read_back=True)
    # llm-compressor 0.14 runs its pass on the first accelerator it sees (utils/dev.get_main_device), whatever
    # device the model is on: on a GPU host a cpu job's pass runs on the GPU too. Say where it ran.
    from llmcompressor.utils.dev import get_main_device

    quantized_on = str(get_main_device())
    ctx.log("info", f"quantized {len(plan.quantized())} Linear layer(s) to {config.dtype} ({config.algorithm}) "
                    f"on {quantized_on}")
    original_bytes, plain_bytes = hf_common.weights_bytes(folder), hf_common.weights_bytes(plain_dir)
    if config.bits == "auto":  # before any probe or trace: a budget under this model's all-int4 floor cannot be met
        bits_auto.check_floor(config.max_size_ratio, original_bytes=original_bytes, bytes4=plain_bytes,
                              artifact="checkpoint", floor_note=mixed.FLOOR_NOTE)
    # a layer the target keeps: int8 where the job is int4 (as torch_export does), float where it is int8
    keep_as = "int8" if config.dtype == "int4" else "float"
    all8_dir, eight = (build(plan.keeping(set(plan.quantized()), "int8", ""), algorithm="rtn", read_back=True,
                             keep=config.bits == "auto") if keep_as == "int8" else (None, None))
    sensed = hf_sensitivity.analyse(ctx, float_model=float_model, job_weights=job_weights, kept_weights=eight,
                                    samples=samples, keep_as=keep_as, plain_bytes=plain_bytes,
                                    gptq=config.algorithm == "gptq")
    delivered, out_dir, bits_report = plan, plain_dir, None
    if keep_as == "int8" and eight is not None:  # int8 everywhere short of the target: float next
        sensed = hf_sensitivity.escalate(ctx, sensed, float_model=float_model, eight=eight, samples=samples,
                                         plain_bytes=plain_bytes, gptq=config.algorithm == "gptq")
    if sensed.target is not None and sensed.target.get("step") == "float":
        delivered = plan.keeping(set(plan.quantized()), "int8", "").keeping(set(sensed.kept), "float", "target")
        out_dir = build(delivered)[0]
    elif sensed.kept:  # the layers the search kept, written by llm-compressor: the checkpoint it measured, delivered
        delivered = plan.keeping(set(sensed.kept), keep_as, "target")
        out_dir = build(delivered)[0]
    if config.bits == "auto":  # registry: max_size_ratio only, no target beside it
        ctx.progress("quantizing", 0.55)
        feeds, source = mixed.trace_feeds(ctx, tokenizer, samples)
        traces = mixed.traces(float_model, plan.quantized(), feeds)
        ctx.log("info", f"bits auto: Hessian traces of {len(traces)} layers from {mixed.PROBES} Rademacher probes on "
                        f"{len(feeds)} {source} samples")
        layer_rows = mixed.rows(float_model, job_weights, eight, traces, compress.layer_bytes(plain_dir),
                                compress.layer_bytes(all8_dir), source)
        at_int8, bits_report, mixed_dir = mixed.choose(
            ctx, layer_rows, original_bytes=original_bytes, bytes4=plain_bytes,
            build=lambda at8: build(plan.keeping(at8, "int8", "bits auto"))[0])
        bits_report["samples"] = len(feeds)
        if mixed_dir is not None:
            delivered, out_dir = plan.keeping(at_int8, "int8", "bits auto"), mixed_dir
    del job_weights, eight
    for done in {plain_dir, all8_dir} - {out_dir, None}:  # checkpoints the job no longer needs: a model's size each
        shutil.rmtree(done, ignore_errors=True)

    ctx.progress("packaging", 0.60)
    archive = ctx.work_dir / f"{ctx.model_name}.{'auto' if config.bits == 'auto' else config.dtype}.zip"
    _package(folder, out_dir, archive)
    if device == "cuda":
        torch.cuda.empty_cache()
    # measure what was saved, as a user loads it, on the job's device
    quant_model = hf_common.load_model(out_dir, device=device, quantized=True)

    sqnr = hf_measure.layer_sqnr(float_model, quant_model, set(delivered.quantized()), samples.batches)
    metrics = evaluate.measure(
        ctx, hf_common.runner_for_model(float_model), hf_common.runner_for_model(quant_model), samples,
        original_bytes=original_bytes, quantized_bytes=hf_common.weights_bytes(out_dir),
        runtime=f"transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__} "
                f"(eager on {device}, dequantize=True, plain forward)",
        layers=_layers(float_model, delivered, config, sqnr), latency_runs=50,
        extra_warnings=_notes(delivered, config, _other_weights(float_model), device))
    if hf_common.is_causal_lm(float_model):
        metrics["perplexity"], reason = hf_measure.perplexity_metric(float_model, quant_model, samples)
        if reason:
            metrics["warnings"].append(reason)
    group = "per_channel" if config.granularity == "per_channel" else config.group_size
    result = QuantizeResult(
        artifacts=[ArtifactFile(kind="model", path=archive, filename=archive.name, format="hf")],
        metrics=metrics,
        report={"versions": {**report.runtime_versions(), "transformers": transformers.__version__,
                             "compressed-tensors": compressed_tensors.__version__, "torch": torch.__version__},
                "host": report.host_info(),
                "hf_weight_only": {
                    "quantizer": f"llm-compressor {compress.MODIFIERS[config.algorithm]} ({config.algorithm})",
                    "format": "compressed-tensors pack-quantized", "dtype": config.dtype, "group_size": group,
                    "symmetric": config.symmetric, "architecture": type(float_model).__name__,
                    "device": accelerator.describe(device), "quantized_on": quantized_on,
                    "measured_as": "CompressedTensorsConfig(dequantize=True), re-quantizing forward removed",
                    "size_counts": "*.safetensors weights only (tokenizer and config files excluded)",
                    "kept_float": dict(sorted(delivered.kept.items())), **_kept_for_target(sensed, keep_as),
                    **({"bits_auto": bits_report} if bits_report is not None else {})},
                "loader": _loader_snippet(float_model, archive.name)},
    )
    return _attach(result, sensed)


def _kept_for_target(sensed: analysis.Outcome, keep_as: str) -> dict[str, list[str]]:
    """The report's kept_<bits>_for_target: both lists once the target escalated from int8 to float."""
    target = sensed.target or {}
    if target.get("step") == "float" and "kept_int8" in target:
        return {"kept_int8_for_target": target["kept_int8"], "kept_float_for_target": target["kept_float"]}
    return {f"kept_{keep_as}_for_target": sensed.kept}


def _attach(result: QuantizeResult, sensed: analysis.Outcome) -> QuantizeResult:
    """sensitivity_analysis.attach, with the cost note in this format's terms."""
    analysis.attach(result, sensed)
    cost = (result.metrics.get("target") or {}).get("cost")
    if cost is not None and cost.get("bytes_before") is not None:
        target = result.metrics["target"]
        kept = [*target.get("kept_int8", []), *target.get("kept_float", [])]
        cost["note"] = (f"keeping {len(kept)} layer(s) at higher precision changed the *.safetensors weights by "
                        f"{cost['bytes_after'] - cost['bytes_before']:+d} bytes; the speed under transformers does "
                        "not change (every layer runs as float weights once unpacked)")
    return result


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
