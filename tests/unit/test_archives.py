"""Archive safety: traversal, links, counts, bombs and lying headers are refused; clean archives extract."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from worker.engine.errors import EngineError
from worker.engine.formats import archives

MiB = 1024**2


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


class Zeros(io.RawIOBase):
    """A file of n zero bytes that never exists in memory at once."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # noqa: ANN001 - io protocol
        k = min(len(buf), self.left)
        buf[:k] = bytes(k)
        self.left -= k
        return k


def zip_bomb(path: Path, size: int) -> Path:
    """A zip with one highly compressible member of `size` zeros, written in 1 MiB chunks."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("zeros.bin", "w") as out:
            for _ in range(size // MiB):
                out.write(bytes(MiB))
    return path


def tar_bomb(path: Path, size: int) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size = size
        tf.addfile(info, Zeros(size))
    return path


def test_clean_zip_and_tar_list_and_extract(tmp_path: Path) -> None:
    members = {"top/config.json": b"{}", "top/sub/weights.bin": b"\x01\x02\x03"}
    for archive in (make_zip(tmp_path / "a.zip", members), make_tar(tmp_path / "a.tgz", members),
                    make_tar(tmp_path / "a.tar", members, mode="w")):
        listed = archives.list_members(archive)
        assert [(m.name, m.size) for m in listed] == [("top/config.json", 2), ("top/sub/weights.bin", 3)]
        dest = tmp_path / f"out-{archive.name}"
        written = archives.safe_extract(archive, dest)
        assert sorted(p.relative_to(dest.resolve()).as_posix() for p in written) == sorted(members)
        assert (dest / "top/sub/weights.bin").read_bytes() == b"\x01\x02\x03"


@pytest.mark.parametrize("name", ["../evil", "top/../../evil", "a/./../../evil"])
def test_traversal_member_escapes_the_archive(tmp_path: Path, name: str) -> None:
    archive = make_zip(tmp_path / "t.zip", {"ok.txt": b"ok", name: b"pwned"})
    with pytest.raises(EngineError, match="escapes the archive"):
        archives.list_members(archive)
    dest = tmp_path / "dest"
    with pytest.raises(EngineError, match="escapes the archive"):
        archives.safe_extract(archive, dest)
    assert not (tmp_path / "evil").exists()
    assert not dest.exists()  # created by the call, removed on failure


def test_traversal_member_in_tar_is_refused(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "t.tgz", {"../evil": b"pwned"})
    with pytest.raises(EngineError, match="'../evil' escapes the archive"):
        archives.safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("name", ["/etc/evil", "C:/evil", "a\\..\\..\\evil"])
def test_absolute_or_backslash_names_are_refused(tmp_path: Path, name: str) -> None:
    archive = make_zip(tmp_path / "t.zip", {name: b"x"})
    with pytest.raises(EngineError, match="absolute path|backslashes"):
        archives.list_members(archive)


@pytest.mark.parametrize("link_type", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_links_in_a_tar_are_refused(tmp_path: Path, link_type: bytes) -> None:
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("passwd")
        info.type, info.linkname = link_type, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(EngineError, match="'passwd' is a (symbolic|hard) link"):
        archives.safe_extract(path, tmp_path / "dest")
    assert not (tmp_path / "dest" / "passwd").exists()


def test_device_in_a_tar_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dev.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("null")
        info.type = tarfile.CHRTYPE
        tf.addfile(info)
    with pytest.raises(EngineError, match="'null' is not a regular file"):
        archives.list_members(path)


def test_symlink_in_a_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("passwd")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(EngineError, match="'passwd' is a symbolic link"):
        archives.safe_extract(path, tmp_path / "dest")


def test_entry_count_is_capped(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "many.zip", {f"f{i}": b"" for i in range(11)})
    with pytest.raises(EngineError, match="11 entries; at most 10"):
        archives.list_members(archive, max_entries=10)
    tar = make_tar(tmp_path / "many.tgz", {f"f{i}": b"" for i in range(11)})
    with pytest.raises(EngineError, match="more than 10 entries"):
        archives.list_members(tar, max_entries=10)


def test_zip_bomb_is_refused_before_extraction(tmp_path: Path) -> None:
    bomb = zip_bomb(tmp_path / "bomb.zip", 200 * MiB)
    assert bomb.stat().st_size < 2 * MiB
    with pytest.raises(EngineError, match="archive expands past 50 MiB"):
        archives.safe_extract(bomb, tmp_path / "dest", max_total_bytes=50 * MiB)
    assert not (tmp_path / "dest").exists()
    with pytest.raises(EngineError, match="'zeros.bin' expands past 10 MiB"):
        archives.list_members(bomb, max_file_bytes=10 * MiB)


def test_zip_whose_header_understates_the_size_is_refused(tmp_path: Path) -> None:
    """A central directory that claims 1 KiB for 20 MiB of data: the stream stops at the claim, CRC fails."""
    data = bytearray(zip_bomb(tmp_path / "honest.zip", 20 * MiB).read_bytes())
    cd = data.rindex(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = (1024).to_bytes(4, "little")  # uncompressed size in the central directory
    liar = tmp_path / "liar.zip"
    liar.write_bytes(bytes(data))
    assert archives.list_members(liar)[0].size == 1024
    with pytest.raises(EngineError, match="corrupt or truncated"):
        archives.safe_extract(liar, tmp_path / "dest", max_total_bytes=5 * MiB)
    assert not (tmp_path / "dest").exists()


def test_tar_gz_bomb_is_stopped_while_streaming(tmp_path: Path) -> None:
    bomb = tar_bomb(tmp_path / "bomb.tgz", 200 * MiB)
    assert bomb.stat().st_size < 2 * MiB
    # Listing alone decompresses a tar: the stream count stops it, whatever the headers say.
    with pytest.raises(EngineError, match="archive expands past 50 MiB"):
        archives.list_members(bomb, max_total_bytes=50 * MiB)
    with pytest.raises(EngineError, match="archive expands past 50 MiB"):
        archives.safe_extract(bomb, tmp_path / "dest", max_total_bytes=50 * MiB)
    assert not (tmp_path / "dest").exists()


def test_nested_archive_is_refused(tmp_path: Path) -> None:
    inner = make_zip(tmp_path / "inner.zip", {"x": b"x"}).read_bytes()
    outer = make_zip(tmp_path / "outer.zip", {"readme.txt": b"hi", "data.dat": inner})
    with pytest.raises(EngineError, match="'data.dat' is itself an archive"):
        archives.safe_extract(outer, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_failed_extract_into_existing_dir_removes_only_its_files(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    archive = make_zip(tmp_path / "t.zip", {"a.txt": b"a", "../evil": b"x"})
    with pytest.raises(EngineError):
        archives.safe_extract(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt"]


def test_duplicate_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.zip"
    with pytest.warns(UserWarning), zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.txt", "one")
        zf.writestr("a.txt", "two")
    with pytest.raises(EngineError, match="'a.txt' appears twice"):
        archives.list_members(path)


@pytest.mark.parametrize("cut", [10, 200])
def test_truncated_archive_is_refused(tmp_path: Path, cut: int) -> None:
    whole = make_tar(tmp_path / "a.tgz", {"config.json": b"{}" * 1000, "b": bytes(range(256)) * 40})
    broken = tmp_path / "cut.tgz"
    broken.write_bytes(whole.read_bytes()[:cut])
    with pytest.raises(EngineError, match="corrupt or truncated"):
        archives.list_members(broken)


def test_not_an_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.txt"
    path.write_text("hello")
    with pytest.raises(EngineError, match="not a zip or tar archive"):
        archives.list_members(path)
