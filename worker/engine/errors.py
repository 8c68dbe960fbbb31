"""Every error the engine raises to its callers, in one place. torch-free: the API imports this module.

`code` is the job error code (API.md), or a finer one the runner folds into it and keeps as `reason`.
"""

from __future__ import annotations

from collections.abc import Sequence


class EngineError(Exception):
    """A failure with a code the job reports: the user's to fix (bad file, bad data, unsupported model), or
    `engine_error` when our own output failed. Never retried."""

    code = "invalid_input"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class UnsupportedModelError(EngineError):
    """A valid model of a format or kind quantserve does not handle."""

    code = "unsupported"


class UnsupportedMethodError(EngineError):
    """A (format, method) pair, or a device for it, that the registry does not offer."""

    code = "unsupported"

    def __init__(self, fmt: str, method: str, supported: Sequence[str]) -> None:
        self.supported = sorted(supported)
        super().__init__(
            f"method {method!r} is not available for format {fmt!r}; supported: {', '.join(self.supported)}"
        )


class UnknownFormatError(EngineError):
    """The bytes are not a format quantserve accepts (the API answers 415)."""

    code = "unsupported_format"
