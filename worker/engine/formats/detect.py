"""Tell an upload's format from its bytes (never its name), cheaply and without loading anything.

The API process imports this module, so it must stay free of torch, numpy and onnx, and it only
reads a file's first bytes or an archive's member names: nothing is extracted or unpickled.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

from worker.engine.errors import EngineError, UnknownFormatError
from worker.engine.formats import archives
from worker.engine.types import DatasetKind, ModelFormat

_WINDOW = 64 * 1024
_MAX_LINE = 1024 * 1024 + 1  # datasets.MAX_LINE_BYTES and its newline (not imported: datasets needs numpy)
_SUPPORTED = ("an ONNX model, a torch.jit.save or torch.export.save (.pt2) file, or a zip/tar of a "
              "Hugging Face folder (config.json + *.safetensors)")
_PICKLE_HINT = ("a Python pickle is never loaded (it can run code); export with torch.export.save or ONNX, "
                "or save Hugging Face weights with safe_serialization=True")


def detect_model_format(path: Path) -> ModelFormat:
    """The model format of the file at path, from its bytes; UnknownFormatError saying why otherwise."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(_WINDOW)
    if not head:
        raise UnknownFormatError("the file is empty")
    if head.startswith(b"PK\x05\x06"):
        raise UnknownFormatError("the zip archive is empty")
    kind = archives.sniff_archive(head)
    if kind == "zip":
        return _detect_zip(path)
    if kind is not None:
        return _detect_tar(path, size)
    if _is_pickle(head):
        raise UnknownFormatError(f"the file is a Python pickle (torch.save or pickle.dump): {_PICKLE_HINT}")
    if head.startswith(b"\x93NUMPY"):
        raise UnknownFormatError("the file is a NumPy .npy array, not a model")
    problem = _onnx_problem(head, size)
    if problem is None:
        return ModelFormat.onnx
    if _is_safetensors(head, size):
        raise UnknownFormatError("a lone .safetensors file has no config: upload a zip or tar of the "
                            "Hugging Face folder (config.json + *.safetensors)")
    if problem.startswith("truncated"):
        raise UnknownFormatError(f"the file looks like an ONNX model but is {problem}")
    if _is_text(head):
        raise UnknownFormatError(f"the file is text, not a model; expected {_SUPPORTED}")
    raise UnknownFormatError(f"the bytes are not a recognised model ({problem}); expected {_SUPPORTED}")


