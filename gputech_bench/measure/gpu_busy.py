"""Is the GPU idle? Memory figures of a cell are only honest on a card nobody else uses.

Asked through NVML, so the runner learns it without creating a CUDA context.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

#: Device memory in use before the matrix starts that we still call idle (driver bookkeeping).
IDLE_USED_MIB = 1024


@dataclass(frozen=True)
class GpuUsage:
    index: int
    name: str
    used_mib: float
    processes: int

    @property
    def busy(self) -> bool:
        return self.processes > 0 or self.used_mib > IDLE_USED_MIB

    def describe(self) -> str:
        return f"GPU {self.index} ({self.name}): {self.used_mib:,.0f} MiB in use by {self.processes} process(es)"


def gpu_usage(nvml: Any | None = None) -> list[GpuUsage] | None:
    """Usage of every visible GPU, or None when NVML cannot tell (no driver, no library)."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception:
        return None
    usage = []
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            used = nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
            try:
                processes = len(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
            except Exception:
                processes = 0
            usage.append(GpuUsage(index, name.decode() if isinstance(name, bytes) else str(name), used, processes))
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    return usage


def visible_indices() -> set[int] | None:
    """NVML indices the cells will use, from CUDA_VISIBLE_DEVICES when it lists plain numbers."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not visible:
        return None
    indices = {int(part) for part in visible.split(",") if part.strip().isdigit()}
    return indices or None


def busy_gpus(nvml: Any | None = None) -> list[GpuUsage]:
    indices = visible_indices()
    return [gpu for gpu in gpu_usage(nvml) or [] if gpu.busy and (indices is None or gpu.index in indices)]
