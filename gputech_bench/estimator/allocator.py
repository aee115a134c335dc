"""A model of PyTorch's CUDA caching allocator in pure Python: allocations and frees in,
``torch.cuda.max_memory_reserved`` out, without a GPU.

The estimator traces a training step on fake tensors and gets the exact sequence of device
allocations and frees (size in bytes, stream). Replayed through ``CachingAllocatorModel``,
that sequence gives the bytes the allocator holds in segments (what nvidia-smi shows, less
the CUDA context), including the fragmentation a sum of live tensors cannot see.

What it follows: the native allocator of ``c10/cuda/CUDACachingAllocator.cpp`` and the
options of ``CUDAAllocatorConfig`` as of torch 2.x, read from the source
(``DeviceCachingAllocator::malloc``, ``round_size``, ``get_pool``, ``get_allocation_size``,
``get_free_block``, ``should_split``, ``alloc_found_block``, ``free_block``,
``try_merge_blocks``, ``release_cached_blocks``, and for ``expandable_segments:True``
``find_expandable_block``, ``map_block``, ``try_allocate_expandable_block`` and
``unmap_block``), each rule cited where it is applied below.

What it does not follow: the ``backend:cudaMallocAsync`` allocator (the driver's pool, a
different algorithm altogether); ``roundup_power2_divisions`` (not PyTorch's default);
``garbage_collection_threshold`` (only acts under a memory fraction); a
``max_non_split_rounding_mb`` other than its default of 20 MiB; CUDA graph private pools;
IPC sharing; ``record_stream``'s deferred frees (a block freed here is reusable at once, as
it is when no other stream used it); and, on an out-of-memory retry, the freeing of single
oversize blocks (``release_available_cached_blocks``) before every cached segment is freed.
Segment addresses are a counter, so that among equal-size free blocks the older segment
wins the tie; the driver's real addresses may order them otherwise.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from ..units import MIB

__all__ = [
    "AllocatorSettings",
    "CachingAllocatorModel",
    "ModelOutOfMemory",
    "SegmentGrowth",
    "SegmentState",
]


# The constants at the top of CUDACachingAllocator.cpp, quoted with their comments.
K_MIN_BLOCK_SIZE = 512  # "all sizes are rounded to at least 512 bytes"
K_SMALL_SIZE = 1 * MIB  # "largest "small" allocation is 1 MiB"
K_SMALL_BUFFER = 2 * MIB  # ""small" allocations are packed in 2 MiB blocks"
K_LARGE_BUFFER = 20 * MIB  # ""large" allocations may be packed in 20 MiB blocks"
K_MIN_LARGE_ALLOC = 10 * MIB  # "allocations between 1 and 10 MiB may use kLargeBuffer"
K_ROUND_LARGE = 2 * MIB  # "round up large allocations to 2 MiB"
# AllocatorConfig's default max_non_split_rounding_size_ is kLargeBuffer; older 2.x releases
# hard-code kLargeBuffer in get_free_block's oversize check. Either way: 20 MiB.
MAX_NON_SPLIT_ROUNDING = K_LARGE_BUFFER
# An expandable segment reserves virtual address space for 1 1/8 of the GPU's memory
# (ExpandableSegment's constructor). The model needs only "more than any request", so one
# TiB of address space stands in for it; nothing of it counts as reserved until mapped.
EXPANDABLE_ADDRESS_SPACE = 1024 * 1024 * MIB

SMALL = "small"
LARGE = "large"


class ModelOutOfMemory(RuntimeError):
    """The modelled allocator needed more than ``capacity_bytes`` even after freeing every
    cached segment, as ``torch.OutOfMemoryError`` would be raised."""


# --------------------------------------------------------------------------- settings


# The options PYTORCH_CUDA_ALLOC_CONF knows (AllocatorConfig::parseArgs) that the model does
# not follow, with why.
_OPTIONS_NOT_FOLLOWED = {
    "garbage_collection_threshold": "it frees cached blocks by age under a memory fraction",
    "roundup_power2_divisions": "it rounds request sizes to power-of-2 divisions",
    "max_non_split_rounding_mb": "the model keeps its default of 20 MiB",
    "pinned_use_cuda_host_register": "it concerns pinned host memory",
    "pinned_use_hip_host_register": "it concerns pinned host memory",
    "pinned_num_register_threads": "it concerns pinned host memory",
    "pinned_use_background_threads": "it concerns pinned host memory",
    "pinned_reserve_segment_size_mb": "it concerns pinned host memory",
    "graph_capture_record_stream_reuse": "it concerns CUDA graph capture",
}
# Options that change nothing the model counts: release_lock_on_cudamalloc only drops the
# allocator's lock around cudaMalloc.
_OPTIONS_WITHOUT_EFFECT = ("release_lock_on_cudamalloc", "release_lock_on_hipmalloc")


def _tokens(text: str) -> list[str]:
    """AllocatorConfig::lexArgs: ',', ':', '[' and ']' are tokens of their own; spaces are dropped."""
    return [token for token in re.split(r"([,:\[\]])", text.replace(" ", "")) if token]


@dataclass(frozen=True)
class AllocatorSettings:
    """The PYTORCH_CUDA_ALLOC_CONF options the model follows."""

    expandable_segments: bool = False
    max_split_size_bytes: int | None = None  # None = unlimited (PyTorch's default)

    def __post_init__(self) -> None:
        if self.max_split_size_bytes is not None and self.max_split_size_bytes < K_LARGE_BUFFER:
            # parseMaxSplitSize: "max_split_size_mb too small, must be >= 20" (kLargeBuffer / kMB).
            raise ValueError(
                f"max_split_size_bytes must be at least {K_LARGE_BUFFER} (20 MiB), as PyTorch requires;"
                f" got {self.max_split_size_bytes}"
            )

    @classmethod
    def from_conf(cls, text: str | None) -> AllocatorSettings:
        """Parse PYTORCH_CUDA_ALLOC_CONF, e.g. ``"expandable_segments:True,max_split_size_mb:128"``.

        None or "" gives PyTorch's defaults. An option PyTorch knows but the model does not
        follow raises ValueError naming it; so does a malformed text. A later value of the
        same option wins, as in PyTorch's parser.
        """
        if not text or not text.strip():
            return cls()
        tokens = _tokens(text)
        expandable = False
        max_split: int | None = None
        index = 0
        while index < len(tokens):
            key = tokens[index]
            if key in (",", ":", "[", "]"):
                raise ValueError(f"PYTORCH_CUDA_ALLOC_CONF={text!r}: expected an option name, found {key!r}")
            if index + 2 >= len(tokens) or tokens[index + 1] != ":" or tokens[index + 2] in (",", ":", "[", "]"):
                raise ValueError(f"PYTORCH_CUDA_ALLOC_CONF={text!r}: option {key!r} needs a value, as in {key}:<value>")
            value = tokens[index + 2]
            index += 3
            if index < len(tokens):
                if tokens[index] != ",":
                    raise ValueError(
                        f"PYTORCH_CUDA_ALLOC_CONF={text!r}: expected ',' after {key}:{value}, found {tokens[index]!r}"
                    )
                index += 1
                if index == len(tokens):
                    raise ValueError(f"PYTORCH_CUDA_ALLOC_CONF={text!r}: nothing after the last ','")
            if key == "expandable_segments":
                # parseArgs: "Expected a single True/False argument for expandable_segments".
                if value not in ("True", "False"):
                    raise ValueError(f"PYTORCH_CUDA_ALLOC_CONF={text!r}: expandable_segments takes True or False, got {value!r}")
                expandable = value == "True"
            elif key == "max_split_size_mb":
                if not value.isdigit():
                    raise ValueError(
                        f"PYTORCH_CUDA_ALLOC_CONF={text!r}: max_split_size_mb takes a whole number of MiB, got {value!r}"
                    )
                megabytes = int(value)
                if megabytes * MIB < K_LARGE_BUFFER:
                    raise ValueError(f"PYTORCH_CUDA_ALLOC_CONF={text!r}: max_split_size_mb too small, PyTorch requires >= 20")
                max_split = megabytes * MIB
            elif key == "backend":
                if value == "cudaMallocAsync":
                    raise ValueError(
                        "PYTORCH_CUDA_ALLOC_CONF: backend:cudaMallocAsync is the driver's own allocator;"
                        " the model does not follow it (it models the native caching allocator)"
                    )
                if value != "native":
                    raise ValueError(
                        f"PYTORCH_CUDA_ALLOC_CONF={text!r}: unknown allocator backend {value!r}"
                        " (PyTorch knows native and cudaMallocAsync)"
                    )
            elif key in _OPTIONS_NOT_FOLLOWED:
                raise ValueError(
                    f"PYTORCH_CUDA_ALLOC_CONF: option {key} is not followed by the allocator model"
                    f" ({_OPTIONS_NOT_FOLLOWED[key]}); remove it to estimate with the model"
                )
            elif key in _OPTIONS_WITHOUT_EFFECT:
                if value not in ("True", "False"):
                    raise ValueError(f"PYTORCH_CUDA_ALLOC_CONF={text!r}: {key} takes True or False, got {value!r}")
            else:
                raise ValueError(f"PYTORCH_CUDA_ALLOC_CONF={text!r}: unrecognized option {key!r}")
        return cls(expandable_segments=expandable, max_split_size_bytes=max_split)

    def describe(self) -> str:
        """One line: 'expandable_segments:False (PyTorch's default)' or the options set."""
        if self == AllocatorSettings():
            return "expandable_segments:False (PyTorch's default)"
        parts = [f"expandable_segments:{self.expandable_segments}"]
        if self.max_split_size_bytes is not None:
            if self.max_split_size_bytes % MIB == 0:
                parts.append(f"max_split_size_mb:{self.max_split_size_bytes // MIB}")
            else:
                parts.append(f"max_split_size_bytes:{self.max_split_size_bytes}")
        return ", ".join(parts)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SegmentState:
    """One segment as ``torch.cuda.memory_snapshot`` reports it (for an expandable segment:
    one contiguous mapped range)."""

    address: int
    size: int
    stream: int
    pool: str  # "small" or "large"
    live_bytes: int  # bytes of the allocated blocks in it
    largest_free_block: int