def detect_dataset_kind(path: Path) -> DatasetKind:
    """'tensors' for an .npz (zip of .npy), 'text' for JSON lines with a "text" key; UnknownFormatError otherwise."""
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(_WINDOW)
    if not head:
        raise UnknownFormatError("the file is empty")
    if head.startswith(b"PK\x03\x04"):
        names = [m.name for m in _members(path)]
        if not names:
            raise UnknownFormatError("the zip archive holds no arrays")
        stray = [n for n in names if not n.endswith(".npy")]
        if stray:
            raise UnknownFormatError(f"a zip that is not an .npz: member '{stray[0]}' is not a .npy array; "
                                "save datasets with numpy.savez")
        return DatasetKind.tensors
    if head.startswith(b"\x93NUMPY"):
        raise UnknownFormatError("a single .npy array: save it with numpy.savez(path, input=array) to name it")
    if _is_pickle(head):
        raise UnknownFormatError(f"the file is a Python pickle: {_PICKLE_HINT}")
    try:
        first = json.loads(_first_line(path).removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="strict"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        first = None
    if isinstance(first, dict) and "text" in first:
        return DatasetKind.text
    raise UnknownFormatError('not a dataset: expected an .npz of arrays or JSON lines like {"text": "..."}')


def _first_line(path: Path) -> bytes:
    """The first non-blank line, reading at most 1 MiB (the longest line a text dataset may have)."""
    budget = _MAX_LINE
    with path.open("rb") as fh:
        while budget > 0 and (line := fh.readline(budget)):
            if line.strip():
                return line
            budget -= len(line)
    return b""


def _members(path: Path) -> list[archives.Member]:
    # A zip's names come from its central directory: nothing is decompressed, so no size cap here.
    try:
        return archives.list_members(path, max_total_bytes=None)
    except EngineError as exc:  # callers of detect expect UnknownFormatError only (a 415)
        raise UnknownFormatError(str(exc)) from exc


def _detect_zip(path: Path) -> ModelFormat:
    names = [m.name for m in _members(path)]
    if not names:
        raise UnknownFormatError("the zip archive holds no files")
    if _hf_folder(names, complete=True):
        return ModelFormat.hf
    # torch writes every member under one top folder named after the file ("model/...").
    tops = {n.split("/", 1)[0] for n in names}
    rel = {n.split("/", 1)[1] for n in names if "/" in n} if len(tops) == 1 else set()
    # torch 2.13's torch.export.save writes archive_format ("pt2"), models/<name>.json and data/...;
    # older releases wrote serialized_exported_program.json.
    models_json = any(r.startswith("models/") and r.endswith(".json") for r in rel)
    if "serialized_exported_program.json" in rel or ("archive_format" in rel and models_json):
        return ModelFormat.torch_export
    # torch.jit.save: data.pkl + constants.pkl + code/ (the TorchScript source).
    if "constants.pkl" in rel or ("data.pkl" in rel and any(r.startswith("code/") for r in rel)):
        return ModelFormat.torchscript
    _refuse_pickled_hf(names)
    if "data.pkl" in rel:
        raise UnknownFormatError("the zip was written by torch.save: a torch.save pickle is not accepted; "
                            "export with torch.export.save or ONNX")
    if any(n.endswith(".onnx") for n in names):
        raise UnknownFormatError("the zip holds an ONNX model: upload the .onnx file itself, with its weights "
                            "inside (onnx.save(model, path, save_as_external_data=False))")
    if names and all(n.endswith(".npy") for n in names):
        raise UnknownFormatError("the zip is a NumPy .npz dataset, not a model: upload it as a dataset")
    raise UnknownFormatError(f"the zip archive is not {_SUPPORTED}; it holds {_preview(names)}")


def _detect_tar(path: Path, size: int) -> ModelFormat:
    # A tar has no index: listing decompresses it. Stop as soon as the HF layout is seen, and cap
    # what is decompressed relative to the upload's size, so a compressed bomb stops early.
    names: list[str] = []
    try:
        for member in archives.iter_members(path, max_total_bytes=32 * size + 256 * 1024**2):
            names.append(member.name)
            # Only a new config.json or weights file can complete the layout (keeps this linear).
            key_file = member.name.endswith(("config.json", ".safetensors"))
            if key_file and _hf_folder(names, complete=False):
                return ModelFormat.hf
    except EngineError as exc:
        raise UnknownFormatError(str(exc)) from exc
    _refuse_pickled_hf(names)
    raise UnknownFormatError("the tar archive is not a Hugging Face folder (config.json + *.safetensors); "
                        f"it holds {_preview(names)}")


def _hf_folder(names: list[str], *, complete: bool) -> bool:
    """config.json and a *.safetensors side by side, at the root or under one top folder."""
    names = [n for n in names if not n.startswith("__MACOSX/")]  # Finder's resource forks: harmless
    bases = {n[: -len("config.json")] for n in names if n == "config.json" or n.endswith("/config.json")}
    for base in bases:
        if base.count("/") > 1:
            continue
        weights = any(n.startswith(base) and n.endswith(".safetensors") and "/" not in n[len(base):]
                      for n in names)
        if not weights:
            continue
        # With the full listing, a folder under a top directory must be the only thing in the archive.
        if not complete or not base or all(n.startswith(base) for n in names):
            return True
    return False


def _refuse_pickled_hf(names: list[str]) -> None:
    has_config = any(n == "config.json" or n.endswith("/config.json") for n in names)
    if not has_config or any(n.endswith(".safetensors") for n in names):
        return
    if any(n.endswith(".bin") for n in names):
        raise UnknownFormatError("the Hugging Face folder has pickled *.bin weights and no *.safetensors: "
                            "save it with save_pretrained(..., safe_serialization=True)")
    raise UnknownFormatError("the archive has a config.json but no *.safetensors weights next to it")


def _preview(names: list[str]) -> str:
    if not names:
        return "no files"
    shown = ", ".join(f"'{n}'" for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _is_pickle(head: bytes) -> bool:
    # Protocols 2-5 open with PROTO (0x80) and the version; torch.save's legacy format is one of these.
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _is_safetensors(head: bytes, size: int) -> bool:
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _is_text(head: bytes) -> bool:
    try:  # incremental, so a character cut at the end of the sample is not a decoding error
        text = codecs.getincrementaldecoder("utf-8")().decode(head[:4096], final=False)
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


# --- ONNX ---------------------------------------------------------------------------------------
# ONNX has no magic number: a model is a bare protobuf ModelProto. Importing onnx (or protobuf) in
# the API process is forbidden, so this walks the wire format by hand: each field is a varint tag
# (field number << 3 | wire type) followed by a varint (type 0) or a length and bytes (type 2).
# Accept only when every field seen is a real ModelProto field with its wire type (looking inside
# the graph too) and a graph or ir_version appears. Random bytes and text fail within a few bytes.
_VARINT, _LEN = 0, 2
_StrPair = {1: (_LEN, None), 2: (_LEN, None)}  # StringStringEntryProto: key, value
_Opset = {1: (_LEN, None), 2: (_VARINT, None)}  # OperatorSetIdProto: domain, version
_ValueInfo = {1: (_LEN, None), 2: (_LEN, None), 3: (_LEN, None), 4: (_LEN, _StrPair)}
_Node = {1: (_LEN, None), 2: (_LEN, None), 3: (_LEN, None), 4: (_LEN, None), 5: (_LEN, None),
         6: (_LEN, None), 7: (_LEN, None), 8: (_LEN, None), 9: (_LEN, _StrPair), 10: (_LEN, None)}
_Graph = {1: (_LEN, _Node), 2: (_LEN, None), 5: (_LEN, None), 10: (_LEN, None), 11: (_LEN, _ValueInfo),
          12: (_LEN, _ValueInfo), 13: (_LEN, _ValueInfo), 14: (_LEN, None), 15: (_LEN, None),
          16: (_LEN, _StrPair)}
_Model = {1: (_VARINT, None), 2: (_LEN, None), 3: (_LEN, None), 4: (_LEN, None), 5: (_VARINT, None),
          6: (_LEN, None), 7: (_LEN, _Graph), 8: (_LEN, _Opset), 14: (_LEN, _StrPair), 20: (_LEN, None),
          25: (_LEN, None), 26: (_LEN, None)}


class _NotOnnx(Exception):
    pass


class _WindowEnd(Exception):
    """The walk reached the end of what was read, before the end of the file: stop, do not judge."""


def _onnx_problem(head: bytes, size: int) -> str | None:
    """None if head starts a plausible ModelProto of `size` bytes, else why not ("truncated..." if cut)."""
    seen: set[int] = set()
    try:
        _walk_message(head, 0, size, _Model, size, seen)
    except _NotOnnx as exc:
        return str(exc)
    except _WindowEnd:
        # A large model: all read so far was valid. A huge doc_string may push the graph past the
        # window, so ir_version (always written first) is enough here.
        return None if seen & {1, 7} else "no ONNX graph or ir_version in the first 64 KiB"
    # The whole file was walked: a model without a graph is useless, and tiny junk like b"\x08\x17"
    # (ir_version=23, nothing else) would otherwise pass.
    return None if 7 in seen else "no ONNX graph found"


def _walk_message(buf: bytes, pos: int, end: int, schema: dict, size: int, seen: set[int]) -> None:
    while pos < end:
        if pos >= len(buf):
            raise _WindowEnd
        start = pos
        tag, pos = _varint(buf, pos, size)
        field, wire = tag >> 3, tag & 7
        if field not in schema or schema[field][0] != wire:
            raise _NotOnnx(f"byte {start}: field {field} with wire type {wire} is not part of an ONNX model")
        if wire == _VARINT:
            _, pos = _varint(buf, pos, size)
        else:
            length, pos = _varint(buf, pos, size)
            if pos + length > end:
                if end == size:
                    raise _NotOnnx(f"truncated: a field needs {pos + length} bytes but the file has {size}")
                raise _NotOnnx(f"byte {pos}: a nested field overruns its message")
            nested = schema[field][1]
            if nested is not None:
                try:
                    _walk_message(buf, pos, pos + length, nested, size, set())
                except _WindowEnd:
                    pass  # the rest of this field lies past the window; its declared length is checked
            pos += length
        seen.add(field)


def _varint(buf: bytes, pos: int, size: int) -> tuple[int, int]:
    value = 0
    for i in range(10):  # a 64-bit varint is at most 10 bytes
        if pos >= len(buf):
            if len(buf) >= size:
                raise _NotOnnx(f"truncated: the file ends inside a field at byte {pos}")
            raise _WindowEnd
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos
    raise _NotOnnx(f"byte {pos}: a varint is longer than 10 bytes")
