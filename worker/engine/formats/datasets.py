"""Validate uploaded datasets (.npz of arrays, .jsonl of texts) without unpickling anything. torch-free."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

from worker.engine.errors import EngineError
from worker.engine.formats import archives
from worker.engine.types import ArrayInfo, DatasetInfo, DatasetKind

DEFAULT_MAX_BYTES = 2 * 1024**3  # decompressed .npy members (headers and data), all together
MAX_LINE_BYTES = 1024 * 1024
MAX_LINES = 1_000_000
LABELS = "labels"


def inspect(
    path: Path, kind: DatasetKind, *, max_bytes: int = DEFAULT_MAX_BYTES, max_lines: int = MAX_LINES,
) -> DatasetInfo:
    """Check a dataset and describe it; EngineError with a message the user can act on if it is invalid.

    For tensors, `arrays` lists the input arrays; `labels`, when present, shows only as has_labels.
    """
    path = Path(path)
    if DatasetKind(kind) is DatasetKind.text:
        count, has_labels = _inspect_jsonl(path, max_lines)
        return DatasetInfo(kind=DatasetKind.text, num_samples=count, arrays={}, has_labels=has_labels)
    headers, num_samples = _check_npz(path, max_bytes)
    for _ in _load_arrays(path, headers, max_bytes):
        pass  # read every byte once: a truncated or corrupt member fails here, not in a job
    arrays = {k: ArrayInfo(dtype=d.name, shape=list(s)) for k, (s, d) in headers.items() if k != LABELS}
    return DatasetInfo(kind=DatasetKind.tensors, num_samples=num_samples, arrays=arrays,
                       has_labels=LABELS in headers)


def load_tensors(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, np.ndarray]:
    """Every array of an .npz (labels included), after the same checks as inspect(), in native byte order."""
    path = Path(path)
    headers, _ = _check_npz(path, max_bytes)
    return dict(_load_arrays(path, headers, max_bytes))


_Header = tuple[tuple[int, ...], np.dtype]


def _check_npz(path: Path, max_bytes: int) -> tuple[dict[str, _Header], int]:
    """Read only the .npy headers, refuse bad dtypes and sizes before any data is read; return N."""
    with path.open("rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise EngineError("a tensors dataset must be an .npz file (numpy.savez)")
    headers: dict[str, _Header] = {}
    total = 0
    for member, stream in archives.iter_files(path, max_total_bytes=max_bytes,
                                              refuse_nested=False):
        key = _array_name(member.name)
        shape, dtype = _read_header(key, stream)
        # Refused from the header alone: loading an object array would need pickle.
        if dtype.hasobject:
            raise EngineError(f"array '{key}' holds Python objects (dtype {dtype}); object arrays need "
                              "pickle and are never loaded: save numeric arrays")
        if dtype.kind not in "biuf":
            raise EngineError(f"array '{key}' has dtype {dtype}; only numeric arrays are accepted")
        total += math.prod(shape) * dtype.itemsize
        if total > max_bytes:
            raise EngineError(f"the arrays hold more than {archives.human_bytes(max_bytes)} of data")
        headers[key] = (shape, dtype)
    if not headers:
        raise EngineError("the .npz holds no arrays")
    return headers, _num_samples(headers)


def _array_name(member: str) -> str:
    if not member.endswith(".npy"):
        raise EngineError(f"member '{member}' is not a .npy array: build the dataset with numpy.savez")
    return member[: -len(".npy")]


def _read_header(key: str, stream: archives.CountingReader) -> _Header:
    try:
        version = npy.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = npy.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = npy.read_array_header_2_0(stream)
        else:  # 3.0 exists only for structured dtypes with non-ASCII field names
            raise EngineError(f"array '{key}' uses .npy format {version[0]}.{version[1]}; save plain "
                              "numeric arrays")
    except (ValueError, EOFError, SyntaxError) as exc:
        raise EngineError(f"array '{key}' is not a valid .npy array: {exc}") from exc
    return tuple(shape), dtype


def _num_samples(headers: dict[str, _Header]) -> int:
    inputs = {k: h for k, h in headers.items() if k != LABELS}
    if not inputs:
        raise EngineError("the .npz holds only 'labels'; add one array per model input")
    for key, (shape, _) in headers.items():
        if not shape:
            raise EngineError(f"array '{key}' is a scalar; arrays need a first dimension of samples")
    first, (first_shape, _) = next(iter(inputs.items()))
    n = first_shape[0]
    for key, (shape, _) in headers.items():
        if shape[0] != n:
            raise EngineError(f"arrays disagree in length: '{first}' has {n} samples, "
                              f"'{key}' has {shape[0]}")
    if LABELS in headers:
        shape, dtype = headers[LABELS]
        if dtype.kind not in "iu":
            raise EngineError(f"'labels' must be integer class indices, not {dtype}")
        if len(shape) != 1:
            raise EngineError(f"'labels' must be 1-D with shape [{n}], not {list(shape)}")
    if n == 0:
        raise EngineError("the dataset has no samples")
    return n


def _load_arrays(path: Path, headers: dict[str, _Header], max_bytes: int) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array), each loaded with pickle disabled; the stream count caps what is inflated."""
    for member, stream in archives.iter_files(path, max_total_bytes=max_bytes,
                                              refuse_nested=False):
        key = _array_name(member.name)
        if key not in headers:  # the archive changed between the passes
            raise EngineError(f"array '{key}' appeared after the dataset was checked")
        try:
            array = np.load(stream, allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:
            raise EngineError(f"array '{key}' is truncated or damaged: {exc}") from exc
        if (array.shape, array.dtype) != headers[key]:
            raise EngineError(f"array '{key}' changed after the dataset was checked")
        # Reading to the end makes zipfile verify the member's CRC, and trailing junk is refused.
        if stream.read(1):
            raise EngineError(f"array '{key}' has extra bytes after its data")
        yield key, array.astype(array.dtype.newbyteorder("="), copy=False)


def load_text(path: Path, *, max_samples: int, max_lines: int = MAX_LINES) -> tuple[list[str], list[int] | None]:
    """The first max_samples texts (and labels, when the lines have them) of a validated .jsonl dataset."""
    texts: list[str] = []
    labels: list[int] = []
    for row in _rows(Path(path), max_lines):
        texts.append(row["text"])
        if "label" in row:
            labels.append(row["label"])
        if len(texts) >= max_samples:
            break
    return texts, (labels if labels else None)


def _inspect_jsonl(path: Path, max_lines: int) -> tuple[int, bool]:
    """Every line checked (see _rows): how many samples, and whether they carry labels."""
    count = 0
    labelled = False
    for count, row in enumerate(_rows(path, max_lines), start=1):  # noqa: B007 - count is the result
        labelled = "label" in row
    if count == 0:
        raise EngineError('the dataset has no lines; expected one {"text": "..."} object per line')
    return count, labelled


def _rows(path: Path, max_lines: int) -> Iterator[dict]:
    """Stream the lines: bounded length and count, strict UTF-8, one {"text": str, "label"?: int} each."""
    count = 0
    labelled: bool | None = None
    with path.open("rb") as fh:
        lineno = 0
        while raw := fh.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise EngineError(f"line {lineno} is longer than {archives.human_bytes(MAX_LINE_BYTES)}")
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark some editors add
            if not raw.strip():
                continue  # blank lines (a trailing newline, a gap) carry no sample
            row = _parse_line(raw, lineno)
            has_label = "label" in row
            if labelled is None:
                labelled = has_label
            elif has_label != labelled:
                state = 'has a "label" but earlier lines do not' if has_label else 'has no "label" but earlier lines do'
                raise EngineError(f"line {lineno} {state}; label every line or none")
            count += 1
            if count > max_lines:
                raise EngineError(f"the dataset has more than {max_lines} lines")
            yield row


def _parse_line(raw: bytes, lineno: int) -> dict:
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise EngineError(f"line {lineno} is not valid UTF-8 (byte {exc.start})") from exc
    try:
        row = json.loads(text)
    except RecursionError as exc:  # deeply nested brackets exhaust the parser's stack
        raise EngineError(f"line {lineno} is nested too deeply") from exc
    except ValueError as exc:
        raise EngineError(f"line {lineno} is not valid JSON: {exc}") from exc
    if not isinstance(row, dict):
        raise EngineError(f'line {lineno} is not a JSON object; expected {{"text": "..."}}')
    if not isinstance(row.get("text"), str):
        raise EngineError(f'line {lineno} has no string "text"')
    label = row.get("label")
    if "label" in row and (not isinstance(label, int) or isinstance(label, bool)):
        raise EngineError(f'line {lineno}: "label" must be an integer, not {json.dumps(label)[:40]}')
    return row
