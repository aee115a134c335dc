"""CUDA memory: torch's allocator peaks, the device itself, and NVML's view of the process."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ..units import MIB


def device_info(device: torch.device) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "total_memory_mib": round(props.total_memory / MIB, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda_runtime": torch.version.cuda,
    }


def reset_peaks(device: torch.device) -> None:
    torch.cuda.reset_peak_memory_stats(device)


def allocator_peaks(device: torch.device) -> tuple[int, int]:
    """(peak allocated, peak reserved) bytes since the last reset."""
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


def reserved_segments(device: torch.device) -> tuple[list[dict[str, Any]], int]:
    """The caching allocator's segments on ``device`` now (``torch.cuda.memory_snapshot()``),
    and the bytes it reserves now (``torch.cuda.memory_reserved``)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    segments = [segment for segment in torch.cuda.memory_snapshot() if segment.get("device", index) == index]
    return segments, torch.cuda.memory_reserved(device)


def context_bytes(device: torch.device) -> tuple[int, str]:
    """GPU memory this process holds outside the caching allocator (the CUDA context), and how it was measured."""
    reserved = torch.cuda.memory_reserved(device)
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == os.getpid() and process.usedGpuMemory:
                return max(0, int(process.usedGpuMemory) - reserved), "NVML process usage minus the allocator's reserve"
    except Exception:
        pass
    free, total = torch.cuda.mem_get_info(device)
    # Device-wide: assumes an idle GPU, which the runner checks before a CUDA matrix.
    return max(0, total - free - reserved), "device used (cudaMemGetInfo) minus the allocator's reserve"


@dataclass(frozen=True)
class NvmlReading:
    peak_bytes: int | None
    method: str


class NvmlSampler:
    """Polls NVML in a background thread and keeps the highest reading.

    Prefers the per-process figure (what nvidia-smi lists for this PID, the seed's
    number). Inside containers the PID namespace often hides it; then it falls back
    to device-wide usage minus the usage seen before the cell started, and says so.
    Create it before the cell allocates anything on the GPU, so that this baseline
    leaves the cell's own context, weights and reserve in the figure.
    """

    def __init__(self, device: torch.device | None, interval_s: float = 0.02, nvml: Any = None, handle: Any = None) -> None:
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._peak: int | None = None
        # restart() from the training thread must not race a sample taken before it.
        self._lock = threading.Lock()
        self._method = "unavailable"
        self._thread: threading.Thread | None = None
        try:
            if nvml is None:
                import pynvml

                nvml = pynvml
            nvml.nvmlInit()
            self._nvml = nvml
            if handle is None:
                # Reads properties only: allocates nothing, so the baseline below is clean.
                uuid = str(torch.cuda.get_device_properties(device).uuid)
                handle = nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            self._handle = handle
            self._baseline_used = nvml.nvmlDeviceGetMemoryInfo(self._handle).used
        except Exception as error:  # no NVML library, no driver access, unknown UUID
            self._nvml = None
            self._method = f"unavailable ({type(error).__name__}: {str(error).strip()[:80]})"

    def _process_bytes(self) -> int | None:
        pid = os.getpid()
        for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                for process in getattr(self._nvml, query)(self._handle):
                    if process.pid == pid and process.usedGpuMemory is not None:
                        return int(process.usedGpuMemory)
            except Exception:
                continue
        return None

    def _sample(self) -> None:
        with self._lock:
            self._sample_locked()

    def _sample_locked(self) -> None:
        own = self._process_bytes()
        if own is not None:
            value, method = own, "NVML per-process usedGpuMemory (nvidia-smi's figure), sampled every 20 ms"
        else:
            used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            value = max(0, used - self._baseline_used)
            method = "NVML device-wide used minus usage before the cell (PID hidden from NVML), sampled every 20 ms"
        if self._peak is None or value > self._peak:
            self._peak, self._method = value, method

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception:
                pass
            self._stop.wait(self._interval_s)

    def start(self) -> "NvmlSampler":
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def restart(self) -> None:
        """Forget the peak so far: the next readings start a new window (a compiled cell's
        steps after its eager, memory-tracked one)."""
        with self._lock:
            self._peak = None
            if self._nvml is not None:
                try:
                    self._sample_locked()
                except Exception:
                    pass

    def stop(self) -> NvmlReading:
        """Stop sampling (once; later calls just return the reading)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2)
            self._thread = None
            try:
                self._sample()
            except Exception:
                pass
        return NvmlReading(self._peak, self._method)
