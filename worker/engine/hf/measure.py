"""Measuring an `hf` model against its quantized copy: samples, per-layer SQNR, perplexity.

The shared evaluate.measure does size, fidelity, accuracy and latency; what is specific to a
transformers model lives here: text datasets tokenized with the model's own tokenizer, inputs
generated across the vocabulary, each Linear's error on the float layer's own inputs, and
perplexity for causal language models.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import evaluate
from worker.engine import metrics as m
from worker.engine.errors import EngineError
from worker.engine.formats import archives, datasets
from worker.engine.hf import common as hf_common

if TYPE_CHECKING:
    import torch

    from worker.engine.context import JobContext

MAX_SAMPLES = 64  # transformer forwards are costly; fidelity on 64 texts is plenty
MAX_TOKENS = 128
SYNTHETIC_TOKENS = 32
LAYER_SAMPLES = 4


def _is_npz(path: Path) -> bool:
    with Path(path).open("rb") as fh:
        return archives.sniff_archive(fh.read(512)) == "zip"


def _npz_samples(path: Path, limit: int, source: str) -> evaluate.Samples:
    """input_ids, and attention_mask when the dataset has one (else all ones)."""
    found = evaluate.load_npz(path, hf_common.INPUTS, limit, source)
    for feed in found.batches:
        feed.setdefault("attention_mask", np.ones_like(feed["input_ids"]))
    return found


def tokenize(tokenizer: Any, texts: list[str], *, max_tokens: int = MAX_TOKENS) -> list[dict[str, np.ndarray]]:
    """One batch-1 feed per text, truncated to max_tokens; empty encodings are dropped."""
    feeds = []
    for text in texts:
        encoded = tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="np")
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        if ids.size == 0:
            continue
        mask = np.asarray(encoded.get("attention_mask", np.ones_like(ids)), dtype=np.int64)
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


def _text_samples(path: Path, tokenizer: Any, source: str) -> evaluate.Samples:
    if tokenizer is None:
        raise EngineError(f"the {source} dataset is text, but the model's archive has no tokenizer files "
                          "(tokenizer.json or vocab.txt); add them, or give an .npz of input_ids",
                          code="dataset_mismatch")
    texts, labels = datasets.load_text(path, max_samples=MAX_SAMPLES)
    feeds = tokenize(tokenizer, texts)
    if not feeds:
        raise EngineError(f"every text of the {source} dataset tokenized to nothing", code="dataset_mismatch")
    label_array = np.asarray(labels, dtype=np.int64) if labels and len(labels) == len(feeds) else None
    return evaluate.Samples(batches=feeds, labels=label_array, source=source)


def _synthetic(vocab_size: int) -> evaluate.Samples:
    """Token ids drawn across the whole vocabulary (evaluate's generic inputs use ids below 10)."""
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, vocab_size, size=(1, SYNTHETIC_TOKENS), dtype=np.int64),
              "attention_mask": np.ones((1, SYNTHETIC_TOKENS), dtype=np.int64)}
             for _ in range(evaluate.SYNTHETIC_SAMPLES)]
    return evaluate.Samples(batches=feeds, labels=None, source="synthetic", warnings=[evaluate.SYNTHETIC_WARNING])


def samples(ctx: JobContext, tokenizer: Any, vocab_size: int) -> evaluate.Samples:
    """Evaluation set, else calibration set (text or .npz of input_ids), else generated token ids."""
    for path, source in ((ctx.evaluation_path, "evaluation"), (ctx.calibration_path, "calibration")):
        if path is None:
            continue
        if _is_npz(path):
            return _npz_samples(Path(path), MAX_SAMPLES, source)
        return _text_samples(Path(path), tokenizer, source)
    return _synthetic(vocab_size)


def calibration_feeds(ctx: JobContext, tokenizer: Any, *, limit: int) -> list[dict[str, np.ndarray]]:
    """Tokenized calibration samples for error-correcting algorithms (GPTQ)."""
    if ctx.calibration_path is None:
        raise EngineError("this algorithm needs calibration_dataset_id", code="dataset_mismatch")
    path = Path(ctx.calibration_path)
    if _is_npz(path):
        return _npz_samples(path, limit, "calibration").batches
    if tokenizer is None:
        raise EngineError("the calibration dataset is text, but the model's archive has no tokenizer files",
                          code="dataset_mismatch")
    texts, _ = datasets.load_text(path, max_samples=limit)
    return tokenize(tokenizer, texts, max_tokens=512)


def layer_sqnr(float_model: torch.nn.Module, quant_model: torch.nn.Module, names: set[str],
               feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """SQNR of each named Linear: the float layer's inputs, captured by hooks, fed to both layers.

    Isolated per layer (unlike the end-to-end fidelity): it shows which layers lose the most.
    """
    import torch

    float_layers = dict(float_model.named_modules())
    quant_layers = dict(quant_model.named_modules())
    pairs = {n: (float_layers[n], quant_layers[n]) for n in sorted(names) if n in float_layers and n in quant_layers}
    outputs: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {n: ([], []) for n in pairs}

    def hook(name: str):  # noqa: ANN202 - a forward hook
        def capture(module: torch.nn.Module, args: tuple, result: torch.Tensor) -> None:
            floats, quants = outputs[name]
            floats.append(result.detach().float().cpu().numpy())
            quants.append(pairs[name][1](args[0]).detach().float().cpu().numpy())
        return capture

    device = next(float_model.parameters()).device  # both models on one device; inputs go there too
    handles = [layers[0].register_forward_hook(hook(n)) for n, layers in pairs.items()]
    try:
        with torch.inference_mode():
            for feed in feeds[:LAYER_SAMPLES]:
                float_model(**{k: torch.from_numpy(v).to(device) for k, v in feed.items()})
    finally:
        for handle in handles:
            handle.remove()
    return {n: round(m.sqnr_db(f, q), 2) for n, (f, q) in outputs.items() if f}


def perplexity(model: torch.nn.Module, feeds: list[dict[str, np.ndarray]]) -> tuple[float, int]:
    """exp(mean next-token negative log-likelihood) over every predicted token, and how many tokens."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for feed in feeds:
            ids = torch.from_numpy(feed["input_ids"]).to(device)
            if ids.shape[1] < 2:
                continue
            mask = torch.from_numpy(feed["attention_mask"]).to(device)
            nll, tokens = token_nll(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
            total += nll
            count += tokens
    return perplexity_of(total, count), count


def token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """One sample's ([1, sequence, vocab] logits) summed next-token negative log-likelihood and how many tokens."""
    import torch

    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")
    keep = mask[0, 1:].bool()
    return float(nll[keep].sum()), int(keep.sum())


def perplexity_of(total_nll: float, tokens: int) -> float:
    if tokens == 0:
        raise ValueError("no sample has two tokens or more")
    return math.exp(total_nll / tokens)


def perplexity_metric(float_model: torch.nn.Module, quant_model: torch.nn.Module,
                      samples_: evaluate.Samples) -> tuple[dict | None, str | None]:
    """The `perplexity` metric, or None with the reason it was not measured."""
    if samples_.source == "synthetic":
        return None, "perplexity not measured: it needs real text (an evaluation or calibration dataset)"
    try:
        ppl_f, tokens = perplexity(float_model, samples_.batches)
        ppl_q, _ = perplexity(quant_model, samples_.batches)
    except ValueError as exc:
        return None, f"perplexity not measured: {exc}"
    return {"float": round(ppl_f, 4), "quantized": round(ppl_q, 4), "delta": round(ppl_q - ppl_f, 4),
            "source": samples_.source, "tokens": tokens}, None
