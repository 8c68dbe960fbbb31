"""A job's Device mapped to the torch device it runs on, refusing what this host cannot do. torch-free at import.

A cuda job on a host without a usable CUDA device fails with `unsupported`, saying what the host has: it
never quietly runs on the CPU (its numbers would be reported as GPU numbers, and it could take hours).
"""

from __future__ import annotations

from typing import Any

from worker.engine.errors import EngineError
from worker.engine.types import Device


def torch_device(device: Device | str, *, min_capability: tuple[int, int] | None = None, purpose: str = "") -> str:
    """"cpu" or "cuda" for torch; raises EngineError(code="unsupported") when CUDA is asked for and absent, or
    older than min_capability (major, minor), which `purpose` (e.g. "the int4 tinygemm kernel") needs."""
    if Device(device) == Device.cpu:
        return "cpu"
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build, no CUDA support"
        raise EngineError(f"this job asks for device 'cuda', but this worker has no usable CUDA device (torch "
                          f"{torch.__version__}, {build}, {torch.cuda.device_count()} device(s) visible); submit "
                          "it with device 'cpu', or to a worker that serves cuda", code="unsupported")
    if min_capability is not None:
        found = torch.cuda.get_device_capability(0)
        if tuple(found) < tuple(min_capability):
            need = ".".join(map(str, min_capability))
            raise EngineError(f"{purpose or 'this method'} needs an NVIDIA GPU of compute capability {need} or "
                              f"newer; this worker's {torch.cuda.get_device_name(0)} is {found[0]}.{found[1]}",
                              code="unsupported")
    return "cuda"


def describe(device: str) -> dict[str, Any]:
    """What report.json says about the device a job ran on: {"device": "cpu"} or the GPU's name and versions."""
    if device != "cuda":
        return {"device": device}
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"device": "cuda", "name": torch.cuda.get_device_name(0), "capability": f"{major}.{minor}",
            "cuda": torch.version.cuda, "torch": torch.__version__}
