"""One frozen pydantic config per method. torch-free: the API validates requests with these."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TargetConfig(BaseModel):
    """An accuracy target: the job keeps its most sensitive layers at higher precision until it holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: Literal["accuracy", "top1_agreement", "cosine", "perplexity"] = Field(
        "accuracy", description="accuracy: top-1 against the dataset's labels; top1_agreement and cosine: "
        "against the float model's outputs (cosine: the worst output's mean); perplexity: causal LMs on text.")
    max_drop: float = Field(0.01, ge=0.0, le=100.0, description="Largest allowed loss against the float model "
                            "(a rise, for perplexity): absolute, or a share of the float figure when relative.")
    relative: bool = Field(False, description="max_drop is a share of the float model's figure (0.01 = 1%).")
    budget_s: float = Field(600.0, gt=0.0, le=7200.0, description="Seconds the search for a faithful "
                            "candidate may take; past it the job fails as target_not_met with its best candidate.")


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    exclude: tuple[str, ...] = Field((), description="Regexes over layer names; matches stay float.")
    target: TargetConfig | None = Field(None, description="An accuracy target (capabilities: supports_target); "
                                        "metrics.target reports what was kept at higher precision and its cost.")

    @field_validator("exclude")
    @classmethod
    def _regexes_compile(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from exc
        return value

    def excludes(self, *names: str) -> bool:
        """Whether one of the user's `exclude` regexes matches any of a layer's names (module path, node
        name, weight name): the one rule every method uses to keep a layer float."""
        return any(re.search(pattern, name) for pattern in self.exclude for name in names)

    def required_datasets(self) -> set[str]:
        """Dataset roles ("calibration", "training") this config cannot run without, beyond the method's own.

        The API refuses a job that lacks one with a 422 before anything is queued.
        """
        return set()

    def labelled_datasets(self) -> set[str]:
        """Dataset roles whose samples must carry `labels` for these options (checked before queueing)."""
        return set()


class DynamicConfig(MethodConfig):
    """Dynamic int8: weights int8 ahead of time, activations quantized per call."""

    dtype: Literal["int8"] = Field("int8", description="Weight dtype.")
    granularity: Literal["per_tensor", "per_channel"] = Field(
        "per_channel", description="Weight scale granularity; per-channel matters on transformers."
    )
    symmetric: bool = Field(True, description="Symmetric (signed int8) weights.")


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: Literal["auto", "minmax", "entropy", "percentile", "histogram"] = Field(
        "auto", description="How activation ranges are chosen from calibration data. auto: ONNX tries minmax, "
        "percentile and entropy and keeps the one most faithful on a held-out quarter of the calibration "
        "set; torch formats use minmax.")
    percentile: float = Field(99.999, gt=90.0, le=100.0, description="For algorithm=percentile.")
    num_samples: int = Field(256, ge=1, le=100_000, description="Calibration samples used at most.")


class StaticConfig(MethodConfig):
    """Static int8 post-training quantization with calibration."""

    dtype: Literal["int8"] = Field("int8", description="Weight and activation dtype.")
    granularity: Literal["per_tensor", "per_channel"] = Field("per_channel", description="Weight scales.")
    symmetric: bool = Field(True, description="Symmetric weights.")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)


WEIGHT_BITS_DESCRIPTION = (
    "8, or 4: weights rounded to 16 levels (-8..7) per scale, still stored and run as int8 (no smaller or "
    "faster than 8); for low-bit accuracy studies and for QAT to recover what 4-bit rounding loses."
)


class TorchExportStaticConfig(StaticConfig):
    """Static PTQ of a torch.export program (PT2E), which can also limit weights to 4 bits."""

    weight_bits: Literal[8, 4] = Field(8, description=WEIGHT_BITS_DESCRIPTION)


class QATConfig(StaticConfig):
    """Quantization-aware fine-tuning, then static conversion."""

    epochs: int = Field(3, ge=1, le=1000)
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    batch_size: int = Field(32, ge=2, le=65536)
    loss: Literal["distillation", "cross_entropy", "mse"] = Field(
        "distillation", description="distillation matches the float model's outputs; needs no labels."
    )
    weight_bits: Literal[8, 4] = Field(8, description=WEIGHT_BITS_DESCRIPTION)

    def labelled_datasets(self) -> set[str]:
        return {"training"} if self.loss == "cross_entropy" else set()


