"""llm-compressor passes for hf weight_only: which Linear gets which scheme, the one-shot pass, the rounded weights
read back from it, and each layer's bytes in a saved checkpoint.

A layer's bits are per layer (Plan.at_int8: the layers a target or bits auto raise to 8 bits in an int4 job), so one
pass writes one compressed-tensors checkpoint whose quantization_config has a config group per (bits, strategy).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.engine.errors import EngineError
from worker.engine.hf import common as hf_common
from worker.engine.hf import measure as hf_measure

if TYPE_CHECKING:
    import torch

    from worker.engine.config import WeightOnlyConfig
    from worker.engine.context import JobContext

GPTQ_SAMPLES = 256
MODIFIERS = {"rtn": "QuantizationModifier", "gptq": "GPTQModifier"}


@dataclass(frozen=True)
class Plan:
    """Which Linear layers get which weight scheme, and which stay float and why."""

    grouped: tuple[str, ...] = ()
    per_channel: tuple[str, ...] = ()  # too narrow for, or not divisible by, the group size
    kept: dict[str, str] = field(default_factory=dict)  # layer -> why it stays float
    at_int8: frozenset[str] = frozenset()  # int4 jobs: layers raised to 8 bits (a target, bits auto)

    def quantized(self) -> list[str]:
        return [*self.grouped, *self.per_channel]

    def bits(self, name: str, config: WeightOnlyConfig) -> int:
        return 8 if config.dtype == "int8" or name in self.at_int8 else 4

    def keeping(self, names: frozenset[str] | set[str], keep_as: str, why: str) -> Plan:
        """This plan with `names` at int8 (keep_as "int8") or float (anything else) instead of the job's bits."""
        if keep_as == "int8":
            return replace(self, at_int8=self.at_int8 | frozenset(names))
        return replace(self, grouped=tuple(n for n in self.grouped if n not in names),
                       per_channel=tuple(n for n in self.per_channel if n not in names),
                       kept={**self.kept, **{n: why for n in names if n in self.quantized()}})


def plan_layers(model: torch.nn.Module, config: WeightOnlyConfig) -> Plan:
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    group = -1 if config.granularity == "per_channel" else config.group_size
    grouped, per_channel, kept = [], [], {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if module is head:
            kept[name] = "output head, kept float as llm-compressor recommends"
        elif config.excludes(name):
            kept[name] = "exclude"
        elif group != -1 and module.in_features % group:
            per_channel.append(name)
        else:
            grouped.append(name)  # with group -1 (per channel) every layer: config_groups gives it the channel scheme
    return Plan(grouped=tuple(grouped), per_channel=tuple(per_channel), kept=kept)


def _scheme(names: list[str], bits: int, config: WeightOnlyConfig, group: int):  # noqa: ANN202 - QuantizationScheme
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    strategy = {"strategy": "channel"} if group == -1 else {"strategy": "group", "group_size": group}
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=config.symmetric, **strategy)
    return QuantizationScheme(targets=[f"re:^{re.escape(n)}$" for n in names], weights=weights)


def config_groups(plan: Plan, config: WeightOnlyConfig) -> dict[str, Any]:
    """One compressed-tensors scheme per (bits, strategy) that has layers: llm-compressor's config_groups."""
    group = -1 if config.granularity == "per_channel" else config.group_size
    groups = {}
    for bits in (4, 8):
        for names, size in ((plan.grouped, group), (plan.per_channel, -1)):
            chosen = [n for n in names if plan.bits(n, config) == bits]
            if chosen:
                groups[f"group_{len(groups)}"] = _scheme(chosen, bits, config, size)
    return groups


def run_pass(ctx: JobContext, model: torch.nn.Module, plan: Plan, tokenizer: Any, *,
             algorithm: str | None = None) -> None:
    """llm-compressor's one-shot pass, in place: RTN needs no data, GPTQ runs on the calibration texts.
    `algorithm` overrides the config's (the round-to-nearest passes sensitivity and bits auto read weights from)."""
    # Its INFO lines go to stdout and would flood the job log (and the CLI's output); ours say what matters.
    # oneshot() reconfigures its logger from these variables on every call. Disabling it outright breaks
    # GPTQ, which then logs at a level ("METRIC") that was never registered.
    os.environ["LLM_COMPRESSOR_LOG_DISABLED"] = "false"
    os.environ["LLM_COMPRESSOR_LOG_LEVEL"] = "ERROR"
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    config: WeightOnlyConfig = ctx.config
    groups = config_groups(plan, config)
    try:
        if (algorithm or config.algorithm) == "rtn":
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
    except EngineError:
        raise
    except Exception as exc:  # llm-compressor raises many types on models it cannot trace or quantize
        raise EngineError(f"llm-compressor could not quantize this model: {type(exc).__name__}: {str(exc)[:500]}",
                          code="unsupported") from exc


def rounded_weights(model: torch.nn.Module, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Each named layer's weight as the pass rounded it, dequantized: compressed-tensors' own forward_quantize with
    the scale and zero point the pass wrote (GPTQ's weights are already on the grid; this leaves them there). On
    `device`, the float model's: llm-compressor may run its pass on another (weight_only.py, quantized_on)."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    modules = dict(model.named_modules())
    found = {}
    for name in names:
        module = modules[name]
        found[name] = forward_quantize(module, module.weight.data, "weight",
                                       module.quantization_scheme.weights).detach().to(device, copy=True)
    return found


def save(model: torch.nn.Module, out_dir: Path) -> Path:
    model.save_pretrained(str(out_dir), save_compressed=True)
    return out_dir


def layer_bytes(folder: Path) -> dict[str, int]:
    """Bytes each module's tensors take in a saved checkpoint (packed weights, scales, zero points, shapes), read from
    the safetensors headers: {module name: bytes}."""
    sizes: dict[str, int] = {}
    for path in sorted(Path(folder).glob(f"*{hf_common.WEIGHT_SUFFIX}")):
        with path.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for key, entry in header.items():
            if key != "__metadata__":
                module = key.rpartition(".")[0]
                sizes[module] = sizes.get(module, 0) + entry["data_offsets"][1] - entry["data_offsets"][0]
    return sizes
