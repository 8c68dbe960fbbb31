"""Resumable artifact downloads: a .part file, Range + If-Range to continue it, sha256 checked before the rename."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import httpx

from quantserve_client.http import RETRY_STATUSES, ClientError, Transport, api_error
from quantserve_client.schemas import ArtifactPublic

CHUNK = 1024 * 1024


class DownloadError(ClientError):
    """An artifact could not be downloaded whole and intact."""


def safe_filename(name: str) -> str:
    """The artifact's name as a file in the chosen folder, never a path out of it (the name derives from the
    upload's name, which the uploader chose)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip().lstrip(".")
    cleaned = "".join(c for c in base if c.isprintable())
    return cleaned or "artifact"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_artifact(transport: Transport, artifact: ArtifactPublic, folder: Path, *,
                      on_bytes: Callable[[int, int], None] | None = None) -> Path:
    """Fetch one artifact into `folder`; continue a partial download left by an earlier attempt or run."""
    target = folder / safe_filename(artifact.filename)
    if target.is_file() and target.stat().st_size == artifact.size_bytes and sha256_of(target) == artifact.sha256:
        return target  # already here and intact: nothing to send
    # The .part name carries the content hash: a partial file is only ever continued with the bytes it began with.
    part = target.with_name(f"{target.name}.{artifact.sha256[:16]}.part")
    size, etag = artifact.size_bytes, f'"{artifact.sha256}"'
    failures, restarted = 0, False
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        response: httpx.Response | None = None
        try:
            if have < size:
                headers = {"Range": f"bytes={have}-", "If-Range": etag} if have else {}
                with transport.http.stream("GET", artifact.download_url, headers=headers) as response:
                    if response.status_code in RETRY_STATUSES:
                        raise _Retry
                    if response.status_code == 416:  # our .part no longer fits the file: start over
                        part.unlink(missing_ok=True)
                        raise _Retry
                    if response.status_code not in (200, 206):
                        raise api_error(response)
                    if response.status_code == 206 and not response.headers.get(
                            "content-range", "").startswith(f"bytes {have}-"):
                        raise DownloadError(f"the server answered range {response.headers.get('content-range')!r} "
                                            f"to a request for bytes {have}-")
                    # 200: the server sent the whole file (it ignored the range, or If-Range did not match)
                    have = have if response.status_code == 206 else 0
                    with part.open("ab" if have else "wb") as fh:
                        for chunk in response.iter_bytes(CHUNK):
                            fh.write(chunk)
                            have += len(chunk)
                            failures = 0  # progress was made: a flaky link gets its full retry budget again
                            if on_bytes:
                                on_bytes(have, size)
                if have < size:
                    raise _Retry  # the stream ended early without an error: continue from what we have
        except (httpx.TransportError, _Retry) as exc:
            if failures >= transport.retries:
                raise DownloadError(f"{artifact.filename}: gave up after {failures + 1} attempts "
                                    f"({have} of {size} bytes kept in {part})") from (
                    None if isinstance(exc, _Retry) else exc)
            transport.sleep(transport.delay_s(failures, response))
            failures += 1
            continue
        if sha256_of(part) != artifact.sha256:
            part.unlink()
            if restarted:
                raise DownloadError(f"{artifact.filename}: the bytes received do not match its sha256 "
                                    f"{artifact.sha256}, twice")
            restarted = True  # a stale or damaged .part: fetch it once more, whole
            continue
        part.replace(target)
        return target


class _Retry(Exception):
    """Internal: this attempt ended without the whole file; wait and continue."""