class WeightOnlyConfig(MethodConfig):
    """Weight-only int8/int4 for large Linear-heavy models."""

    dtype: Literal["int8", "int4"] = Field("int8", description="Weight dtype.")
    granularity: Literal["per_channel", "per_group"] = Field("per_group", description="Weight scales.")
    symmetric: bool = Field(True, description="Symmetric weights.")
    group_size: Literal[32, 64, 128, -1] = Field(128, description="-1 = per channel.")
    algorithm: Literal["rtn", "gptq", "awq", "hqq"] = Field(
        "rtn", description="gptq/awq need a calibration dataset; hqq is data-free."
    )
    bits: Literal[4, 8, "auto"] | None = Field(
        None, description="4 or 8: the same as dtype int4 / int8. auto (capabilities: supports_auto_bits): each "
        "layer int4 or int8 by its measured fidelity gain per byte, the most faithful mix that fits "
        "max_size_ratio and/or max_latency_ms.")
    max_size_ratio: float | None = Field(None, gt=0.0, le=1.0, description="With bits auto: the artifact's "
                                         "largest size as a share of the uploaded float file.")
    max_latency_ms: float | None = Field(None, gt=0.0, description="With bits auto: the largest p50 latency "
                                         "(batch 1, one thread, as metrics.latency measures it).")

    @model_validator(mode="before")
    @classmethod
    def _bits_sets_dtype(cls, data: Any) -> Any:
        # dtype chose int4/int8 before bits existed: bits fills it in, so every handler still reads dtype alone
        if not isinstance(data, dict) or data.get("bits") is None:
            return data
        bits = data["bits"]
        wanted = {4: "int4", 8: "int8", "auto": "int4"}.get(bits)  # auto starts from int4 and raises layers to 8
        if wanted is None:
            return data  # not one of 4, 8, auto: the field's own check says so
        if data.get("dtype", wanted) != wanted:
            raise ValueError(f"bits {bits!r} and dtype {data['dtype']!r} disagree; give one of them"
                             + (" (bits auto mixes int4 and int8 layers)" if bits == "auto" else ""))
        return {**data, "dtype": wanted}

    @model_validator(mode="after")
    def _budget_goes_with_auto(self) -> WeightOnlyConfig:
        budgets = [n for n in ("max_size_ratio", "max_latency_ms") if getattr(self, n) is not None]
        if self.bits == "auto" and not budgets:
            raise ValueError("bits 'auto' needs a budget: max_size_ratio and/or max_latency_ms")
        if self.bits != "auto" and budgets:
            verb = "apply" if len(budgets) > 1 else "applies"
            raise ValueError(f"{' and '.join(budgets)} {verb} only with bits 'auto'")
        return self

    def required_datasets(self) -> set[str]:
        # gptq and awq fit the rounding to activations, so they cannot run without calibration samples
        return {"calibration"} if self.algorithm in ("gptq", "awq") else set()


# method auto's candidates, in the order they run (registry: MethodSpec.sweep_candidates; worker/engine/sweep.py
# maps each to its method and options)
SweepCandidate = Literal["dynamic", "static_minmax", "static_entropy", "static_histogram", "weight_only_int8",
                         "weight_only_int4"]
STATIC_CANDIDATES = frozenset({"static_minmax", "static_entropy", "static_histogram"})


class AutoConfig(MethodConfig):
    """A sweep: the candidate methods the model and data allow, each measured alike; delivers the fastest that
    meets the target (else the default goal), the others stay downloadable."""

    candidates: tuple[SweepCandidate, ...] | None = Field(
        None, description="Which candidates to run (default: every one the model and data allow; static ones only "
        "with a calibration dataset). Naming a static one makes calibration_dataset_id required.")
    budget_s: float = Field(1800.0, gt=0.0, le=7200.0, description="Seconds the sweep may spend; a candidate not "
                            "started by then is listed as skipped (code budget_exceeded).")

    @field_validator("candidates")
    @classmethod
    def _candidates_listed_once(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError("give each candidate at most once, and at least one (or leave candidates out)")
        return value

    def required_datasets(self) -> set[str]:
        # asked for by name, a static candidate cannot be skipped quietly for want of calibration samples
        return {"calibration"} if self.candidates and STATIC_CANDIDATES & set(self.candidates) else set()
