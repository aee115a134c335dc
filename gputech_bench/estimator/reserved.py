"""What nvidia-smi will show: the traced allocation sequence replayed through the allocator model.

The tensor peak is what the step's tensors need; the caching allocator holds more, in
segments sized by the requests that created them (``allocator.py``). Replaying the trace's
allocations and frees (``allocations.py``) gives the reserved peak, and with the CUDA
context, the NVML figure.

One replay is not the whole answer. Where a request lands depends on what is free at that
moment. The trace follows every tensor in order, but the cuBLAS workspaces are not tensors:
the recorder adds them where a real run makes them (``allocations.WorkspaceRule``), and
that is a model. A workspace stays for the run, so where it lands decides whether it pins
a free logits-sized block, after which the next logits-sized request needs a segment of its
own: one whole segment more or less on nvidia-smi, with the same tensors. So the replay is
repeated with each modelled allocation placed otherwise (``Variant``): in the largest free
block, and in a segment of its own. The range spans every outcome, and when its ends differ
it says by which segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..units import MIB
from .allocations import ALLOC, AllocationSequence
from .allocator import AllocatorSettings, Block, CachingAllocatorModel


@dataclass(frozen=True)
class ReservedRange:
    """The predicted reserved peak: as traced, and the range the placement variants span."""

    traced_bytes: int
    low_bytes: int
    high_bytes: int
    #: Peak bytes the replay had allocated (tensors, rounded to blocks, plus the workspaces).
    allocated_bytes: int
    #: Segment sizes at the traced replay's end, [size_bytes, count], largest first.
    segments: list[list[int]]
    settings: str
    workspaces: str
    #: Why low and high differ ("one 2,342 MiB segment more if a cuBLAS workspace lands in a free
    #: block of that size and pins it ..."); None when they agree.
    why: str | None = None
    variants: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "traced_bytes": self.traced_bytes, "low_bytes": self.low_bytes, "high_bytes": self.high_bytes,
            "allocated_bytes": self.allocated_bytes, "segments": self.segments, "settings": self.settings,
            "workspaces": self.workspaces, "why": self.why, "variants": self.variants,
        }

    def carried_over(self, traced_tensor_bytes: int, modelled_tensor_bytes: int, proxy: str) -> "ReservedRange":
        """This range, replayed on a proxy's trace, carried over to a figure modelled around it:
        the allocator's bytes beyond the proxy's tensor peak are kept on top of the modelled one
        (what a modeller changes is state, whose segments the reserve is seldom about)."""
        shift = modelled_tensor_bytes - traced_tensor_bytes
        why = None if self.why is None else f"{self.why}; replayed on the proxy '{proxy}'"
        return ReservedRange(self.traced_bytes + shift, self.low_bytes + shift, self.high_bytes + shift,
                             self.allocated_bytes + shift, self.segments, self.settings,
                             f"{self.workspaces}; the reserve beyond the tensors replayed on the proxy '{proxy}'",
                             why, self.variants)

    def reconciled(self, tensor_bytes: int, workspace_bytes: int) -> "ReservedRange":
        """This range without what the replay held beyond the traced tensor peak (which counts
        DDP's buckets), the workspaces and 1% for rounding: storages the trace kept alive that
        MemTracker does not count as the step's (seen in one sharded combination,
        fsdp+lora+bf16-weights, whose frozen layers' cast weights outlive their sharding in the
        trace). The estimate stands on the tracker's tensors; the replay's extra bytes would
        otherwise come on top of them, once per layer."""
        extra = self.allocated_bytes - tensor_bytes - workspace_bytes - tensor_bytes // 100
        if extra <= 0:
            return self
        why = (f"the replay held {extra / MIB:,.0f} MiB beyond the traced tensors (storages the trace kept alive "
               "that the tracker does not count), taken off")
        return ReservedRange(self.traced_bytes - extra, self.low_bytes - extra, self.high_bytes - extra,
                             self.allocated_bytes - extra, self.segments, self.settings, self.workspaces,
                             why if self.why is None else f"{why}; {self.why}", self.variants)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReservedRange":
        return cls(int(data["traced_bytes"]), int(data["low_bytes"]), int(data["high_bytes"]),
                   int(data["allocated_bytes"]), [list(pair) for pair in data.get("segments", [])],
                   str(data.get("settings", "")), str(data.get("workspaces", "")), data.get("why"),
                   int(data.get("variants", 0)))


@dataclass(frozen=True)
class Variant:
    """Placements changed in one replay: malloc calls (1-based, as the model counts them)
    that take the largest free block, and calls that take a segment of their own."""

    largest: frozenset[int] = frozenset()
    own_segment: frozenset[int] = frozenset()


class _ReplayModel(CachingAllocatorModel):
    """The allocator model with one variant's placements."""

    def __init__(self, settings: AllocatorSettings, variant: Variant) -> None:
        super().__init__(settings)
        self.variant = variant

    def _largest_free(self, stream: int, pool: str) -> Block | None:
        keys = self._free[pool].keys
        candidates = [key for key in keys if key[0] == stream]
        return self._free[pool].by_address[candidates[-1][2]] if candidates else None

    def _get_free_block(self, rounded: int, stream: int, pool: str) -> Block | None:
        call = self._malloc_calls
        if call in self.variant.own_segment:
            return None
        if call in self.variant.largest:
            largest = self._largest_free(stream, pool)
            if largest is not None and largest.size >= rounded:
                self._free[pool].remove(largest)
                return largest
        return super()._get_free_block(rounded, stream, pool)


