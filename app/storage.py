"""Where uploaded files and artifacts live: one small protocol, a local folder (default) or an S3 bucket."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from app.errors import SizeLimitExceededError

if TYPE_CHECKING:
    from app.settings import Settings


class PendingFile:
    """A file being written: hashed and counted as it streams, invisible until committed.

    `path` is a local copy of the bytes (format detection reads it); None when nobody needs one.
    """

    def __init__(self, path: Path | None, limit: int | None, key: str | None = None) -> None:
        self.path = path
        self.limit = limit
        self.key = key  # where the caller means to commit it, when known up front (S3 writes there directly)
        self.size = 0
        self.committed = False
        self._hash = hashlib.sha256()
        self._fh: BinaryIO | None = open(path, "wb") if path is not None else None  # noqa: SIM115 - close()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.limit is not None and self.size > self.limit:
            raise SizeLimitExceededError(self.limit)
        self._hash.update(chunk)
        if self._fh is not None:
            self._fh.write(chunk)

    async def drain(self) -> None:
        """Let a store send what it has buffered without blocking the event loop; a local file has nothing."""

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()


class Storage(Protocol):
    def pending(self, limit: int | None = None, key: str | None = None) -> PendingFile: ...
    def commit(self, pending: PendingFile, key: str) -> None: ...
    def discard(self, pending: PendingFile) -> None: ...
    def put_file(self, source: Path, key: str) -> tuple[int, str]: ...
    def open(self, key: str) -> BinaryIO: ...
    def open_range(self, key: str, start: int, length: int) -> BinaryIO: ...
    def fetch(self, key: str, dest: Path) -> Path: ...
    def presign(self, key: str, *, disposition: str) -> str | None: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def check(self) -> None: ...


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

    def pending(self, limit: int | None = None, key: str | None = None) -> PendingFile:
        return PendingFile(self._tmp / uuid.uuid4().hex, limit, key)

    def commit(self, pending: PendingFile, key: str) -> None:
        pending.close()
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        assert pending.path is not None
        os.replace(pending.path, target)
        pending.committed = True

    def discard(self, pending: PendingFile) -> None:
        pending.close()
        if pending.path is not None:
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

    def open_range(self, key: str, start: int, length: int) -> BinaryIO:
        fh = open(self._path(key), "rb")  # noqa: SIM115 - the caller closes it
        fh.seek(start)
        return fh

    def fetch(self, key: str, dest: Path) -> Path:
        # The worker shares this folder with the API: read in place, no copy.
        return self._path(key)

    def presign(self, key: str, *, disposition: str) -> str | None:
        return None  # nothing else can serve a local file: the API streams it

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

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise OSError(f"{self.root} is not writable")

    def local_path(self, key: str) -> Path:
        return self._path(key)


def open_storage(settings: Settings) -> Storage:
    """The store QUANTSERVE_STORAGE_URL names: s3://bucket/prefix, or the local folder when unset."""
    url = settings.storage_url
    if url and url.startswith("s3://"):
        from app.storage_s3 import S3Storage  # boto3 loads only when an S3 store is configured

        return S3Storage.from_url(url, spool_dir=settings.data_dir / "spool",
                                  public_endpoint=settings.storage_public_endpoint)
    if url and not url.startswith("file://"):
        raise ValueError(f"QUANTSERVE_STORAGE_URL must be s3://bucket/prefix or file:///path, not {url!r}")
    return LocalStorage(Path(url.removeprefix("file://")) if url else settings.storage_dir)


@contextmanager
def pending_upload(storage: Storage, limit: int | None, key: str | None = None) -> Iterator[PendingFile]:
    """A pending file that is discarded (S3: the multipart upload aborted) unless the caller commits it."""
    pending = storage.pending(limit, key)
    try:
        yield pending
    finally:
        pending.close()
        if not pending.committed:
            storage.discard(pending)
        elif pending.path is not None:
            pending.path.unlink(missing_ok=True)  # S3 keeps a local copy for format detection only
