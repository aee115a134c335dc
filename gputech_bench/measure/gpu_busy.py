"""Is the GPU idle? Memory figures of a cell are only honest on a card nobody else uses.

Asked through NVML, so the runner learns it without creating a CUDA context. A GPU is
busy when another compute process runs on it, or when its used memory, net of what the
driver reserves for itself, is more than an idle card shows. Only the GPUs the run
will use are checked (see gpu_selection).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..units import MIB
from .gpu_selection import run_devices

#: Used memory net of the driver's reserve that we still call idle. Net of the reserve an
#: idle card shows next to nothing, while a process's CUDA context alone takes hundreds of
#: MiB (seen on an idle H200, driver 580: 0 MiB used, 615 MiB reserved; torch 2.11's
#: context then took 612 MiB). So 256 MiB still catches a process NVML does not list (one
#: in another container's PID namespace), without refusing a card for the driver's bookkeeping.
IDLE_USED_MIB = 256

#: The limit when NVML cannot tell the reserve apart (v1 memory info only): there "used"
#: includes the reserve, which grows with the card (several hundred MiB to over 1 GiB on
#: 80-141 GB cards). So the old fixed 1 GiB, or 1% of the card when that is more.
IDLE_USED_MIB_WITHOUT_RESERVE = 1024
IDLE_USED_SHARE_WITHOUT_RESERVE = 0.01


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_mib: float | None  # None: NVML does not say (e.g. Windows' WDDM driver)

    def describe(self) -> str:
        return f"PID {self.pid} ({'? MiB' if self.used_mib is None else f'{self.used_mib:,.0f} MiB'})"


@dataclass(frozen=True)
class GpuUsage:
    index: int
    name: str
    used_mib: float  # net of the driver's reserve when reserved_mib is known
    reserved_mib: float | None  # None: this NVML has no v2 memory info, so the reserve is in used_mib
    total_mib: float
    processes: tuple[GpuProcess, ...] = ()  # other compute processes, never this one
    own_mib: float = 0.0  # this process's own usage, already taken out of used_mib

    @property
    def idle_limit_mib(self) -> float:
        if self.reserved_mib is not None:
            return IDLE_USED_MIB
        return max(IDLE_USED_MIB_WITHOUT_RESERVE, IDLE_USED_SHARE_WITHOUT_RESERVE * self.total_mib)

    @property
    def busy(self) -> bool:
        return bool(self.processes) or self.used_mib > self.idle_limit_mib

    def describe(self) -> str:
        """One clause, e.g. 'GPU 1 (NVIDIA H100): PID 4242 (20,000 MiB) running, 20,010 MiB used net of a 612 MiB driver reserve'."""
        who = ", ".join(process.describe() for process in self.processes) + " running" if self.processes else "no other process listed"
        if self.reserved_mib is None:
            memory = f"{self.used_mib:,.0f} MiB used (the driver's reserve could not be subtracted: NVML has no v2 memory info here)"
        else:
            memory = f"{self.used_mib:,.0f} MiB used net of a {self.reserved_mib:,.0f} MiB driver reserve"
        if self.own_mib:
            memory += f" and this process's {self.own_mib:,.0f} MiB"
        return f"GPU {self.index} ({self.name}): {who}, {memory}"


@dataclass(frozen=True)
class IdleCheck:
    busy: list[GpuUsage] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # run GPUs NVML does not list (a MIG instance, a missing index)
    error: str | None = None  # NVML answered at first, then failed: nothing could be judged


def _memory(nvml: Any, handle: Any) -> tuple[float, float | None, float]:
    """(used net of the reserve, reserve, total) in MiB; the reserve is None with v1 only."""
    try:
        # v2 splits out the driver's reserve. Older bindings lack the version argument or
        # nvmlMemory_v2, older drivers the _v2 function: any of these falls back to v1.
        info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
        reserved = info.reserved
    except Exception:
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return info.used / MIB, None, info.total / MIB
    # Computed from total and free, because NVML's documentation has said both that v2's
    # "used" includes the reserve and that it does not (driver 580 leaves it out): total -
    # free - reserved is the memory processes hold under either reading.
    net = max(0, info.total - info.free - reserved)
    return net / MIB, reserved / MIB, info.total / MIB


def _processes(nvml: Any, handle: Any, own_pid: int) -> tuple[tuple[GpuProcess, ...], float]:
    """The other compute processes on the GPU, and the MiB this process holds there.

    Our own PID is left out: the runner makes no CUDA context, but a caller that did must
    not find its own GPU busy."""
    try:
        running = [
            GpuProcess(int(process.pid), None if process.usedGpuMemory is None else process.usedGpuMemory / MIB)
            for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        ]
    except Exception:
        return (), 0.0  # not supported here: the memory figure still catches other processes
    others = tuple(process for process in running if process.pid != own_pid)
    own = sum(process.used_mib or 0.0 for process in running if process.pid == own_pid)
    return others, own


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_indices(nvml: Any, count: int, devices: list[str] | None) -> tuple[list[int], list[str]]:
    """NVML indices of the run's GPUs, and the entries NVML does not list.

    A number is taken as NVML's index, which is CUDA's on machines of one GPU model (CUDA
    orders by speed, then PCI bus, NVML by PCI bus). A GPU UUID is matched against NVML's,
    as a prefix, the way CUDA reads it."""
    if devices is None:
        return list(range(count)), []
    uuids: list[str] | None = None
    indices: list[int] = []
    unchecked: list[str] = []
    for entry in devices:
        index = None
        if entry.isdigit():
            index = int(entry) if int(entry) < count else None
        elif entry.upper().startswith("GPU-"):
            if uuids is None:
                uuids = [_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))).lower() for i in range(count)]
            index = next((i for i, uuid in enumerate(uuids) if uuid.startswith(entry.lower())), None)
        if index is None:
            unchecked.append(entry)
        elif index not in indices:
            indices.append(index)
    return indices, unchecked


def idle_check(gpus: str | None = None, nvml: Any | None = None, environ: Mapping[str, str] | None = None) -> IdleCheck:
    """Which of the run's GPUs are busy: the ``--gpus`` list, else CUDA_VISIBLE_DEVICES's, else all.

    Nothing is reported when NVML cannot tell (no driver, no library)."""
    devices = run_devices(gpus, os.environ if environ is None else environ)
    try:
        if nvml is None:
            import pynvml

            nvml = pynvml
        nvml.nvmlInit()
    except Exception:
        return IdleCheck()
    try:
        indices, unchecked = _nvml_indices(nvml, nvml.nvmlDeviceGetCount(), devices)
        usage = []
        for index in indices:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            used, reserved, total = _memory(nvml, handle)
            others, own = _processes(nvml, handle, os.getpid())
            name = _text(nvml.nvmlDeviceGetName(handle))
            usage.append(GpuUsage(index, name, max(0.0, used - own), reserved, total, others, own))
    except Exception as error:
        return IdleCheck(error=f"{type(error).__name__}: {error}")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    return IdleCheck([gpu for gpu in usage if gpu.busy], unchecked)
