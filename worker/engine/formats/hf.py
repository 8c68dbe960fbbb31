"""Hugging Face folders (config.json + *.safetensors, zipped or tarred): open, inspect and run them.

Only safetensors weights are read and no code from the upload ever runs: `trust_remote_code` stays
off, a config that names custom code (`auto_map`) is refused, and the architecture must be a
model class that ships inside transformers. The archive is unpacked with the same caps and name
checks as every other upload (formats/archives.py).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine.formats import archives
from worker.engine.types import EngineError, ModelFormat, ModelInfo, TensorSpec, UnsupportedModel

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]

INPUTS = [TensorSpec("input_ids", "int64", ["batch", "sequence"]),
          TensorSpec("attention_mask", "int64", ["batch", "sequence"])]
WEIGHT_SUFFIX = ".safetensors"
# Files that describe the weights and are rewritten by save_pretrained; everything else (tokenizer,
# generation config, README) is copied to the quantized folder as it was.
WEIGHT_FILES = ("config.json", "model.safetensors.index.json")


def unpack(path: Path, scratch: Path) -> Path:
    """Extract the archive under scratch and return the folder that holds config.json.

    A folder (the local CLI's `quantserve quantize ./my-model`) is used in place."""
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file() or not any(Path(path).glob(f"*{WEIGHT_SUFFIX}")):
            raise EngineError(f"{path} is not a Hugging Face folder: it needs config.json and *.safetensors")
        return Path(path)
    dest = Path(tempfile.mkdtemp(prefix="hf-", dir=scratch))
    files = archives.safe_extract(path, dest)
    configs = sorted((f for f in files if f.name == "config.json" and any(
        w.parent == f.parent and w.name.endswith(WEIGHT_SUFFIX) for w in files)), key=lambda f: len(f.parts))
    if not configs:
        raise EngineError("the archive has no config.json with *.safetensors weights next to it")
    return configs[0].parent


def read_config(folder: Path, *, quantized: bool = False) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"config.json is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise EngineError("config.json must hold a JSON object")
    if config.get("auto_map"):
        raise UnsupportedModel("the model's config.json names custom code (auto_map); quantserve never runs code "
                               "from an upload, so only architectures built into transformers are supported")
    if config.get("quantization_config") and not quantized:
        method = config["quantization_config"].get("quant_method", "?") if isinstance(
            config["quantization_config"], dict) else "?"
        raise UnsupportedModel(f"the model is already quantized ({method}); upload the float checkpoint")
    return config


def model_class(config: dict[str, Any]) -> type[PreTrainedModel]:
    """The transformers class named by config.architectures (built in only), else AutoModel's choice."""
    import transformers

    names = config.get("architectures") or []
    if names:
        cls = getattr(transformers, str(names[0]), None) if str(names[0]).isidentifier() else None
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise UnsupportedModel(f"architecture {names[0]!r} is not a model class of transformers "
                                   f"{transformers.__version__}; custom architectures are not supported")
        return cls
    return transformers.AutoModel


def is_causal_lm(model_or_class: Any) -> bool:
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    return cls.__name__.endswith("ForCausalLM")


def load_model(folder: Path, *, device: str = "cpu", quantized: bool = False) -> PreTrainedModel:
    """The model in the dtype it was saved in, eval mode, from safetensors only.

    quantized=True loads a checkpoint quantserve wrote (its config carries a quantization_config)."""
    config = read_config(folder, quantized=quantized)
    cls = model_class(config)
    options: dict[str, Any] = {}
    if quantized:
        from transformers import CompressedTensorsConfig

        # On a CPU, compressed-tensors' default path re-quantizes on every call (~4x slower than
        # float here); dequantize=True unpacks the integer weights once, at load.
        options["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    try:
        model = cls.from_pretrained(str(folder), dtype="auto", trust_remote_code=False, use_safetensors=True,
                                    local_files_only=True, **options)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise EngineError(f"transformers could not load the model: {type(exc).__name__}: {str(exc)[:400]}") from None
    return model.to(device).eval()


def load_tokenizer(folder: Path):  # noqa: ANN201 - a transformers tokenizer
    """The upload's own tokenizer, or None when it ships none."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"the model's tokenizer files could not be loaded: {type(exc).__name__}: {exc}") from None


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob(f"*{WEIGHT_SUFFIX}"))


def output_specs(cls: type, config: dict[str, Any]) -> list[TensorSpec]:
    """What the runners return: next-token logits for a causal LM, else logits or the last hidden state."""
    if is_causal_lm(cls):
        return [TensorSpec("next_token_logits", "float32", ["batch", config.get("vocab_size", "vocab")])]
    if cls.__name__.endswith("ForSequenceClassification"):
        return [TensorSpec("logits", "float32", ["batch", "labels"])]
    hidden = config.get("hidden_size", config.get("d_model", "hidden"))
    return [TensorSpec("last_hidden_state", "float32", ["batch", "sequence", hidden])]


def _count_parameters(folder: Path) -> int:
    """From the safetensors headers: JSON, read without loading a tensor."""
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob(f"*{WEIGHT_SUFFIX}")):
        try:
            with safe_open(str(file), framework="np") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    total += int(np.prod(handle.get_slice(key).get_shape()))
        except Exception as exc:  # safetensors raises its own SafetensorError on damaged headers
            raise EngineError(f"{file.name} is not a valid safetensors file: {exc}") from None
    return total


def inspect(path: Path) -> ModelInfo:
    import torch

    with tempfile.TemporaryDirectory(prefix="hf-inspect-") as scratch:
        folder = unpack(Path(path), Path(scratch))
        config = read_config(folder)
        cls = model_class(config)
        num_parameters = _count_parameters(folder)
        try:  # builds the module tree on the meta device: checks the config without reading weights
            from transformers import AutoConfig

            with torch.device("meta"):
                cls._from_config(AutoConfig.from_pretrained(str(folder), trust_remote_code=False,
                                                           local_files_only=True))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EngineError(f"config.json does not describe a {cls.__name__}: {type(exc).__name__}: {exc}") from None
    return ModelInfo(format=ModelFormat.hf, inputs=list(INPUTS), outputs=output_specs(cls, config),
                     num_parameters=num_parameters, architecture=cls.__name__)


def select_output(model: PreTrainedModel, outputs: Any) -> torch.Tensor:
    """The one tensor fidelity is measured on; see output_specs."""
    if is_causal_lm(model):
        return outputs.logits[:, -1, :]
    logits = getattr(outputs, "logits", None)
    return logits if logits is not None else outputs.last_hidden_state


def runner_for_model(model: PreTrainedModel) -> Runner:
    import torch

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = {name: torch.from_numpy(np.ascontiguousarray(feed[name])) for name in ("input_ids", "attention_mask")
                if name in feed}
        with torch.inference_mode():
            return [select_output(model, model(**args)).float().numpy()]

    return run


def load_runner(path: Path, threads: int | None = 1) -> Runner:
    import torch

    if threads:
        torch.set_num_threads(threads)
    scratch = Path(tempfile.mkdtemp(prefix="hf-run-"))
    return runner_for_model(load_model(unpack(Path(path), scratch)))