@dataclass(frozen=True)
class SegmentGrowth:
    """One cudaMalloc of a new segment (or one mapping of pages onto an expandable segment).

    ``almost_free`` lists, as (address, size, live bytes), each existing segment of the same
    stream and pool at least as large as the request that could not serve it because it holds
    live blocks: had those been freed in time, the growth might not have happened. Under
    expandable segments the segment being extended is itself listed when its mapped bytes
    before the growth reach the request and it holds live blocks (its size is those bytes).
    """

    event_index: int  # malloc calls so far, this one included
    request_bytes: int  # the request, rounded (round_size)
    segment_bytes: int  # the bytes cudaMalloc'd (or mapped)
    stream: int
    pool: str
    almost_free: tuple[tuple[int, int, int], ...]


# --------------------------------------------------------------------------- blocks


@dataclass(eq=False, slots=True)
class _Segment:
    address: int
    stream: int
    pool: str
    expandable: bool
    head: Block
    size: int = 0  # cudaMalloc'd bytes; for an expandable segment, the bytes mapped
    live_bytes: int = 0


@dataclass(eq=False, slots=True)
class Block:
    """A range of a segment: allocated, free (cached), or for an expandable segment unmapped.
    Blocks of one segment form a doubly linked list in address order, as in PyTorch."""

    address: int
    size: int
    stream: int
    pool: str
    segment: _Segment | None = None
    allocated: bool = False
    mapped: bool = True
    prev: Block | None = None
    next: Block | None = None

    def key(self) -> tuple[int, int, int]:
        # BlockComparatorSize orders a pool's free blocks by (stream, size, address).
        return (self.stream, self.size, self.address)


