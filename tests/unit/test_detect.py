"""Format detection from bytes: each accepted format is found, every hostile or odd file is a clear 415."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from worker.engine.errors import UnknownFormatError
from worker.engine.formats.detect import detect_dataset_kind, detect_model_format
from worker.engine.types import DatasetKind, ModelFormat


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class MakesMarker:
    """Unpickling this creates the marker file: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (open, (str(self.marker), "w"))


def onnx_bytes(weights: int = 4) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weights])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weights])
    w = numpy_helper.from_array(np.ones((weights, weights), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def safetensors_bytes() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return len(header).to_bytes(8, "little") + header + bytes(8)


def hf_members(top: str = "") -> dict[str, bytes]:
    return {f"{top}config.json": b'{"model_type": "bert"}', f"{top}model.safetensors": safetensors_bytes(),
            f"{top}tokenizer.json": b"{}"}


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_onnx_is_detected_from_bytes_whatever_the_name(tmp_path: Path) -> None:
    assert detect_model_format(write(tmp_path / "model.onnx", onnx_bytes())) is ModelFormat.onnx
    assert detect_model_format(write(tmp_path / "model.pt", onnx_bytes())) is ModelFormat.onnx


def test_onnx_larger_than_the_scan_window_is_detected(tmp_path: Path) -> None:
    data = onnx_bytes(weights=200)  # 160 KB of weights: the graph runs past the first 64 KiB
    assert len(data) > 128 * 1024
    assert detect_model_format(write(tmp_path / "big.bin", data)) is ModelFormat.onnx


def test_onnx_whose_graph_starts_past_the_scan_window_is_detected(tmp_path: Path) -> None:
    model = onnx.load_from_string(onnx_bytes())
    model.doc_string = "d" * 100_000  # field 6 is written before the graph (7)
    assert detect_model_format(write(tmp_path / "doc.onnx", model.SerializeToString())) is ModelFormat.onnx


def test_protobuf_without_a_graph_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownFormatError, match="no ONNX graph found"):
        detect_model_format(write(tmp_path / "tiny.onnx", b"\x08\x17"))  # ir_version=23 and nothing else


@pytest.mark.parametrize("keep", [0.5, 0.9, 3])
def test_truncated_onnx_is_refused(tmp_path: Path, keep: float) -> None:
    data = onnx_bytes(weights=200)
    cut = int(len(data) * keep) if keep < 1 else int(keep)
    with pytest.raises(UnknownFormatError, match="truncated") as err:
        detect_model_format(write(tmp_path / "cut.onnx", data[:cut]))
    assert err.value.code == "unsupported_format"


def test_torchscript_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"  # a misleading name on purpose
    torch.jit.save(torch.jit.script(Tiny()), str(path))
    assert detect_model_format(path) is ModelFormat.torchscript


def test_torch_export_pt2_is_detected(tmp_path: Path) -> None:
    program = torch.export.export(Tiny(), (torch.randn(1, 4),))
    path = tmp_path / "model.zip"
    torch.export.save(program, path)
    assert detect_model_format(path) is ModelFormat.torch_export


def test_torch_save_zip_is_refused_with_the_export_hint(tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    torch.save(Tiny().state_dict(), path)
    with pytest.raises(UnknownFormatError, match="a torch.save pickle is not accepted; export with "
                                            "torch.export.save or ONNX"):
        detect_model_format(path)


def test_pickle_in_zip_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = make_zip(tmp_path / "model.pt", {"archive/data.pkl": pickle.dumps(MakesMarker(marker)),
                                            "archive/version": b"3"})
    with pytest.raises(UnknownFormatError, match="torch.save pickle is not accepted"):
        detect_model_format(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_pickle_is_refused_and_never_unpickled(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = write(tmp_path / "model.onnx", pickle.dumps(MakesMarker(marker), protocol=protocol))
    with pytest.raises(UnknownFormatError, match="Python pickle"):
        detect_model_format(path)
    with pytest.raises(UnknownFormatError, match="Python pickle"):
        detect_dataset_kind(path)
    assert not marker.exists()


def test_legacy_torch_save_is_refused_as_pickle(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnknownFormatError, match="Python pickle"):
        detect_model_format(path)


@pytest.mark.parametrize("top", ["", "bert-tiny/"])
def test_hf_folder_zip_is_detected(tmp_path: Path, top: str) -> None:
    assert detect_model_format(make_zip(tmp_path / "m.zip", hf_members(top))) is ModelFormat.hf


@pytest.mark.parametrize("mode", ["w:gz", "w", "w:xz"])
def test_hf_folder_tar_is_detected(tmp_path: Path, mode: str) -> None:
    path = make_tar(tmp_path / "m.tar", hf_members("bert-tiny/"), mode=mode)
    assert detect_model_format(path) is ModelFormat.hf


def test_hf_tar_made_from_inside_the_folder_is_detected(tmp_path: Path) -> None:
    """`tar czf m.tgz -C folder .` names members "./", "./config.json", ..."""
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in hf_members().items():
        (folder / name).write_bytes(data)
    path = tmp_path / "m.tgz"
    with tarfile.open(path, "w:gz") as tf:
        tf.add(folder, arcname="./")
    with tarfile.open(path) as tf:
        assert tf.getnames()[0] == "."
    assert detect_model_format(path) is ModelFormat.hf


def test_hf_folder_with_only_bin_weights_is_refused(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", {"config.json": b"{}", "pytorch_model.bin": b"\x80\x02."})
    with pytest.raises(UnknownFormatError, match="safe_serialization=True"):
        detect_model_format(path)


def test_hf_zip_with_files_outside_the_top_folder_is_refused(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", {**hf_members("a/"), "b/other.txt": b"x"})
    with pytest.raises(UnknownFormatError, match="not an ONNX model"):
        detect_model_format(path)


def test_symlink_in_hf_tar_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.tgz"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("model/tokenizer.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
        for name, data in hf_members("model/").items():
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            tf.addfile(entry, io.BytesIO(data))
    with pytest.raises(UnknownFormatError, match="'model/tokenizer.json' is a symbolic link"):
        detect_model_format(path)


def test_traversal_member_is_refused(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", {**hf_members(), "../evil": b"x"})
    with pytest.raises(UnknownFormatError, match="'../evil' escapes the archive"):
        detect_model_format(path)
    assert not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_are_refused(tmp_path: Path, seed: int) -> None:
    data = random.Random(seed).randbytes(4096)
    with pytest.raises(UnknownFormatError, match="not a recognised model|truncated"):
        detect_model_format(write(tmp_path / "model.onnx", data))


def test_empty_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownFormatError, match="the file is empty"):
        detect_model_format(write(tmp_path / "model.onnx", b""))
    with pytest.raises(UnknownFormatError, match="the file is empty"):
        detect_dataset_kind(write(tmp_path / "data.npz", b""))


@pytest.mark.parametrize("text", ["hello world\n", '{"ir_version": 9}\n', "ir_version: 8\ngraph {}\n"])
def test_text_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(UnknownFormatError, match="the file is text, not a model"):
        detect_model_format(write(tmp_path / "model.onnx", text.encode()))


def test_lone_safetensors_asks_for_the_folder(tmp_path: Path) -> None:
    with pytest.raises(UnknownFormatError, match="lone .safetensors"):
        detect_model_format(write(tmp_path / "model.safetensors", safetensors_bytes()))


def test_onnx_inside_a_zip_asks_for_the_file_itself(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", {"model.onnx": onnx_bytes(), "model.onnx.data": bytes(64)})
    with pytest.raises(UnknownFormatError, match="upload the .onnx file itself"):
        detect_model_format(path)


def test_npz_uploaded_as_a_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, x=np.zeros((2, 3), np.float32))
    with pytest.raises(UnknownFormatError, match="NumPy .npz dataset"):
        detect_model_format(path)


def test_dataset_kinds(tmp_path: Path) -> None:
    npz = tmp_path / "d.bin"
    with npz.open("wb") as fh:  # a file object: savez would append ".npz" to a path
        np.savez(fh, x=np.zeros((2, 3), np.float32), labels=np.zeros(2, np.int64))
    assert detect_dataset_kind(npz) is DatasetKind.tensors
    jsonl = write(tmp_path / "d.npz", b'\n{"text": "hi", "label": 1}\n{"text": "yo"}\n')
    assert detect_dataset_kind(jsonl) is DatasetKind.text
    bom = write(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"text": "hi"}\n')
    assert detect_dataset_kind(bom) is DatasetKind.text
    long_first = write(tmp_path / "long.jsonl", json.dumps({"text": "x" * 200_000}).encode() + b"\n")
    assert detect_dataset_kind(long_first) is DatasetKind.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": "hi"}\n', "not a dataset"),
        (b'["text"]\n', "not a dataset"),
        (b"\xff\xfe{}", "not a dataset"),
        (np.lib.format.MAGIC_PREFIX + b"\x01\x00", "single .npy array"),
    ],
)
def test_odd_datasets_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    with pytest.raises(UnknownFormatError, match=message):
        detect_dataset_kind(write(tmp_path / "d.jsonl", content))


def test_zip_of_non_npy_is_not_a_dataset(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "d.npz", {"x.npy": b"", "notes.txt": b"hi"})
    with pytest.raises(UnknownFormatError, match="member 'notes.txt' is not a .npy array"):
        detect_dataset_kind(path)


def test_detect_imports_no_heavy_library() -> None:
    code = ("import sys, worker.engine.formats.detect; "
            "print(sorted({'torch', 'numpy', 'onnx', 'onnxruntime'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2], env={**os.environ, "PYTHONPATH": "."})
    assert out.stdout.strip() == "[]"