@dataclass
class _Outcome:
    peak_reserved: int
    peak_allocated: int
    segments: list[int] = field(default_factory=list)


def _replay(sequence: AllocationSequence, settings: AllocatorSettings, variant: Variant) -> _Outcome:
    model = _ReplayModel(settings, variant)
    handles: dict[int, int] = {}
    for kind, handle, size, stream in sequence.events:
        if kind == ALLOC:
            handles[handle] = model.malloc(size, stream)
        elif handle in handles:
            model.free(handles.pop(handle))
    return _Outcome(model.peak_reserved_bytes, model.peak_allocated_bytes,
                    [segment.size for segment in model.segments()])


def _modelled_calls(sequence: AllocationSequence) -> list[int]:
    """Malloc calls (1-based, as the model counts them) of the allocations placed by a guess (the workspaces)."""
    calls, found = 0, []
    for kind, handle, _, _ in sequence.events:
        if kind == ALLOC:
            calls += 1
            if handle in sequence.placed_by_guess:
                found.append(calls)
    return found


def _segments(sizes: list[int]) -> list[list[int]]:
    counts: dict[int, int] = {}
    for size in sizes:
        counts[size] = counts.get(size, 0) + 1
    return [[size, count] for size, count in sorted(counts.items(), reverse=True)]


def _difference(more: list[int], fewer: list[int]) -> list[int]:
    """Segment sizes in ``more`` that ``fewer`` lacks."""
    rest = list(fewer)
    extra = []
    for size in sorted(more, reverse=True):
        if size in rest:
            rest.remove(size)
        else:
            extra.append(size)
    return extra


def _segment_words(sizes: list[int]) -> str:
    return ", ".join(f"one {size / MIB:,.0f} MiB segment" if count == 1 else f"{count} x {size / MIB:,.0f} MiB segments"
                     for size, count in _segments(sizes))


PYTORCH_DEFAULT = AllocatorSettings()


def predict_reserved(sequence: AllocationSequence, settings: AllocatorSettings = PYTORCH_DEFAULT) -> ReservedRange:
    """The reserved peak of ``sequence`` under ``settings``, with the range its modelled
    allocations' placements span."""
    traced = _replay(sequence, settings, Variant())
    variants = []
    for call in _modelled_calls(sequence):
        variants += [Variant(largest=frozenset({call})), Variant(own_segment=frozenset({call}))]
    # A workspace in a segment of its own adds that segment and nothing else: not the cache
    # effect a range is about, so only outcomes further off than one workspace count.
    outcomes = [outcome for outcome in (_replay(sequence, settings, variant) for variant in variants)
                if abs(outcome.peak_reserved - traced.peak_reserved) > sequence.workspaces.bytes_each]
    low = min([traced, *outcomes], key=lambda outcome: outcome.peak_reserved)
    high = max([traced, *outcomes], key=lambda outcome: outcome.peak_reserved)
    reasons = []
    if high.peak_reserved > traced.peak_reserved:
        extra = _difference(high.segments, traced.segments)
        reasons.append(f"{_segment_words(extra) if extra else 'more segments'} more if a cuBLAS workspace lands in a "
                       "free block of that size and pins it")
    if low.peak_reserved < traced.peak_reserved:
        spared = _difference(traced.segments, low.segments)
        reasons.append(f"{_segment_words(spared) if spared else 'fewer segments'} fewer if the cuBLAS workspace that "
                       "pins one finds room elsewhere")
    why = None
    if reasons:
        why = "; ".join(reasons) + " (where a workspace lands is modelled, not traced)"
    return ReservedRange(
        traced.peak_reserved, low.peak_reserved, high.peak_reserved, traced.peak_allocated,
        _segments(traced.segments), settings.describe(), sequence.workspaces.describe(), why, len(variants),
    )
