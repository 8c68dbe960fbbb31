"""Walk a torch.export `.pt2` zip and write a copy that torch.export.load can read without pickle or eval.

What torch 2.13's loader would otherwise run from the file (torch/export/pt2_archive/_package.py,
torch/_export/serde/serialize.py, torch/export/_unlift.py):
- `data/sample_inputs/<m>.pt` goes through `torch.load(weights_only=True)` and, when that fails,
  silently through `weights_only=False` (full pickle). We replace it with an empty member, which the
  loader reads as "no example inputs".
- weights/constants with `use_pickle`, legacy `<m>.pt` weight files, `custom_obj_*` and `opaque_obj_*`
  constants are `torch.load(weights_only=False)` / `pickle.loads`: refused.
- `data/aotinductor/` holds compiled shared libraries: refused.
- `expr_str` is parsed with `sympy.sympify` (eval), `guards_code` is exec'd by `.module()`, and names
  and targets end up in generated Python source: each is checked against a strict pattern, and the
  free-text node metadata (stack traces, annotations) is dropped from the copy.
Members are copied through Python's zipfile, so torch reads the same bytes we checked (no parser
differential between two zip readers). This is defence in depth: the file is still loaded only in
the worker's sandboxed child (RELIABILITY.md).
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

from worker.engine.errors import EngineError

MAX_MEMBERS = 100_000
MAX_JSON_BYTES = 512 * 1024 * 1024
MAX_DEFLATE_RATIO = 200  # JSON deflates ~8-10x; a far higher ratio is a zip bomb

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FQN = re.compile(r"[A-Za-z0-9_.]*\Z")
_PLAIN = re.compile(r"[^\"'\\\n\r\x00]*\Z")  # no quotes, backslashes or newlines
_MODULE_STACK = re.compile(r"[A-Za-z0-9_.,;:\[\]'()<> -]*\Z")
_SAFE_OPERATOR = frozenset(
    "getitem add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge and_ or_ xor not_ "
    "invert lshift rshift matmul index".split()
)
_SAFE_NAMESPACES = frozenset({"aten", "prims", "quantized_decomposed", "higher_order", "onednn", "quantized"})
# sympy's srepr vocabulary for shape expressions (torch/_export/serde/serialize.py sympy_functions)
_SYMPY_NAMES = frozenset(
    "Symbol Integer Rational Float Add Mul Pow Max Min Mod Eq Ne Lt Le Gt Ge And Or Not true false "
    "True False oo zoo nan Abs FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt "
    "CeilDiv LShift RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv TruncToFloat TruncToInt "
    "RoundToInt RoundDecimal ToFloat Identity IsNonOverlappingAndDenseIndicator Infinity "
    "NegativeInfinity positive integer nonnegative negative nonzero zero real finite precision".split()
)
_NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
# quoted strings only as symbol names ('s0', 'u3') or numbers (Float('1.5', precision=53))
_EXPR_TOKEN = re.compile(rf"'[a-z]{{1,4}}\d+'|'{_NUMBER}'|[A-Za-z_][A-Za-z0-9_]*|{_NUMBER}|[\s(),=+\-*/]")
_GUARD_SOURCE = re.compile(r"L(?:\['[A-Za-z_][A-Za-z0-9_]*'\]|\[\d+\])+(?:\.(?:size|stride)\(\)\[\d+\])?")
_GUARD_REST = re.compile(r"[\d\s+\-*/%()<>=!]*\Z")
_KEEP_METADATA = "nn_module_stack"


def _refuse(message: str) -> EngineError:
    return EngineError(f"refused .pt2 archive: {message}")


def _check_expr(expr: str) -> None:
    pos = 0
    while pos < len(expr):
        match = _EXPR_TOKEN.match(expr, pos)
        if match is None:
            raise _refuse(f"unexpected character in shape expression {expr[:80]!r}")
        token = match.group()
        if (token[0].isalpha() or token[0] == "_") and token not in _SYMPY_NAMES:
            raise _refuse(f"unknown name {token!r} in shape expression {expr[:80]!r}")
        pos = match.end()


def _check_guard(guard: str) -> None:
    if not _GUARD_REST.match(_GUARD_SOURCE.sub("0", guard)):
        raise _refuse(f"guard {guard[:80]!r} is not a plain shape comparison")


def _check_target(target: str) -> None:
    parts = target.split(".")
    if not _FQN.match(target) or len(parts) < 2:
        raise _refuse(f"operator {target[:80]!r} is not allowed")
    if parts[0] == "_operator" and len(parts) == 2 and parts[1] in _SAFE_OPERATOR:
        return
    if parts[0] == "math" and len(parts) == 2:
        return
    if parts[:2] == ["torch", "ops"] and len(parts) >= 4 and parts[2] in _SAFE_NAMESPACES:
        return
    if parts[0] == "torch" and len(parts) == 2 and parts[1].lstrip("_").startswith("sym_"):
        return
    raise _refuse(f"operator {target[:80]!r} is not allowed")


def _check_value(key: str | None, value: str) -> None:
    if key in ("name", "as_name", "forward_arg_names"):
        ok = bool(_IDENT.match(value))
    elif key in ("parameter_name", "buffer_name", "tensor_constant_name", "fqn"):
        ok = bool(_FQN.match(value))
    elif key in ("target", "as_operator"):
        _check_target(value)
        return
    elif key == "expr_str":
        _check_expr(value)
        return
    elif key == "guards_code":
        _check_guard(value)
        return
    elif key in ("in_spec", "out_spec"):  # pytree specs: json.loads + a type registry lookup, no eval
        return
    else:
        ok = bool(_PLAIN.match(value))
    if not ok:
        raise _refuse(f"field {key!r} holds a disallowed value {value[:80]!r}")


def _sanitize(node: Any, key: str | None = None) -> Any:
    """Check every string; keep only the module stack of each node's metadata."""
    if isinstance(node, dict):
        if key == "metadata":
            stack = node.get(_KEEP_METADATA)
            if stack is None:
                return {}
            if not isinstance(stack, str) or not _MODULE_STACK.match(stack):
                raise _refuse("malformed nn_module_stack metadata")
            return {_KEEP_METADATA: stack}
        if "as_custom_obj" in node or "custom_obj" in node or node.get("custom_obj_values"):
            raise _refuse("the program uses custom (pickled TorchBind) objects")
        for k in node:
            if not isinstance(k, str) or not _PLAIN.match(k):
                raise _refuse(f"disallowed key {str(k)[:80]!r}")
        return {k: _sanitize(v, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_sanitize(v, key) for v in node]
    if isinstance(node, str):
        _check_value(key, node)
    return node


def _check_payload_config(text: bytes, members: set[str], base: str) -> None:
    config = json.loads(text).get("config", {})
    for fqn, meta in config.items():
        path = meta.get("path_name", "")
        if meta.get("use_pickle", True):
            raise _refuse(f"{fqn!r} is stored as a pickle")
        if not re.fullmatch(r"(weight|tensor)_\d+", path) or base + path not in members:
            raise _refuse(f"{fqn!r} points at {path!r}, which is not a raw tensor member")


def sanitized_copy(src: Path, dst: Path) -> Path:
    """Check `src` and write the copy torch.export.load may read to `dst` (must end in .pt2)."""
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _refuse(f"not a zip archive ({exc})") from exc
    with zf:
        infos = zf.infolist()
        if not infos or len(infos) > MAX_MEMBERS:
            raise _refuse(f"{len(infos)} members")
        root = infos[0].filename.split("/", 1)[0]
        names: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.filename
            rel = name[len(root) + 1:] if name.startswith(root + "/") else None
            if not rel or ".." in name.split("/") or "\\" in name or "\x00" in name or rel in names:
                raise _refuse(f"member name {name[:80]!r}")
            if info.is_dir():
                raise _refuse(f"member {name[:80]!r} is a folder")
            if info.compress_type != zipfile.ZIP_STORED and not (
                    rel.endswith(".json") and info.compress_type == zipfile.ZIP_DEFLATED
                    and info.file_size <= min(MAX_JSON_BYTES, MAX_DEFLATE_RATIO * max(info.compress_size, 1))):
                # torch writes stored members (quantserve deflates only JSON); anything else could be a bomb
                raise _refuse(f"member {name[:80]!r} is compressed")
            names[rel] = info
        _check_layout(names)
        members = set(names)
        for rel in ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json"):
            _check_payload_config(zf.read(names[rel]), members, rel.rsplit("/", 1)[0] + "/")
        info = names["models/model.json"]
        if info.file_size > MAX_JSON_BYTES:
            raise _refuse("models/model.json is too large")
        try:
            program = _sanitize(json.loads(zf.read(info)))
        except (ValueError, UnicodeDecodeError) as exc:
            raise _refuse(f"models/model.json is not valid JSON ({exc})") from exc
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
            for rel, info in names.items():
                if rel == "models/model.json":
                    out.writestr(info.filename, json.dumps(program))
                elif rel.startswith("data/sample_inputs/"):
                    out.writestr(info.filename, b"")  # empty = no example inputs, nothing to unpickle
                else:
                    with zf.open(info) as reader, out.open(info.filename, "w") as writer:
                        shutil.copyfileobj(reader, writer, 1 << 20)
            if "data/sample_inputs/model.pt" not in names:  # the loader reads it unconditionally
                out.writestr(f"{root}/data/sample_inputs/model.pt", b"")
    return dst


def _check_layout(names: dict[str, zipfile.ZipInfo]) -> None:
    for rel in names:
        if rel in ("archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
                   "models/model.json", "data/weights/model_weights_config.json",
                   "data/constants/model_constants_config.json", "data/sample_inputs/model.pt"):
            continue
        if re.fullmatch(r"data/weights/weight_\d+|data/constants/tensor_\d+", rel):
            continue
        if re.fullmatch(r"extra/[A-Za-z0-9_.\-/]+", rel):
            continue  # read as UTF-8 text only
        if rel.startswith("data/aotinductor/"):
            raise _refuse("it contains an AOTInductor package (compiled native code); upload the program alone")
        if rel.startswith(("data/constants/custom_obj_", "data/constants/opaque_obj_")):
            raise _refuse(f"{rel!r} is a pickled custom object")
        if rel.endswith(".pt"):
            raise _refuse(f"{rel!r} is a pickle")
        if rel.startswith("models/"):
            raise _refuse("only a single program named 'model' is supported")
        raise _refuse(f"unexpected member {rel[:80]!r}")
    for required in ("archive_format", "models/model.json", "data/weights/model_weights_config.json",
                     "data/constants/model_constants_config.json"):
        if required not in names:
            raise _refuse(f"missing {required!r}; was it written by torch.export.save?")
