"""Safe reading of uploaded zip and tar archives: names, types, counts and sizes checked while streaming."""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from worker.engine.errors import EngineError

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_TOTAL_BYTES = 2 * 1024**3
_CHUNK = 1024 * 1024
# Errors the stdlib raises on damaged or hostile archives; all become one EngineError.
_CORRUPT = (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError)
# Magic numbers of archives and compressed streams: an archive inside an archive multiplies every cap.
_NESTED_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"7z\xbc\xaf\x27\x1c", b"Rar!")


@dataclass(frozen=True)
class Member:
    """One regular file of an archive: its checked relative name and its declared size."""

    name: str
    size: int


def sniff_archive(head: bytes) -> str | None:
    """'zip', 'tar', 'tar.gz', 'tar.bz2', 'tar.xz' from a file's first bytes (≥ 262 for plain tar), else None."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head.startswith(b"BZh"):
        return "tar.bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "tar.xz"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def human_bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f}".removesuffix(".0") + f" {unit}"


def check_member_name(name: str, *, directory: bool = False) -> str:
    """The member's name as a clean relative POSIX path; EngineError if it could land outside the archive.

    A directory may name the archive's root ("./", as `tar -C folder .` writes): that gives "".
    """
    if not name or "\x00" in name:
        raise EngineError(f"archive member {name!r} has an empty or invalid name")
    if "\\" in name:
        # Windows tools read a backslash as a separator: 'a\\..\\..\\x' would escape there.
        raise EngineError(f"archive member {name!r} uses backslashes; only '/' separators are accepted")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise EngineError(f"archive member {name!r} has an absolute path")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts:
        raise EngineError(f"archive member {name!r} escapes the archive")
    if not parts and not directory:
        raise EngineError(f"archive member {name!r} has an empty or invalid name")
    return "/".join(parts)


class _Budget:
    """Counts decompressed bytes as they are produced, per file and in total, whatever the headers claim."""

    def __init__(self, max_total: int | None, max_file: int | None, *, shown_total: int | None = None) -> None:
        self.max_total, self.max_file, self.total = max_total, max_file, 0
        self.shown_total = shown_total or max_total  # the cap users are told about

    def charge(self, name: str | None, new: int, file_bytes: int) -> None:
        self.total += new
        if self.max_file is not None and file_bytes > self.max_file:
            raise EngineError(f"archive member '{name}' expands past {human_bytes(self.max_file)}")
        if self.max_total is not None and self.total > self.max_total:
            raise EngineError(f"archive expands past {human_bytes(self.shown_total or self.max_total)}")


class CountingReader:
    """A read-only stream over one member that charges every new decompressed byte to the budget.

    Seeking is passed through (np.load seeks back over the magic), and only bytes past the furthest
    point already read are charged, so re-reading does not double count.
    """

    def __init__(self, inner: IO[bytes], name: str | None, budget: _Budget, *, refuse_nested: bool) -> None:
        self._inner, self.name, self._budget = inner, name, budget
        self._pos = self._high = 0
        self._refuse_nested = refuse_nested

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._inner.read(n)
        except _CORRUPT as exc:
            what = "archive" if self.name is None else f"archive member '{self.name}'"
            raise EngineError(f"{what} is corrupt or truncated: {exc}") from exc
        if self._refuse_nested and self._pos == 0 and data.startswith(_NESTED_MAGIC):
            raise EngineError(f"archive member '{self.name}' is itself an archive; nested archives are refused")
        self._pos += len(data)
        if self._pos > self._high:
            new, self._high = self._pos - self._high, self._pos
            self._budget.charge(self.name, new, self._high)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = self._inner.seek(offset, whence)
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._inner.seekable()


def iter_members(
    archive: Path, *, max_entries: int = DEFAULT_MAX_ENTRIES,
    max_total_bytes: int | None = DEFAULT_MAX_TOTAL_BYTES, max_file_bytes: int | None = None,
) -> Iterator[Member]:
    """Check and yield each regular file of a zip or tar(.gz/.bz2/.xz), without extracting.

    A zip's listing comes from its central directory (nothing is decompressed; declared sizes are
    checked against the caps). A tar has no directory, so it is streamed: the decompressed stream
    itself is counted against max_total_bytes, which stops a compressed bomb while listing.
    """
    for member, _ in _walk(Path(archive), max_entries, max_total_bytes, max_file_bytes, False, False):
        yield member


def list_members(
    archive: Path, *, max_entries: int = DEFAULT_MAX_ENTRIES,
    max_total_bytes: int | None = DEFAULT_MAX_TOTAL_BYTES, max_file_bytes: int | None = None,
) -> list[Member]:
    """All regular files of the archive, each checked (see iter_members); EngineError on the first bad one."""
    return list(iter_members(archive, max_entries=max_entries, max_total_bytes=max_total_bytes,
                             max_file_bytes=max_file_bytes))


def iter_files(
    archive: Path, *, max_entries: int = DEFAULT_MAX_ENTRIES,
    max_total_bytes: int | None = DEFAULT_MAX_TOTAL_BYTES, max_file_bytes: int | None = None,
    refuse_nested: bool = True,
) -> Iterator[tuple[Member, CountingReader]]:
    """Yield (member, stream) for each regular file; read the stream before advancing (tar is sequential).

    Every byte read is counted against the caps as it is decompressed, so a member whose header
    understates its size is still stopped.
    """
    for member, stream in _walk(Path(archive), max_entries, max_total_bytes, max_file_bytes, True, refuse_nested):
        if stream is not None:
            yield member, stream


def safe_extract(
    archive: Path, dest: Path, *, max_entries: int = DEFAULT_MAX_ENTRIES,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES, max_file_bytes: int | None = None,
    refuse_nested: bool = True,
) -> list[Path]:
    """Extract regular files under dest, checking every name and counting bytes as they are written.

    On any failure the files written by this call are removed (dest too, if this call created it).
    """
    dest = Path(dest)
    created_dest = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    written: list[Path] = []
    try:
        for member, stream in iter_files(archive, max_entries=max_entries, max_total_bytes=max_total_bytes,
                                         max_file_bytes=max_file_bytes, refuse_nested=refuse_nested):
            target = root / member.name
            # Second line of defence after check_member_name: resolve() follows any link already on disk.
            if not target.resolve().is_relative_to(root):
                raise EngineError(f"archive member '{member.name}' escapes the archive")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                out = target.open("xb")  # exclusive: a duplicate or clashing name never overwrites
            except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
                raise EngineError(f"archive member '{member.name}' clashes with another member") from exc
            written.append(target)
            with out:
                while chunk := stream.read(_CHUNK):
                    out.write(chunk)
    except BaseException:
        if created_dest:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for path in written:
                path.unlink(missing_ok=True)
        raise
    return written


def _walk(
    archive: Path, max_entries: int, max_total: int | None, max_file: int | None, open_data: bool,
    refuse_nested: bool,
) -> Iterator[tuple[Member, CountingReader | None]]:
    with archive.open("rb") as raw:
        kind = sniff_archive(raw.read(512))
        raw.seek(0)
        if kind is None:
            raise EngineError("not a zip or tar archive")
        budget = _Budget(max_total, max_file)
        try:
            if kind == "zip":
                yield from _walk_zip(raw, max_entries, budget, open_data, refuse_nested)
            else:
                yield from _walk_tar(raw, kind, max_entries, budget, open_data, refuse_nested)
        except EngineError:
            raise
        except NotImplementedError as exc:  # zipfile: unsupported compression method
            raise EngineError(f"archive uses an unsupported feature: {exc}") from exc
        except _CORRUPT as exc:
            raise EngineError(f"archive is corrupt or truncated: {exc}") from exc


def _walk_zip(
    raw: BinaryIO, max_entries: int, budget: _Budget, open_data: bool, refuse_nested: bool,
) -> Iterator[tuple[Member, CountingReader | None]]:
    with zipfile.ZipFile(raw) as zf:
        infos = zf.infolist()
        if len(infos) > max_entries:
            raise EngineError(f"archive has {len(infos)} entries; at most {max_entries} are accepted")
        seen: set[str] = set()
        declared = 0
        for info in infos:
            file_type = stat.S_IFMT(info.external_attr >> 16)
            is_dir = info.is_dir() or file_type == stat.S_IFDIR
            name = check_member_name(info.filename, directory=is_dir)
            if is_dir:
                continue
            if file_type == stat.S_IFLNK:
                raise EngineError(f"archive member '{name}' is a symbolic link; only regular files are accepted")
            if file_type not in (0, stat.S_IFREG):
                raise EngineError(f"archive member '{name}' is not a regular file")
            if info.flag_bits & 0x1:
                raise EngineError(f"archive member '{name}' is encrypted")
            _check_new(name, seen)
            declared += info.file_size
            # Declared sizes give a cheap early refusal; the real count is kept while reading.
            _Budget(budget.max_total, budget.max_file).charge(name, declared, info.file_size)
            member = Member(name, info.file_size)
            if not open_data:
                yield member, None
                continue
            with zf.open(info) as fh:
                yield member, CountingReader(fh, name, budget, refuse_nested=refuse_nested)


_DECOMPRESSORS = {"tar.gz": lambda f: gzip.GzipFile(fileobj=f), "tar.bz2": bz2.BZ2File, "tar.xz": lzma.LZMAFile}


def _walk_tar(
    raw: BinaryIO, kind: str, max_entries: int, budget: _Budget, open_data: bool, refuse_nested: bool,
) -> Iterator[tuple[Member, CountingReader | None]]:
    opener = _DECOMPRESSORS.get(kind)
    inner: IO[bytes] = opener(raw) if opener else raw
    # The whole decompressed stream (headers and skipped data too) is counted, so merely listing a
    # tar bomb stops at the cap; member data read through iter_files is also counted by its own
    # reader. The slack covers tar's own headers and padding (512 bytes each, many entries).
    cap = None if budget.max_total is None else budget.max_total + 64 * 1024**2
    stream = CountingReader(inner, None, _Budget(cap, None, shown_total=budget.max_total), refuse_nested=False)
    # "r|": sequential, never seeks, so a compressed stream is read once, front to back.
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        seen: set[str] = set()
        count = 0
        for ti in tf:
            count += 1
            if count > max_entries:
                raise EngineError(f"archive has more than {max_entries} entries")
            name = check_member_name(ti.name, directory=ti.isdir())
            if ti.isdir():
                continue
            if ti.issym() or ti.islnk():
                kind_word = "symbolic link" if ti.issym() else "hard link"
                raise EngineError(f"archive member '{name}' is a {kind_word}; only regular files are accepted")
            if not ti.isreg() or ti.type == tarfile.GNUTYPE_SPARSE:
                raise EngineError(f"archive member '{name}' is not a regular file")
            try:  # the stdlib's own "data" filter, as a second opinion on names and types
                tarfile.data_filter(ti, "/archive-root")
            except tarfile.FilterError as exc:
                raise EngineError(f"archive member '{name}' is refused: {exc}") from exc
            _check_new(name, seen)
            member = Member(name, ti.size)
            if not open_data:
                budget.charge(name, ti.size, ti.size)
                yield member, None
                continue
            fh = tf.extractfile(ti)
            if fh is None:  # cannot happen for a regular file; refuse rather than guess
                raise EngineError(f"archive member '{name}' has no data")
            yield member, CountingReader(fh, name, budget, refuse_nested=refuse_nested)


def _check_new(name: str, seen: set[str]) -> None:
    if name in seen:  # a second copy would silently replace the first one that was checked
        raise EngineError(f"archive member '{name}' appears twice")
    seen.add(name)