class _FreeBlocks:
    """One pool's cached free blocks, sorted as BlockComparatorSize sorts them."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int, int]] = []
        self.by_address: dict[int, Block] = {}

    def add(self, block: Block) -> None:
        bisect.insort(self.keys, block.key())
        self.by_address[block.address] = block

    def remove(self, block: Block) -> None:
        key = block.key()
        index = bisect.bisect_left(self.keys, key)
        assert index < len(self.keys) and self.keys[index] == key, "block not in its pool"
        del self.keys[index]
        del self.by_address[block.address]


def round_size(size: int) -> int:
    """``round_size``: below kMinBlockSize, kMinBlockSize; else up to a multiple of it
    (roundup_power2_divisions, which is off by default, is not modelled)."""
    if size < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    return K_MIN_BLOCK_SIZE * ((size + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE)


def pool_of(rounded_size: int) -> str:
    """``get_pool``: "if (size <= kSmallSize) return small_blocks; else return large_blocks"."""
    return SMALL if rounded_size <= K_SMALL_SIZE else LARGE


def allocation_size(rounded_size: int) -> int:
    """``get_allocation_size``: the segment cudaMalloc'd for a request no cached block fits."""
    if rounded_size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if rounded_size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * ((rounded_size + K_ROUND_LARGE - 1) // K_ROUND_LARGE)


# --------------------------------------------------------------------------- the model


class CachingAllocatorModel:
    """Replays mallocs and frees the way DeviceCachingAllocator serves them, counting the
    bytes allocated (rounded block sizes, as torch's ``allocated_bytes`` stat) and reserved
    (cudaMalloc'd segments, or mapped pages of expandable segments)."""

    def __init__(self, settings: AllocatorSettings = AllocatorSettings(), capacity_bytes: int | None = None) -> None:
        self.settings = settings
        self.capacity_bytes = capacity_bytes
        self._max_split = settings.max_split_size_bytes
        self._free = {SMALL: _FreeBlocks(), LARGE: _FreeBlocks()}
        self._unmapped: dict[str, list[Block]] = {SMALL: [], LARGE: []}
        self._segments: dict[int, _Segment] = {}  # by the segment's (first) address
        self._handles: dict[int, Block | None] = {}
        self._next_handle = 1
        self._next_address = 1 << 32
        self._malloc_calls = 0
        self._allocated = 0
        self._reserved = 0
        self._peak_allocated = 0
        self._peak_reserved = 0
        self.growths: list[SegmentGrowth] = []

    # ------------------------------------------------------------------ figures

    @property
    def allocated_bytes(self) -> int:
        return self._allocated

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    @property
    def peak_allocated_bytes(self) -> int:
        return self._peak_allocated

    @property
    def peak_reserved_bytes(self) -> int:
        return self._peak_reserved

    def segments(self) -> list[SegmentState]:
        """Every segment, by address; an expandable segment as one entry per mapped range,
        as ``snapshot()`` reports it."""
        states = []
        for segment in sorted(self._segments.values(), key=lambda s: s.address):
            block: Block | None = segment.head
            while block is not None:
                if not block.mapped:
                    block = block.next
                    continue
                start, size, live, largest = block.address, 0, 0, 0
                while block is not None and block.mapped:
                    size += block.size
                    if block.allocated:
                        live += block.size
                    else:
                        largest = max(largest, block.size)
                    block = block.next
                states.append(SegmentState(start, size, segment.stream, segment.pool, live, largest))
        return states

    # ------------------------------------------------------------------ malloc and free

    def malloc(self, size: int, stream: int = 0) -> int:
        """Allocate ``size`` bytes on ``stream``; returns a handle for ``free``.

        A 0-byte request gets a handle and allocates nothing: NativeCachingAllocator::allocate
        calls malloc only "if (size != 0)" and hands out a null pointer, whose free is a no-op.
        """
        if size < 0:
            raise ValueError(f"cannot allocate {size} bytes")
        self._malloc_calls += 1
        handle = self._next_handle
        self._next_handle += 1
        if size == 0:
            self._handles[handle] = None
            return handle
        rounded = round_size(size)
        pool = pool_of(rounded)
        block = self._get_free_block(rounded, stream, pool)
        if block is None:
            block = self._alloc_block(rounded, stream, pool)
            if block is None:
                # malloc's last resort: "Free all non-split cached blocks and retry alloc."
                self.empty_cache()
                block = self._alloc_block(rounded, stream, pool)
            if block is None:
                raise ModelOutOfMemory(
                    f"the model ran out of its {self.capacity_bytes} bytes allocating {rounded} bytes"
                    f" ({self._allocated} allocated, {self._reserved} reserved)"
                )
        block = self._alloc_found_block(block, rounded)
        self._handles[handle] = block
        return handle

    def free(self, handle: int) -> None:
        """Free what ``malloc`` returned ``handle`` for (``free_block``)."""
        try:
            block = self._handles.pop(handle)
        except KeyError:
            raise ValueError(f"handle {handle} is not allocated (freed twice, or never returned by malloc)") from None
        if block is None:
            return  # a 0-byte allocation: "if (!ptr) return;"
        block.allocated = False
        self._allocated -= block.size
        assert block.segment is not None
        block.segment.live_bytes -= block.size
        # free_block: "merge_candidates = {block->prev, block->next}", then back to its pool.
        self._try_merge(block, block.prev)
        self._try_merge(block, block.next)
        self._free[block.pool].add(block)

    # ------------------------------------------------------------------ finding a cached block

    def _get_free_block(self, rounded: int, stream: int, pool: str) -> Block | None:
        """``get_free_block``: best fit by lower_bound on (stream, size) in the request's pool.

        "Once freed, blocks can be re-allocated on the same stream, but not on any other
        stream": a lower_bound that lands on another stream's block finds nothing.
        """
        free = self._free[pool]
        keys = free.keys
        index = bisect.bisect_left(keys, (stream, rounded, -1))
        if index == len(keys) or keys[index][0] != stream:
            return None
        block = free.by_address[keys[index][2]]
        if block.segment is not None and block.segment.expandable:
            # "for the purposes of "best fit" we consider its size to be the size it can
            # expand to": a free block before the unmapped tail counts as that much larger, so
            # the search moves on while the next block's expandable size is smaller.
            while index + 1 < len(keys) and keys[index + 1][0] == stream:
                following = free.by_address[keys[index + 1][2]]
                if _expandable_size(following) >= _expandable_size(block):
                    break
                index += 1
                block = following
        if self._max_split is not None:
            # "Do not return an oversized block for a large request"
            if rounded < self._max_split and block.size >= self._max_split:
                return None
            # "Allow oversized block size to be rounded up but within a limit"
            # (max_non_split_rounding_size, kLargeBuffer by default)
            if rounded >= self._max_split and block.size >= rounded + MAX_NON_SPLIT_ROUNDING:
                return None
        free.remove(block)
        return block

    def _should_split(self, block: Block, rounded: int) -> bool:
        """``should_split``: the small pool (and any expandable segment) splits off any
        remainder of kMinBlockSize or more; the large pool only a remainder over kSmallSize,
        and never a block served to a request at or above max_split_size ("blocks >=
        max_split_size are not allowed to be split")."""
        remaining = block.size - rounded
        if block.pool == SMALL or self.settings.expandable_segments:
            return remaining >= K_MIN_BLOCK_SIZE
        below_max_split = self._max_split is None or rounded < self._max_split
        return below_max_split and remaining > K_SMALL_SIZE

    def _alloc_found_block(self, block: Block, rounded: int) -> Block:
        """``alloc_found_block``: the allocated part takes the block's lower addresses and
        the remainder, after it, goes back to the pool. Unsplit, the whole block is
        allocated, and ``allocated_bytes`` counts all of it (block->size)."""
        if self._should_split(block, rounded):
            remaining = block
            block = Block(remaining.address, rounded, remaining.stream, remaining.pool, remaining.segment)
            block.prev = remaining.prev
            if block.prev is not None:
                block.prev.next = block
            block.next = remaining
            remaining.prev = block
            remaining.address += rounded
            remaining.size -= rounded
            assert remaining.segment is not None
            if remaining.segment.head is remaining:
                remaining.segment.head = block
            self._free[remaining.pool].add(remaining)
        block.allocated = True
        assert block.segment is not None
        block.segment.live_bytes += block.size
        self._allocated += block.size
        self._peak_allocated = max(self._peak_allocated, self._allocated)
        return block

    def _try_merge(self, block: Block, neighbour: Block | None) -> None:
        """``try_merge_blocks``: a free neighbour (in the same mapped state) is absorbed."""
        if neighbour is None or neighbour.allocated or neighbour.mapped != block.mapped:
            return
        if neighbour.mapped:
            self._free[neighbour.pool].remove(neighbour)
        else:
            self._unmapped[neighbour.pool].remove(neighbour)
        if block.prev is neighbour:  # [neighbour block]
            block.address = neighbour.address
            block.prev = neighbour.prev
            if block.prev is not None:
                block.prev.next = block
            assert block.segment is not None
            if block.segment.head is neighbour:
                block.segment.head = block
        else:  # [block neighbour]
            block.next = neighbour.next
            if block.next is not None:
                block.next.prev = block
        block.size += neighbour.size

    # ------------------------------------------------------------------ new memory

    def _alloc_block(self, rounded: int, stream: int, pool: str) -> Block | None:
        """``alloc_block``: a new segment from cudaMalloc, or pages mapped onto the stream's
        expandable segment; None when ``capacity_bytes`` would be passed."""
        if self.settings.expandable_segments:
            # alloc_block passes p.size() (the rounded request), not alloc_size, here.
            return self._try_allocate_expandable_block(rounded, stream, pool)
        size = allocation_size(rounded)
        if self.capacity_bytes is not None and self._reserved + size > self.capacity_bytes:
            return None
        address = self._next_address
        self._next_address += size
        block = Block(address, size, stream, pool)
        segment = _Segment(address, stream, pool, expandable=False, head=block, size=size)
        block.segment = segment
        self._record_growth(rounded, size, stream, pool)
        self._segments[address] = segment
        self._grow_reserved(size)
        return block

    def _grow_reserved(self, size: int) -> None:
        self._reserved += size
        self._peak_reserved = max(self._peak_reserved, self._reserved)

    def _record_growth(self, rounded: int, size: int, stream: int, pool: str) -> None:
        almost_free = tuple(
            (segment.address, segment.size, segment.live_bytes)
            for segment in sorted(self._segments.values(), key=lambda s: s.address)
            if segment.stream == stream and segment.pool == pool and segment.size >= rounded and segment.live_bytes > 0
        )
        self.growths.append(SegmentGrowth(self._malloc_calls, rounded, size, stream, pool, almost_free))

    # ------------------------------------------------------------------ expandable segments

    def _page_size(self, pool: str) -> int:
        # find_expandable_block: "segment_size = pool->is_small ? kSmallBuffer : kLargeBuffer"
        # (2 MiB pages for the small pool, 20 MiB for the large one).
        return K_SMALL_BUFFER if pool == SMALL else K_LARGE_BUFFER

    def _find_expandable_block(self, rounded: int, stream: int, pool: str) -> Block:
        """``find_expandable_block``: the lowest unmapped range of this stream's segment with
        room for the request, starting at the free block just before it if there is one;
        else a new segment (one per stream and pool in practice: its address space is vast)."""
        for unmapped in sorted(
            (b for b in self._unmapped[pool] if b.stream == stream),
            key=lambda b: b.address,
        ):
            candidate = unmapped
            if unmapped.prev is not None and not unmapped.prev.allocated:
                candidate = unmapped.prev
            room = 0
            walker: Block | None = candidate
            while room < rounded and walker is not None and not walker.allocated:
                room += walker.size
                walker = walker.next
            if room >= rounded:
                return candidate
        address = self._next_address
        self._next_address += EXPANDABLE_ADDRESS_SPACE
        block = Block(address, EXPANDABLE_ADDRESS_SPACE, stream, pool, mapped=False)
        block.segment = _Segment(address, stream, pool, expandable=True, head=block)
        self._segments[address] = block.segment
        self._unmapped[pool].append(block)
        return block

    def _map_block(self, to_map: Block, size: int, rounded: int) -> bool:
        """``map_block``: map whole pages covering ``size`` bytes at the start of an unmapped
        range, merge the result with free neighbours and put it in the pool."""
        segment = to_map.segment
        assert segment is not None and not to_map.mapped
        page = self._page_size(to_map.pool)
        mapped = -(-size // page) * page
        if self.capacity_bytes is not None and self._reserved + mapped > self.capacity_bytes:
            return False
        self._unmapped[to_map.pool].remove(to_map)
        to_map.mapped = True
        if mapped < to_map.size:
            remaining = Block(to_map.address + mapped, to_map.size - mapped, to_map.stream, to_map.pool, segment, mapped=False)
            remaining.prev = to_map
            remaining.next = to_map.next
            if remaining.next is not None:
                remaining.next.prev = remaining
            to_map.next = remaining
            to_map.size = mapped
            self._unmapped[to_map.pool].append(remaining)
        self._try_merge(to_map, to_map.prev)
        self._try_merge(to_map, to_map.next)
        self._free[to_map.pool].add(to_map)
        self._record_growth(rounded, mapped, to_map.stream, to_map.pool)
        segment.size += mapped
        self._grow_reserved(mapped)
        return True

    def _try_allocate_expandable_block(self, rounded: int, stream: int, pool: str) -> Block | None:
        """``try_allocate_expandable_block``: map what the candidate lacks, page by page at
        its end, until it holds the request; then take it out of the pool."""
        candidate = self._find_expandable_block(rounded, stream, pool)
        if not candidate.mapped and not self._map_block(candidate, min(candidate.size, rounded), rounded):
            return None
        while candidate.size < rounded:
            following = candidate.next
            assert following is not None and not following.mapped
            if not self._map_block(following, min(rounded - candidate.size, following.size), rounded):
                return None
            candidate = following  # map_block merged the candidate into it
        self._free[pool].remove(candidate)
        return candidate

    def _unmap_block(self, block: Block) -> None:
        """``unmap_block``: give back the whole pages inside a free block of an expandable
        segment; the partial pages at either end stay mapped as free blocks."""
        segment = block.segment
        assert segment is not None
        page = self._page_size(block.pool)
        offset = block.address - segment.address
        begin = -(-offset // page) * page
        end = (offset + block.size) // page * page
        if begin >= end:
            return
        self._free[block.pool].remove(block)
        before = begin - offset
        after = offset + block.size - end
        if before > 0:
            before_free = Block(block.address, before, block.stream, block.pool, segment)
            before_free.prev, before_free.next = block.prev, block
            if block.prev is not None:
                block.prev.next = before_free
            block.prev = before_free
            if segment.head is block:
                segment.head = before_free
            self._free[block.pool].add(before_free)
        if after > 0:
            after_free = Block(segment.address + end, after, block.stream, block.pool, segment)
            after_free.prev, after_free.next = block, block.next
            if block.next is not None:
                block.next.prev = after_free
            block.next = after_free
            self._free[block.pool].add(after_free)
        block.address = segment.address + begin
        block.size = end - begin
        block.mapped = False
        self._try_merge(block, block.prev)
        self._try_merge(block, block.next)
        self._unmapped[block.pool].append(block)
        segment.size -= end - begin
        self._reserved -= end - begin

    # ------------------------------------------------------------------ giving memory back

    def empty_cache(self) -> None:
        """``release_cached_blocks``: cudaFree every segment that is one free block (unsplit);
        for expandable segments, unmap every whole free page and drop a segment left with
        nothing mapped. Segments holding live blocks stay whole."""
        for pool in (LARGE, SMALL):  # release_cached_blocks: large_blocks, then small_blocks
            free = self._free[pool]
            to_unmap = []
            for key in list(free.keys):
                block = free.by_address[key[2]]
                assert block.segment is not None
                if block.segment.expandable:
                    to_unmap.append(block)
                elif block.prev is None and block.next is None:
                    free.remove(block)
                    del self._segments[block.segment.address]
                    self._reserved -= block.size
            for block in to_unmap:
                self._unmap_block(block)
                if block.prev is None and block.next is None and not block.mapped:
                    # release_expandable_segment: nothing of it is mapped any more.
                    self._unmapped[pool].remove(block)
                    assert block.segment is not None
                    del self._segments[block.segment.address]


def _expandable_size(block: Block) -> int:
    """get_free_block's ``expandable_size``: the block plus the unmapped range after it."""
    following = block.next
    return block.size + (following.size if following is not None and not following.mapped else 0)
