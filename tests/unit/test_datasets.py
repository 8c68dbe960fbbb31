"""Dataset validation: good .npz and .jsonl are described; object arrays, bombs and bad lines are refused."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from worker.engine.errors import EngineError
from worker.engine.formats import datasets
from worker.engine.types import ArrayInfo, DatasetKind

MiB = 1024**2


class MakesMarker:
    """Unpickling this creates the marker file: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (open, (str(self.marker), "w"))


def savez(path: Path, **arrays: np.ndarray) -> Path:
    with path.open("wb") as fh:  # a file object, so numpy keeps the name as given
        np.savez_compressed(fh, **arrays)
    return path


def jsonl(path: Path, lines: list[bytes | dict | list]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return path


def inspect(path: Path, kind: str = "tensors", **kw) -> object:  # noqa: ANN003
    return datasets.inspect(path, DatasetKind(kind), **kw)


def test_npz_with_labels_is_described(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((100, 1, 8, 8), dtype=np.float32)
    y = np.arange(100, dtype=np.int64) % 10
    info = inspect(savez(tmp_path / "d.npz", input=x, labels=y))
    assert info.kind is DatasetKind.tensors
    assert info.num_samples == 100
    assert info.arrays == {"input": ArrayInfo(dtype="float32", shape=[100, 1, 8, 8])}
    assert info.has_labels is True
    loaded = datasets.load_tensors(tmp_path / "d.npz")
    assert set(loaded) == {"input", "labels"}
    np.testing.assert_array_equal(loaded["input"], x)
    np.testing.assert_array_equal(loaded["labels"], y)


def test_npz_with_several_inputs_and_no_labels(tmp_path: Path) -> None:
    info = inspect(savez(tmp_path / "d.npz", input_ids=np.zeros((4, 16), np.int64),
                         attention_mask=np.ones((4, 16), np.int64)))
    assert info.num_samples == 4 and info.has_labels is False
    assert info.arrays["attention_mask"] == ArrayInfo(dtype="int64", shape=[4, 16])


def test_big_endian_arrays_load_in_native_order(tmp_path: Path) -> None:
    x = np.arange(6, dtype=">f4").reshape(3, 2)
    loaded = datasets.load_tensors(savez(tmp_path / "d.npz", x=x))["x"]
    assert loaded.dtype == np.float32 and loaded.dtype.isnative
    np.testing.assert_array_equal(loaded, x)


def test_object_array_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = np.empty(2, dtype=object)
    payload[:] = [MakesMarker(marker), MakesMarker(marker)]
    path = tmp_path / "d.npz"
    with path.open("wb") as fh:
        np.savez(fh, x=np.zeros((2, 3), np.float32), extra=payload)
    assert not marker.exists()
    with pytest.raises(EngineError, match="array 'extra' holds Python objects"):
        inspect(path)
    with pytest.raises(EngineError, match="holds Python objects"):
        datasets.load_tensors(path)
    assert not marker.exists()


def test_pickle_disguised_as_npy_member_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", pickle.dumps(MakesMarker(marker)))
    with pytest.raises(EngineError, match="array 'x' is not a valid .npy array"):
        inspect(path)
    assert not marker.exists()


def test_arrays_that_disagree_in_length_are_refused(tmp_path: Path) -> None:
    path = savez(tmp_path / "d.npz", x=np.zeros((100, 3), np.float32), y=np.zeros((90, 3), np.float32))
    with pytest.raises(EngineError) as err:
        inspect(path)
    assert str(err.value) == "arrays disagree in length: 'x' has 100 samples, 'y' has 90"


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros(10, np.float32), "'labels' must be integer class indices, not float32"),
        (np.zeros((10, 1), np.int64), r"'labels' must be 1-D with shape \[10\], not \[10, 1\]"),
        (np.zeros(9, np.int64), "arrays disagree in length: 'x' has 10 samples, 'labels' has 9"),
    ],
)
def test_bad_labels_are_refused(tmp_path: Path, labels: np.ndarray, message: str) -> None:
    path = savez(tmp_path / "d.npz", x=np.zeros((10, 3), np.float32), labels=labels)
    with pytest.raises(EngineError, match=message):
        inspect(path)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.array(["a", "b"])}, "array 'x' has dtype <U1; only numeric arrays are accepted"),
        ({"x": np.float32(1.0)}, "array 'x' is a scalar"),
        ({"x": np.zeros((0, 3), np.float32)}, "the dataset has no samples"),
        ({"labels": np.zeros(3, np.int64)}, "holds only 'labels'"),
    ],
)
def test_unusable_arrays_are_refused(tmp_path: Path, arrays: dict, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        inspect(savez(tmp_path / "d.npz", **arrays))


def test_array_bomb_is_refused(tmp_path: Path) -> None:
    """200 MiB of float32 zeros compress to a few hundred KB; written in chunks, never held in memory."""
    path = tmp_path / "bomb.npz"
    n = 50 * MiB  # float32: 200 MiB of data
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf, zf.open("x.npy", "w") as out:
        np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": (n,)})
        for _ in range(4 * n // MiB):
            out.write(bytes(MiB))
    assert path.stat().st_size < 2 * MiB
    with pytest.raises(EngineError, match="archive expands past 64 MiB"):
        inspect(path, max_bytes=64 * MiB)


def test_huge_shape_in_a_small_member_is_refused_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "claim.npz"
    with zipfile.ZipFile(path, "w") as zf, zf.open("x.npy", "w") as out:
        header = {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)}  # 8 TB claimed
        np.lib.format.write_array_header_1_0(out, header)
        out.write(bytes(64))
    with pytest.raises(EngineError, match="the arrays hold more than 64 MiB of data"):
        inspect(path, max_bytes=64 * MiB)


def test_truncated_array_data_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cut.npz"
    with zipfile.ZipFile(path, "w") as zf, zf.open("x.npy", "w") as out:
        np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": (100,)})
        out.write(bytes(40))  # 10 floats of 100
    with pytest.raises(EngineError, match="array 'x' is truncated or damaged"):
        inspect(path)


def test_trailing_bytes_after_array_data_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    with zipfile.ZipFile(path, "w") as zf, zf.open("x.npy", "w") as out:
        np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": (2,)})
        out.write(bytes(8) + b"junk")
    with pytest.raises(EngineError, match="array 'x' has extra bytes"):
        inspect(path)


def test_non_npy_member_and_non_zip_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", "hi")
    with pytest.raises(EngineError, match="member 'notes.txt' is not a .npy array"):
        inspect(path)
    text = tmp_path / "t.npz"
    text.write_text("hello")
    with pytest.raises(EngineError, match="must be an .npz"):
        inspect(text)


def test_traversal_member_in_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("../x.npy", b"")
    with pytest.raises(EngineError, match="escapes the archive"):
        inspect(path)


def test_jsonl_is_described(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "d.jsonl", [{"text": "hello", "label": 1}, {"text": "wörld", "label": 0}, b""])
    info = inspect(path, "text")
    assert info.kind is DatasetKind.text
    assert (info.num_samples, info.arrays, info.has_labels) == (2, {}, True)
    unlabelled = inspect(jsonl(tmp_path / "u.jsonl", [{"text": "a"}, {"text": "b", "meta": 3}]), "text")
    assert (unlabelled.num_samples, unlabelled.has_labels) == (2, False)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([{"text": "ok"}, b'{"text": "caf\xe9"}'], "line 2 is not valid UTF-8 \\(byte 13\\)"),
        ([{"text": "ok"}, ["text"]], "line 2 is not a JSON object"),
        ([{"text": "ok"}, b"{not json"], "line 2 is not valid JSON"),
        ([{"text": 3}], 'line 1 has no string "text"'),
        ([{"prompt": "x"}], 'line 1 has no string "text"'),
        ([{"text": "a", "label": 1.5}], 'line 1: "label" must be an integer, not 1.5'),
        ([{"text": "a", "label": True}], '"label" must be an integer, not true'),
        ([{"text": "a", "label": 1}, {"text": "b"}], 'line 2 has no "label" but earlier lines do'),
        ([{"text": "a"}, {"text": "b", "label": 1}], 'line 2 has a "label" but earlier lines do not'),
        ([b"[" * 100_000], "line 1 is nested too deeply"),
        ([b""], "the dataset has no lines"),
    ],
)
def test_bad_jsonl_is_refused(tmp_path: Path, lines: list, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        inspect(jsonl(tmp_path / "d.jsonl", lines), "text")


def test_jsonl_line_length_and_count_are_capped(tmp_path: Path) -> None:
    long = jsonl(tmp_path / "long.jsonl", [{"text": "a"}, {"text": "x" * (datasets.MAX_LINE_BYTES + 1)}])
    with pytest.raises(EngineError, match="line 2 is longer than 1 MiB"):
        inspect(long, "text")
    many = jsonl(tmp_path / "many.jsonl", [{"text": str(i)} for i in range(5)])
    with pytest.raises(EngineError, match="more than 3 lines"):
        inspect(many, "text", max_lines=3)
    assert inspect(many, "text", max_lines=5).num_samples == 5


def test_pickle_as_jsonl_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "d.jsonl"
    path.write_bytes(pickle.dumps(MakesMarker(marker)))
    with pytest.raises(EngineError, match="line 1"):
        inspect(path, "text")
    assert not marker.exists()
