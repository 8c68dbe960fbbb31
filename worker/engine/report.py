"""What report.json says about the machine and libraries that produced an artifact."""

from __future__ import annotations

import functools
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

_LIBRARIES = ("numpy", "onnx", "onnxruntime", "torch", "torchao", "safetensors")


def runtime_versions() -> dict[str, str]:
    """Installed versions of the runtimes the engine uses, read from package metadata (no imports)."""
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@functools.cache
def host_info() -> dict[str, Any]:
    """The worker CPU: model name and the ISA flags that decide which int8 kernels are fast or exact.

    VNNI matters beyond speed: without it, int8 convolutions go through vpmaddubsw, which can
    saturate (ENGINE.md), so methods read `vnni` to choose reduce_range.
    """
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = value.strip()
            elif key == "flags":
                flags = set(value.split())
            if flags and key == "" and model:
                break  # the first processor block is enough: all cores are alike
    known = bool(flags)
    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "machine": platform.machine(),
        "avx2": "avx2" in flags if known else None,
        "avx512": "avx512f" in flags if known else None,
        "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}) if known else None,
        "amx": bool(flags & {"amx_int8", "amx_tile"}) if known else None,
    }
