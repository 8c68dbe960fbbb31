"""Where uploaded files and artifacts live: one small protocol, a local-folder implementation."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

from app.errors import SizeLimitExceededError


class PendingFile:
    """A file being written: hashed and counted as it streams, invisible until committed."""

    def __init__(self, path: Path, limit: int | None) -> None:
        self.path = path
        self.limit = limit
        self.size = 0
        self._hash = hashlib.sha256()
        self._fh: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by close()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.limit is not None and self.size > self.limit:
            raise SizeLimitExceededError(self.limit)
        self._hash.update(chunk)
        self._fh.write(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


class Storage(Protocol):
    def pending(self, limit: int | None = None) -> PendingFile: ...
    def commit(self, pending: PendingFile, key: str) -> None: ...
    def discard(self, pending: PendingFile) -> None: ...
    def put_file(self, source: Path, key: str) -> tuple[int, str]: ...
    def open(self, key: str) -> BinaryIO: ...
    def delete(self, key: str) -> None: ...
    def local_path(self, key: str) -> Path: ...


class LocalStorage:
    """Files under one folder. Partial writes go to tmp/ and are renamed into place on commit."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"storage key escapes the store: {key!r}")
        return path

    def pending(self, limit: int | None = None) -> PendingFile:
        return PendingFile(self._tmp / uuid.uuid4().hex, limit)

    def commit(self, pending: PendingFile, key: str) -> None:
        pending.close()
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(pending.path, target)

    def discard(self, pending: PendingFile) -> None:
        pending.close()
        pending.path.unlink(missing_ok=True)

    def put_file(self, source: Path, key: str) -> tuple[int, str]:
        pending = self.pending()
        try:
            with open(source, "rb") as fh:
                while chunk := fh.read(1024 * 1024):
                    pending.write(chunk)
            self.commit(pending, key)
        except BaseException:
            self.discard(pending)
            raise
        return pending.size, pending.sha256

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Remove now-empty parent folders up to the root, so deletes leave nothing behind.
        parent = path.parent
        while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def local_path(self, key: str) -> Path:
        return self._path(key)


@contextmanager
def pending_upload(storage: Storage, limit: int | None) -> Iterator[PendingFile]:
    """A pending file that is removed unless the caller commits it."""
    pending = storage.pending(limit)
    try:
        yield pending
    finally:
        pending.close()
        pending.path.unlink(missing_ok=True)  # a no-op after commit(): the file was renamed away
