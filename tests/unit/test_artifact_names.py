"""Artifact file names come from model names: any name a user may give must make a file the engine can write."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.jobs import artifact_stem


@pytest.mark.parametrize("name", ["модель-量化-🙂", "量" * 200, "a/../../etc/passwd", "..", "", "x" * 10_000])
def test_any_model_name_gives_a_short_writable_stem(name: str, tmp_path: Path) -> None:
    stem = artifact_stem(name)
    assert stem and len(stem.encode()) <= 100 and "/" not in stem and not stem.startswith(".")
    (tmp_path / f"{stem}.int8.onnx").write_bytes(b"ok")  # 255 bytes is the file-name limit


def test_unicode_names_keep_their_letters() -> None:
    assert artifact_stem("модель-量化.onnx") == "модель-量化"
