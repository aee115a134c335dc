"""What a GPU needs beyond the tensors a trace counts: the CUDA context and the
caching allocator's reserve.

* CUDA context: driver state, kernels and cuBLAS handles outside the allocator. It is what
  NVML shows beyond the allocator's reserved bytes. The default, 742 MiB, is what an H200
  measured after the worker's warm-up (torch 2.11, CUDA 13, the seed's baseline and a bare
  loop alike: NVML 14,042 MiB against 13,300 reserved); a run's own CUDA cells calibrate it
  (``calibrate``). It grows with every library whose kernels load (cuDNN, bitsandbytes).
* Allocator reserve: what the caching allocator holds beyond the tensor peak (block
  rounding, cached free blocks, fragmentation). Replayed from the traced allocations
  wherever there are some (``reserved.py``), as a range where it depends on where a
  workspace lands. A flat fraction of the tensor peak stands in only where no allocation
  sequence was traced (a modelled figure, a stopped trace): 10 % by default, or the run's
  own median with ``--compare``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from typing import TYPE_CHECKING

from ..results import CellResult
from ..units import MIB

if TYPE_CHECKING:  # the replay's module brings torch (through the recorder): not for the front ends' start-up
    from .reserved import ReservedRange

DEFAULT_CONTEXT_BYTES = 742 * MIB
DEFAULT_CONTEXT_SOURCE = ("default: measured on an H200 after the worker's warm-up (torch 2.11, CUDA 13; "
                          "NVML minus reserved); calibrate with --compare RUN_DIR")
DEFAULT_RESERVE_FRACTION = 0.10


@dataclass(frozen=True)
class Overheads:
    context_bytes: int
    context_source: str
    reserve_fraction: float
    reserve_source: str
    #: Whether a replayed reserve counts where there is one; False judges tensors by the flat
    #: fraction alone (a search tested on tensor bytes, with no allocator in the way).
    replayed: bool = True

    def reserve_bytes(self, tensor_peak_bytes: int) -> int:
        """The flat reserve, for a figure without a replayed allocation sequence."""
        return int(tensor_peak_bytes * self.reserve_fraction)

    def reserved_range(self, tensor_peak_bytes: int, replayed: "ReservedRange | None") -> tuple[int, int]:
        """(low, high) bytes the caching allocator holds at its peak: replayed, else the flat reserve.
        Never below the tensor peak: what the tensors need, the allocator holds."""
        if replayed is None or not self.replayed:
            flat = tensor_peak_bytes + self.reserve_bytes(tensor_peak_bytes)
            return flat, flat
        return max(replayed.low_bytes, tensor_peak_bytes), max(replayed.high_bytes, tensor_peak_bytes)

    def device_range(self, tensor_peak_bytes: int, replayed: "ReservedRange | None") -> tuple[int, int]:
        """(low, high) of what nvidia-smi will show: reserved plus the context."""
        low, high = self.reserved_range(tensor_peak_bytes, replayed)
        return low + self.context_bytes, high + self.context_bytes

    def device_total(self, tensor_peak_bytes: int, replayed: "ReservedRange | None" = None) -> int:
        """The upper end of what nvidia-smi will show: what a budget is judged against."""
        return self.device_range(tensor_peak_bytes, replayed)[1]


DEFAULTS = Overheads(
    DEFAULT_CONTEXT_BYTES, DEFAULT_CONTEXT_SOURCE,
    DEFAULT_RESERVE_FRACTION, "default, for figures without a replayed allocation sequence",
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
