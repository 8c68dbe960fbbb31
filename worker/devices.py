"""What this worker really has and serves: CPU model and ISA flags, CUDA (probed in a child), queues, methods.

CUDA is probed by importing torch in a child process, the way the engine itself will see the GPU (same
interpreter, same CUDA_VISIBLE_DEVICES): the worker process stays free of torch and of a CUDA context.
`python -m worker.devices` prints that probe as JSON.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from worker.engine.registry import SPECS
from worker.engine.report import host_info
from worker.task_names import QUEUE_FOR_DEVICE

log = logging.getLogger("quantserve.worker")

# The CPU flags that decide which int8 kernels run and how fast (ENGINE.md): published, not the whole list.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")  # the last two: Arm
DEVICE_FOR_QUEUE = {queue: device for device, queue in QUEUE_FOR_DEVICE.items()}
PROBE_TIMEOUT_S = 120.0  # importing torch and initialising CUDA on a big GPU host takes tens of seconds


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The ISA flags of the first processor (all cores are alike) among ISA_FLAGS, sorted; [] where unreadable."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / Arm
            present = set(value.split())
            return sorted(f for f in ISA_FLAGS if f in present)
    return []


def cpu_device() -> dict[str, Any]:
    info = host_info()
    return {"name": info["model"], "flags": cpu_flags(), "logical_cores": info["logical_cores"],
            "machine": info["machine"]}


def cuda_here() -> dict[str, Any]:
    """Run in the probe child: what torch.cuda sees. {"available": False, "why": ...} when nothing."""
    try:
        import torch
    except ImportError as exc:
        return {"available": False, "why": f"torch is not installed ({exc})"}
    if not torch.cuda.is_available():
        build = torch.version.cuda
        return {"available": False, "why": f"torch {torch.__version__} sees no CUDA device"
                + ("" if build else " (a CPU-only build)")}
    props = torch.cuda.get_device_properties(0)
    return {"available": True, "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
            "memory_mb": props.total_memory // 2**20, "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda, "torch": torch.__version__}


def probe_cuda(timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """cuda_here() in a child with the engine's environment; a failed probe means no CUDA, with why."""
    from worker.sandbox import child_env

    with tempfile.TemporaryDirectory(prefix="quantserve-probe-") as scratch:
        try:
            out = subprocess.run([sys.executable, "-m", "worker.devices"], env=child_env(Path(scratch)),
                                 cwd=scratch, capture_output=True, text=True, timeout=timeout_s)
            return json.loads(out.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            return {"available": False, "why": f"the CUDA probe failed: {exc.__class__.__name__}: {exc}"}


@functools.cache
def detect(probe_gpu: bool) -> dict[str, dict[str, Any]]:
    """The devices this host has, device -> description. CUDA is probed only when asked: only a worker
    that would consume the gpu queue needs to know, and the probe imports torch (seconds)."""
    devices: dict[str, dict[str, Any]] = {"cpu": cpu_device()}
    if probe_gpu:
        cuda = probe_cuda()
        if cuda.pop("available", False):
            devices["cuda"] = cuda
        else:
            log.warning("no CUDA here: %s", cuda.get("why", "unknown"))
    return devices


def usable_queues(requested: list[str]) -> tuple[list[str], dict[str, str]]:
    """The requested queues this host can serve, and why each other one is dropped. A gpu queue needs CUDA."""
    devices = detect("gpu" in requested)
    usable, dropped = [], {}
    for queue in requested:
        device = DEVICE_FOR_QUEUE.get(queue)
        if device is not None and device not in devices:
            dropped[queue] = f"not consuming the {queue!r} queue: this host has no {device} device"
        else:
            usable.append(queue)
    return usable, dropped


def served(queues: list[str], devices: dict[str, Any]) -> list[str]:
    return sorted(d for d in devices if QUEUE_FOR_DEVICE.get(d) in queues)


def capabilities(devices: list[str]) -> dict[str, list[str]]:
    """Per served device, the format/method pairs this worker's registry runs there."""
    return {d: sorted(f"{s.format.value}/{s.method.value}" for s in SPECS.values() if d in {x.value for x in s.devices})
            for d in devices}


if __name__ == "__main__":
    print(json.dumps(cuda_here()))
