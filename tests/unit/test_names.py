"""Names: one rule for models, datasets and jobs; a download's Content-Disposition is safe for any stored name."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest

from app.errors import ValidationFailedError
from app.names import MAX_NAME_CHARS, check_name, default_name, name_problem
from app.routes.downloads import content_disposition

HOSTILE = {"crlf": "a\r\nX-Injected: 1", "nul": "a\x00b", "tab": "a\tb", "del": "a\x7fb", "c1": "a\x85b",
           "bidi override": "report\u202efdp.exe", "line separator": "a\u2028b", "lone surrogate": "a\ud800b"}
UNICODE = "модель-量化-🙂"


@pytest.mark.parametrize("name", ["digits-cnn", UNICODE, "a b (v2).onnx", "👨‍👩‍👧 family", "x" * MAX_NAME_CHARS])
def test_ordinary_and_unicode_names_are_accepted(name: str) -> None:
    assert name_problem(name) is None
    assert check_name(name, ("body", "name")) == name


@pytest.mark.parametrize("name", HOSTILE.values(), ids=HOSTILE.keys())
def test_control_characters_are_refused_saying_which_and_where(name: str) -> None:
    with pytest.raises(ValidationFailedError) as caught:
        check_name(name, ("query", "name"))
    [error] = caught.value.errors
    assert error["loc"] == ["query", "name"]
    assert "U+" in error["msg"] and "position" in error["msg"] and "control characters" in error["msg"]


def test_a_long_name_is_refused_giving_the_limit() -> None:
    with pytest.raises(ValidationFailedError) as caught:
        check_name("x" * 10_000, ("body", "name"))
    assert caught.value.errors == [{"loc": ["body", "name"],
                                    "msg": f"too long: 10000 characters, the limit is {MAX_NAME_CHARS}"}]


def test_a_default_name_from_a_file_name_is_cleaned_not_refused() -> None:
    assert default_name("C:\\Users\\me\\digits.onnx", "model") == "digits.onnx"
    assert default_name("dir/a\r\nb.onnx", "model") == "ab.onnx"
    assert default_name("\x00\r\n", "model") == "model"
    assert default_name(None, "dataset") == "dataset"
    assert len(default_name("y" * 5000, "model")) == MAX_NAME_CHARS


def _parse(header: str) -> tuple[str, str]:
    match = re.fullmatch(r'attachment; filename="([^"\\]*)"; filename\*=UTF-8\'\'([A-Za-z0-9%._~-]*)', header)
    assert match, header
    return match.group(1), unquote(match.group(2), encoding="utf-8", errors="strict")


@pytest.mark.parametrize("filename, fallback, utf8", [
    ("digits-cnn.int8.onnx", "digits-cnn.int8.onnx", "digits-cnn.int8.onnx"),
    (UNICODE + ".onnx", "download.onnx", UNICODE + ".onnx"),
    ("café 100%.onnx", "cafe 100_.onnx", "café 100%.onnx"),
    ('say "hi"\\.pt', "say _hi_.pt", 'say "hi"_.pt'),
    ("a\r\nX-Injected: 1.onnx", "a_X-Injected: 1.onnx", "a__X-Injected: 1.onnx"),
    ("a\x00b.pt2", "a_b.pt2", "a_b.pt2"),
    ('q"; filename="evil.sh', "q_ filename=_evil.sh", 'q"; filename="evil.sh'),
    ("../../etc/passwd", "_.._etc_passwd", "_.._etc_passwd"),
    ("report\u202efdp.exe", "report_fdp.exe", "report_fdp.exe"),
    ("", "download", "download"),
])
def test_content_disposition_has_a_safe_ascii_fallback_and_the_utf8_name(filename: str, fallback: str,
                                                                         utf8: str) -> None:
    header = content_disposition(filename)
    header.encode("ascii")  # a header must be Latin-1 to be sent at all; ours is plain ASCII
    assert "\r" not in header and "\n" not in header
    assert _parse(header) == (fallback, utf8)


def test_the_name_limit_is_the_width_of_the_name_columns() -> None:
    from app.models import Dataset, Job, Model

    assert {t.__table__.c.name.type.length for t in (Model, Dataset, Job)} == {MAX_NAME_CHARS}
