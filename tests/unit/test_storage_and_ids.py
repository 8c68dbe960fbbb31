"""Local storage never leaves partial files or escapes its root; ids sort by creation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from app.errors import SizeLimitExceededError
from app.ids import uuid7
from app.storage import LocalStorage, pending_upload


def test_pending_upload_is_removed_unless_committed(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "store")
    with pytest.raises(SizeLimitExceededError), pending_upload(store, limit=10) as pending:
        pending.write(b"0123456789")
        pending.write(b"x")
    assert not any(p.is_file() for p in (tmp_path / "store").rglob("*"))
    with pending_upload(store, limit=None) as pending:
        pending.write(b"hello")
        store.commit(pending, "models/a/original")
    assert (tmp_path / "store/models/a/original").read_bytes() == b"hello"
    assert pending.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert not any((tmp_path / "store/tmp").iterdir())


def test_keys_cannot_escape_the_store(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "store")
    for key in ("../outside", "/etc/passwd", "a/../../x"):
        with pytest.raises(ValueError):
            store.local_path(key)


def test_delete_removes_empty_parents(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "store")
    source = tmp_path / "f"
    source.write_bytes(b"x" * 100)
    assert store.put_file(source, "jobs/1/attempt-1/f")[0] == 100
    store.delete("jobs/1/attempt-1/f")
    assert not (tmp_path / "store/jobs").exists()


def test_uuid7_is_version_7_and_strictly_increasing() -> None:
    ids = [uuid7() for _ in range(20000)]
    assert all(i.version == 7 for i in ids[:10])
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_the_storage_url_picks_the_store(tmp_path: Path) -> None:
    from app.settings import Settings
    from app.storage import open_storage
    from app.storage_s3 import S3Storage

    assert isinstance(open_storage(Settings(data_dir=tmp_path)), LocalStorage)
    assert open_storage(Settings(data_dir=tmp_path, storage_url=f"file://{tmp_path}/elsewhere")).root == (
        tmp_path / "elsewhere").resolve()
    s3 = open_storage(Settings(data_dir=tmp_path, storage_url="s3://my-bucket/some/prefix/"))
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("my-bucket", "some/prefix")
    assert s3._key("models/a/original") == "some/prefix/models/a/original"
    for bad in ("s3://ab/x", "gs://bucket/x", "/plain/path"):
        with pytest.raises(ValueError):
            open_storage(Settings(data_dir=tmp_path, storage_url=bad))
    with pytest.raises(ValueError):
        s3._key("../other-tenant/x")
