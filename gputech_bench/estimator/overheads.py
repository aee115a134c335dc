"""What a GPU needs beyond the tensors a trace counts: the CUDA context and the
caching allocator's reserve. Both come from measured runs when there are any.

* CUDA context: driver state, kernels and cuBLAS handles that exist before the first
  tensor. It is what NVML shows beyond the allocator's reserve. The default, 512 MiB,
  is the size a CUDA 12 context with lazy module loading takes on a current data-centre
  GPU; it grows with every library whose kernels load (cuDNN, bitsandbytes).
* Allocator reserve: memory the caching allocator holds but no tensor uses (block
  rounding, fragmentation, cached free blocks). Default: 10 % of the tensor peak, a
  typical figure for a training step without memory pressure.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ..results import CellResult
from ..units import MIB

DEFAULT_CONTEXT_BYTES = 512 * MIB
DEFAULT_RESERVE_FRACTION = 0.10


@dataclass(frozen=True)
class Overheads:
    context_bytes: int
    context_source: str
    reserve_fraction: float
    reserve_source: str

    def reserve_bytes(self, tensor_peak_bytes: int) -> int:
        return int(tensor_peak_bytes * self.reserve_fraction)

    def device_total(self, tensor_peak_bytes: int) -> int:
        return tensor_peak_bytes + self.reserve_bytes(tensor_peak_bytes) + self.context_bytes


DEFAULTS = Overheads(
    DEFAULT_CONTEXT_BYTES, "default (no measured CUDA run given)",
    DEFAULT_RESERVE_FRACTION, "default (no measured CUDA run given)",
)


def calibrate(results: list[CellResult]) -> Overheads:
    """Medians over the finished CUDA cells of a run; the defaults where nothing was measured."""
    contexts, fractions = [], []
    for result in results:
        if not result.ok or result.device_type != "cuda":
            continue
        allocated, reserved = result.number("peak_allocated_mib"), result.number("peak_reserved_mib")
        process = result.number("nvml_process_peak_mib")
        if allocated and reserved:
            fractions.append((reserved - allocated) / allocated)
        if process and reserved and process > reserved:
            contexts.append(process - reserved)
    context, context_source = DEFAULTS.context_bytes, DEFAULTS.context_source
    if contexts:
        context = int(statistics.median(contexts) * MIB)
        context_source = f"median of NVML minus reserved over {len(contexts)} measured CUDA cell(s)"
    fraction, fraction_source = DEFAULTS.reserve_fraction, DEFAULTS.reserve_source
    if fractions:
        fraction = max(0.0, statistics.median(fractions))
        fraction_source = f"median of (reserved - allocated) / allocated over {len(fractions)} measured CUDA cell(s)"
    return Overheads(context, context_source, fraction, fraction_source)
