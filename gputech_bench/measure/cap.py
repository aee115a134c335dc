"""Emulate a smaller card: cap what this process may take from the GPU.

``torch.cuda.set_per_process_memory_fraction`` limits the caching allocator only.
The CUDA context (kernels, cuBLAS handles, driver bookkeeping) lives outside it,
yet it occupies a real card's memory too. So the cap given to the allocator is the
emulated card's size *minus the context this process measured*, and a cell under
``--gpu-memory-limit 24GiB`` sees what it would see on a 24 GiB card.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SizeError
from ..units import MIB, format_gib


@dataclass(frozen=True)
class MemoryCap:
    limit_bytes: int  # the emulated card
    context_bytes: int  # measured outside the allocator, counted against the limit
    device_total_bytes: int  # the real card

    @property
    def allocator_bytes(self) -> int:
        return self.limit_bytes - self.context_bytes

    @property
    def fraction(self) -> float:
        return self.allocator_bytes / self.device_total_bytes

    def describe(self) -> dict[str, float | str]:
        return {
            "limit_mib": round(self.limit_bytes / MIB, 1),
            "context_mib": round(self.context_bytes / MIB, 1),
            "allocator_cap_mib": round(self.allocator_bytes / MIB, 1),
            "fraction_of_device": round(self.fraction, 6),
            "method": "torch.cuda.set_per_process_memory_fraction((limit - measured CUDA context) / device total)",
        }


def plan_cap(limit_bytes: int, context_bytes: int, device_total_bytes: int) -> MemoryCap:
    if limit_bytes > device_total_bytes:
        raise SizeError(
            f"--gpu-memory-limit {format_gib(limit_bytes)} is more than this GPU has ({format_gib(device_total_bytes)}): "
            "pass a smaller limit, or leave it out"
        )
    if limit_bytes <= context_bytes:
        raise SizeError(
            f"--gpu-memory-limit {format_gib(limit_bytes)} leaves nothing after the CUDA context "
            f"({format_gib(context_bytes)}): pass a larger limit"
        )
    return MemoryCap(limit_bytes, context_bytes, device_total_bytes)


def overshoot_note(cap: dict[str, float | str], nvml_peak_mib: float | None) -> str | None:
    """What to say when the process's NVML peak went past the emulated card (``cap`` as
    ``MemoryCap.describe`` wrote it): the context grew after it was measured, so the
    emulated card was in truth larger than the limit by that much."""
    if nvml_peak_mib is None:
        return None
    limit = float(cap["limit_mib"])
    if nvml_peak_mib <= limit:
        return None
    return (
        f"NVML's process peak ({nvml_peak_mib:,.0f} MiB) went {nvml_peak_mib - limit:,.0f} MiB past the "
        f"--gpu-memory-limit of {limit:,.0f} MiB: memory outside the allocator grew after the context was measured, "
        "so a real card of that size may not have fitted this cell"
    )
