"""ONNX dynamic int8 on the real all-MiniLM-L6-v2: ENGINE.md's goal, checked outside the engine's own metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests import models
from worker.engine import quantize

pytestmark = pytest.mark.slow  # export, quantization and latency of a 90 MB model: 20-40 s on 2 cores


def _sentence_embeddings(path: Path, tokens: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """Attention-mask-weighted mean of last_hidden_state, as sentence-transformers pools MiniLM."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pooled = []
    for start in range(0, len(tokens["input_ids"]), batch):
        feed = {name: a[start : start + batch] for name, a in tokens.items()}
        hidden = session.run(["last_hidden_state"], feed)[0]
        mask = feed["attention_mask"][..., None].astype(np.float32)
        pooled.append((hidden * mask).sum(1) / mask.sum(1))
    return np.concatenate(pooled)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_minilm_dynamic_int8_keeps_sentence_embeddings_at_0995_cosine_under_030_size(tmp_path: Path) -> None:
    float_path = models.export_minilm_onnx(tmp_path / "minilm.onnx")
    dataset = models.minilm_dataset(tmp_path / "sentences.npz")
    result = quantize(float_path, "onnx", "dynamic", {}, tmp_path / "job", evaluation_path=dataset,
                      model_name="minilm")
    artifact = result.artifacts[0].path

    ratio = artifact.stat().st_size / float_path.stat().st_size
    assert ratio <= 0.30 and result.metrics["size"]["ratio"] <= 0.30
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(artifact)).graph.node}

    tokens = models.minilm_tokens()
    assert len(tokens["input_ids"]) == 64
    # all 64 padded sentences in one batch (one activation scale per call covers them all), and one at a time
    for batch in (64, 1):
        cosines = _cosines(_sentence_embeddings(float_path, tokens, batch),
                           _sentence_embeddings(artifact, tokens, batch))
        assert cosines.mean() >= 0.995, (batch, cosines.mean(), cosines.min())
        assert cosines.min() >= 0.99, (batch, cosines.mean(), cosines.min())

    fidelity = result.metrics["fidelity"]
    assert fidelity["samples"] == 64 and fidelity["cosine"] >= 0.995
    assert fidelity["top1_agreement"] is None  # hidden states, not class scores
    assert not any("top-1" in w for w in result.metrics["warnings"])
