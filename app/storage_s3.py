"""An S3-compatible store (AWS S3, MinIO, SeaweedFS): multipart uploads through a bounded buffer, ranged reads."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from app.errors import StoreUnavailableError
from app.storage import PendingFile

# S3 parts are 5 MiB..5 GiB (the last may be smaller) and at most 10,000: 8 MiB parts cover 80 GB, and an
# upload holds at most two parts in memory, so API memory stays flat however large the file.
PART_BYTES = 8 * 1024 * 1024
_CHUNK = 1024 * 1024
_MISSING = ("NoSuchKey", "404", "NotFound")
_REFUSED = ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken")
# Threads that send upload parts, shared by all uploads of this process; a part waits when all are busy.
_SENDERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="s3-part")
_BUSY = ("SlowDown", "ServiceUnavailable", "RequestTimeout", "InternalError", "503", "500")


def _config(endpoint: str | None) -> Config:
    return Config(
        signature_version="s3v4",  # presigned URLs too: MinIO and SeaweedFS refuse the legacy v2 signature
        # A custom endpoint (MinIO, SeaweedFS, Ceph) rarely has wildcard DNS for virtual-hosted buckets.
        s3={"addressing_style": "path" if endpoint else "auto"},
        # Outages surface within seconds as a 503, not after minutes of hidden retries.
        retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60,
        # botocore >= 1.36 adds CRC checksums to every upload; several S3-compatible servers reject them.
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
    )


class S3Storage:
    """Objects under s3://bucket/prefix/. Endpoint, region and credentials come from the AWS_* variables."""

    def __init__(self, bucket: str, prefix: str, *, spool_dir: Path, public_endpoint: str | None = None,
                 presign_s: int = 300) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        session = boto3.session.Session()
        # Clients are thread-safe (sessions are not): one for the request threads and the upload threads alike.
        self.client = session.client("s3", config=_config(self.endpoint))
        # SigV4 signs the host: a URL handed to outside clients is signed for the host they will reach.
        self._presigner = (session.client("s3", endpoint_url=public_endpoint, config=_config(public_endpoint))
                           if public_endpoint else self.client)
        self.presign_s = presign_s
        self.spool_dir = Path(spool_dir)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3Storage:
        parts = urlsplit(url)
        if parts.scheme != "s3" or len(parts.netloc) < 3:
            raise ValueError(f"QUANTSERVE_STORAGE_URL must look like s3://bucket/prefix, not {url!r}")
        return cls(parts.netloc, parts.path, **kwargs)

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"storage key escapes the store: {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """boto3's errors as the API's: missing object -> FileNotFoundError, outage or refusal -> 503."""
        where = f"s3://{self.bucket}/{self.prefix}" + (f" at {self.endpoint}" if self.endpoint else "")
        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                raise FileNotFoundError(f"{what}: no such object in {where}") from exc
            if code == "NoSuchBucket":
                raise StoreUnavailableError(f"{what}: the bucket {self.bucket!r} does not exist; create it "
                                            "(`quantserve migrate` does) or fix QUANTSERVE_STORAGE_URL") from exc
            if code in _REFUSED:
                raise StoreUnavailableError(f"{what}: the object store {where} refused our credentials ({code}); "
                                            "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from exc
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _BUSY or status >= 500:
                raise StoreUnavailableError(f"{what}: the object store {where} answered {code or status}; "
                                            "retry shortly") from exc
            raise
        except NoCredentialsError as exc:
            raise StoreUnavailableError(f"{what}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
                                        "AWS_SECRET_ACCESS_KEY") from exc
        except BotoCoreError as exc:  # connection refused, timeouts, closed connections
            raise StoreUnavailableError(f"{what}: the object store {where} is unreachable "
                                        f"({exc.__class__.__name__}); retry shortly") from exc

    # -- writing -------------------------------------------------------------------------------------------

    def pending(self, limit: int | None = None, key: str | None = None, *, spool: bool = True) -> S3PendingFile:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        return S3PendingFile(self, self.spool_dir / uuid.uuid4().hex if spool else None, limit,
                             key or f"tmp/{uuid.uuid4().hex}")

    def commit(self, pending: PendingFile, key: str) -> None:
        assert isinstance(pending, S3PendingFile)
        pending.finish()
        if key != pending.key:  # not where it was written: S3 cannot rename, so copy then delete
            with self.errors(f"moving {pending.key} to {key}"):
                self.client.copy({"Bucket": self.bucket, "Key": self._key(pending.key)}, self.bucket, self._key(key))
            self.delete(pending.key)
            pending.key = key

    def discard(self, pending: PendingFile) -> None:
        assert isinstance(pending, S3PendingFile)
        pending.abort()

    def put_file(self, source: Path, key: str) -> tuple[int, str]:
        pending = self.pending(key=key, spool=False)
        try:
            with open(source, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    pending.write(chunk)
                    pending.send_full_parts()
            pending.finish()
        except BaseException:
            pending.abort()
            raise
        return pending.size, pending.sha256

    # -- reading -------------------------------------------------------------------------------------------

    def open(self, key: str) -> BinaryIO:
        with self.errors(f"reading {key}"):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]

    def open_range(self, key: str, start: int, length: int) -> BinaryIO:
        """The body of one ranged GET, opened now so that an outage is a 503 before any byte is sent."""
        if length <= 0:
            return open(os.devnull, "rb")  # S3 answers 416 to a range over an empty object
        with self.errors(f"reading {key}"):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                          Range=f"bytes={start}-{start + length - 1}")["Body"]

    def fetch(self, key: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.errors(f"downloading {key}"), self.open(key) as body, open(dest, "wb") as out:
            shutil.copyfileobj(body, out, _CHUNK)
        return dest

    def presign(self, key: str, *, disposition: str) -> str | None:
        with self.errors(f"signing {key}"):
            return self._presigner.generate_presigned_url(
                "get_object", ExpiresIn=self.presign_s,
                Params={"Bucket": self.bucket, "Key": self._key(key), "ResponseContentDisposition": disposition})

    # -- deleting and housekeeping ------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        with self.errors(f"deleting {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        with self.errors(f"deleting {prefix}/"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix.rstrip("/")) + "/")
            for page in pages:
                objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objects:  # a page holds at most 1,000 keys, the most one DeleteObjects takes
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})

    def check(self) -> None:
        try:
            with self.errors("checking the bucket"):
                self.client.head_bucket(Bucket=self.bucket)
        except FileNotFoundError as exc:  # HEAD has no body: a missing bucket is a bare 404
            raise StoreUnavailableError(f"the bucket {self.bucket!r} does not exist; create it (`quantserve "
                                        "migrate` does) or fix QUANTSERVE_STORAGE_URL") from exc

    def ensure_bucket(self) -> bool:
        """Create the bucket when it is missing (`quantserve migrate`); True if it was created."""
        try:
            self.check()
            return False
        except StoreUnavailableError as exc:
            if not isinstance(exc.__cause__, FileNotFoundError):
                raise
        region = self.client.meta.region_name
        extra = ({"CreateBucketConfiguration": {"LocationConstraint": region}}
                 if region and region != "us-east-1" else {})
        with self.errors("creating the bucket"):
            self.client.create_bucket(Bucket=self.bucket, **extra)
        return True


class S3PendingFile(PendingFile):
    """An upload in flight: parts go out as the buffer fills; nothing is visible until finish()."""

    def __init__(self, store: S3Storage, spool: Path | None, limit: int | None, key: str) -> None:
        super().__init__(spool, limit, key)
        self.store = store
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._inflight: Future[None] | None = None

    def write(self, chunk: bytes) -> None:
        super().write(chunk)  # counts, hashes, enforces the limit, keeps the local copy
        self._buffer += chunk
        if len(self._buffer) >= 2 * PART_BYTES:  # the hard bound, for a caller that never drains
            self.send_full_parts()

    async def drain(self) -> None:
        """Start sending a full buffer in a thread and keep receiving meanwhile (at most one part in flight):
        the request's bytes and the store's writes overlap, and the event loop never waits on the store."""
        if len(self._buffer) >= PART_BYTES:
            if self._inflight is not None:
                await asyncio.wrap_future(self._inflight)
            self._inflight = _SENDERS.submit(self._send_part, self._take())

    def send_full_parts(self) -> None:
        if len(self._buffer) >= PART_BYTES:
            self._wait()
            self._send_part(self._take())

    def _take(self) -> tuple[int, bytes]:
        body, self._buffer = bytes(self._buffer), bytearray()
        self._parts.append({"PartNumber": len(self._parts) + 1})  # numbered in order taken, not in order sent
        return len(self._parts), body

    def _wait(self) -> None:
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            inflight.result()  # raises the part's error (StoreUnavailableError) here

    def _send_part(self, part: tuple[int, bytes]) -> None:
        s, (number, body) = self.store, part
        with s.errors(f"uploading {self.key}"):
            if self._upload_id is None:  # the first part: only one is ever in flight, so no race here
                self._upload_id = s.client.create_multipart_upload(Bucket=s.bucket, Key=s._key(self.key))["UploadId"]
            etag = s.client.upload_part(Bucket=s.bucket, Key=s._key(self.key), UploadId=self._upload_id,
                                        PartNumber=number, Body=body)["ETag"]
        self._parts[number - 1]["ETag"] = etag

    def finish(self) -> None:
        """Make the object visible: one PUT when it fit in the buffer, else the last part and the completion."""
        self.close()
        self._wait()
        s = self.store
        if not self._parts:
            with s.errors(f"uploading {self.key}"):
                s.client.put_object(Bucket=s.bucket, Key=s._key(self.key), Body=bytes(self._buffer))
        else:
            if self._buffer:
                self._send_part(self._take())
            with s.errors(f"completing {self.key}"):
                s.client.complete_multipart_upload(Bucket=s.bucket, Key=s._key(self.key), UploadId=self._upload_id,
                                                   MultipartUpload={"Parts": self._parts})
        self._buffer = bytearray()
        self.committed = True

    def abort(self) -> None:
        """Drop the parts already sent (they would be billed, invisible, forever) and the local copy."""
        self.close()
        self._buffer = bytearray()
        try:
            self._wait()  # a part still being sent would otherwise land after the abort
        except Exception:  # its error is the one being handled already, or moot now
            pass
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        if self._upload_id is not None and not self.committed:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self.store.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.store._key(self.key),
                                                         UploadId=upload_id)
            except (BotoCoreError, ClientError):  # the store is down: its lifecycle rule must reap the parts
                pass
