"""What a name given to a model, dataset or job may be: checked at upload and submit, one rule for all three."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Annotated, Final

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from app.errors import ValidationFailedError

# The width of the name columns (models.name, datasets.name, jobs.name): a longer name cannot be stored.
MAX_NAME_CHARS: Final = 200

# Characters that break or disguise a name wherever it is shown: control characters (CR/LF end an HTTP header or
# a log line, NUL ends a C string), lone surrogates (not encodable as UTF-8), line and paragraph separators, and
# the bidirectional overrides and isolates that make "report\u202efdp.exe" display as "reportexe.pdf".
FORBIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cs", "Zl", "Zp"})
BIDI_CONTROLS: Final = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def is_forbidden(char: str) -> bool:
    return char in BIDI_CONTROLS or unicodedata.category(char) in FORBIDDEN_CATEGORIES


def name_problem(name: str) -> str | None:
    """What is wrong with `name`, in words a person can act on; None when it is a valid name."""
    if len(name) > MAX_NAME_CHARS:
        return f"too long: {len(name)} characters, the limit is {MAX_NAME_CHARS}"
    for position, char in enumerate(name):
        if is_forbidden(char):
            return (f"contains U+{ord(char):04X} at position {position}; names may not contain control characters "
                    "(line breaks, tabs, NUL), line separators or bidirectional overrides")
    return None


def check_name(name: str | None, loc: Sequence[str]) -> str | None:
    """`name` unchanged, or a 422 whose `errors` entry names the field at `loc`."""
    if name is None:
        return None
    problem = name_problem(name)
    if problem:
        raise ValidationFailedError(f"{loc[-1]}: {problem}", errors=[{"loc": list(loc), "msg": problem}])
    return name


def _pydantic_check(name: str) -> str:
    problem = name_problem(name)
    if problem:
        raise PydanticCustomError("invalid_name", problem)
    return name


# For pydantic bodies and FastAPI query parameters: a failed check is a 422 at the field's own loc.
Name = Annotated[str, AfterValidator(_pydantic_check)]


def default_name(filename: str | None, fallback: str) -> str:
    """A name made from an uploaded file's name when the client gave none: its last path part, cleaned, never empty.

    Cleaned rather than refused: the client did not choose this name, the file name just came along.
    """
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(c for c in base if not is_forbidden(c)).strip()[:MAX_NAME_CHARS]
    return cleaned or fallback
