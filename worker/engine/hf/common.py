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

from worker.engine.errors import EngineError, UnsupportedModelError
from worker.engine.formats import archives
from worker.engine.types import ModelFormat, ModelInfo, TensorSpec

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]

INPUTS = [TensorSpec("input_ids", "int64", ["batch", "sequence"]),
          TensorSpec("attention_mask", "int64", ["batch", "sequence"], optional=True)]  # else all ones
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
    files = archives.safe_extract(path, dest, max_total_bytes=_extract_cap(path))
    configs = sorted((f for f in files if f.name == "config.json" and any(
        w.parent == f.parent and w.name.endswith(WEIGHT_SUFFIX) for w in files)), key=lambda f: len(f.parts))
    if not configs:
        raise EngineError("the archive has no config.json with *.safetensors weights next to it")
    return configs[0].parent


def _extract_cap(path: Path) -> int:
    """Safetensors hardly compress: twice the archive's size is room enough, and stops a deflate bomb."""
    return max(archives.DEFAULT_MAX_TOTAL_BYTES, 2 * Path(path).stat().st_size)


def read_config(folder: Path, *, quantized: bool = False) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"config.json is not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise EngineError("config.json must hold a JSON object")
    if config.get("auto_map"):
        raise UnsupportedModelError("the model's config.json names custom code (auto_map); quantserve never runs code "
                               "from an upload, so only architectures built into transformers are supported")
    if config.get("quantization_config") and not quantized:
        method = config["quantization_config"].get("quant_method", "?") if isinstance(
            config["quantization_config"], dict) else "?"
        raise UnsupportedModelError(f"the model is already quantized ({method}); upload the float checkpoint")
    return config


def model_class(config: dict[str, Any]) -> type[PreTrainedModel]:
    """The transformers class named by config.architectures (built in only), else AutoModel's choice."""
    import transformers

    names = config.get("architectures") or []
    if names:
        cls = getattr(transformers, str(names[0]), None) if str(names[0]).isidentifier() else None
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise UnsupportedModelError(f"architecture {names[0]!r} is not a model class of transformers "
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
        raise EngineError(f"transformers could not load the model: {type(exc).__name__}: {str(exc)[:400]}") from exc
    if quantized:
        skip_requantization(model)
    return model.to(device).eval()


def skip_requantization(model: PreTrainedModel) -> int:
    """Give unpacked layers their plain torch forward back. Returns how many layers it changed.

    compressed-tensors wraps each layer's forward to re-quantize its weights on every call. After
    dequantize=True the weights already hold exactly the dequantized integers, so that rounding changes
    nothing, and the wrapper cost 0.75-0.9x of float speed here."""
    count = 0
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None and "forward" in vars(module):
            del module.forward  # the instance attribute shadowed the class's forward
            count += 1
    return count


def load_tokenizer(folder: Path):  # noqa: ANN201 - a transformers tokenizer
    """The upload's own tokenizer, or None when it ships none."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"the model's tokenizer files could not be loaded: {type(exc).__name__}: {exc}") from exc


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


MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit on its JSON header


def _parameters_in_header(stream: archives.CountingReader, name: str) -> int:
    """Elements of every tensor a safetensors file declares, from its JSON header alone."""
    head = stream.read(8)
    size = int.from_bytes(head, "little") if len(head) == 8 else 0
    if not 0 < size <= MAX_HEADER_BYTES:
        raise EngineError(f"{name} is not a safetensors file (bad header length)")
    try:
        header = json.loads(stream.read(size))
        return sum(int(np.prod(entry["shape"])) for key, entry in header.items() if key != "__metadata__")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise EngineError(f"{name} has a damaged safetensors header: {exc}") from exc


def _read_archive(path: Path, scratch: Path) -> tuple[Path, int]:
    """config.json written under scratch and the parameter count, streaming the archive: the weights are
    never written to disk, so validating a large model costs one read of it."""
    folder, count, config_found = scratch / "model", 0, False
    folder.mkdir()
    for member, stream in archives.iter_files(path, max_total_bytes=_extract_cap(path)):
        base = member.name.rsplit("/", 1)[-1]
        if base == "config.json" and member.name.count("/") <= 1 and not config_found:
            (folder / "config.json").write_bytes(stream.read(1024**2 + 1)[: 1024**2])
            config_found = True
        elif base.endswith(WEIGHT_SUFFIX):
            count += _parameters_in_header(stream, member.name)
        while stream.read(1024 * 1024):  # read to the end: a tar is sequential, and the byte caps count here
            pass
    if not config_found:
        raise EngineError("the archive has no config.json with *.safetensors weights next to it")
    return folder, count


def inspect(path: Path) -> ModelInfo:
    import torch

    with tempfile.TemporaryDirectory(prefix="hf-inspect-") as scratch:
        folder, num_parameters = _read_archive(Path(path), Path(scratch))
        config = read_config(folder)
        cls = model_class(config)
        try:  # builds the module tree on the meta device: checks the config without reading weights
            from transformers import AutoConfig

            with torch.device("meta"):
                cls._from_config(AutoConfig.from_pretrained(str(folder), trust_remote_code=False,
                                                           local_files_only=True))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EngineError(f"config.json does not describe a {cls.__name__}: {type(exc).__name__}: {exc}") from exc
    return ModelInfo(format=ModelFormat.hf, inputs=list(INPUTS), outputs=output_specs(cls, config),
                     num_parameters=num_parameters, architecture=cls.__name__)


def select_output(model: PreTrainedModel, outputs: Any) -> torch.Tensor:
    """The one tensor fidelity is measured on; see output_specs."""
    if is_causal_lm(model):
        return outputs.logits[:, -1, :]
    logits = getattr(outputs, "logits", None)
    return logits if logits is not None else outputs.last_hidden_state


def runner_for_model(model: PreTrainedModel) -> Runner:
    """One call = one feed, run on the model's device; the output comes back as a float32 array (on cuda the
    copy back waits for the GPU, so a call's time is the whole forward)."""
    import torch

    device = model.device

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = {name: torch.from_numpy(np.ascontiguousarray(feed[name])).to(device)
                for name in ("input_ids", "attention_mask") if name in feed}
        with torch.inference_mode():
            return [select_output(model, model(**args)).float().cpu().numpy()]

    return run

