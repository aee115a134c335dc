"""The caching-allocator model against PyTorch's rules, one test per rule, with exact bytes.

Each test quotes the reason from c10/cuda/CUDACachingAllocator.cpp (torch 2.x) that fixes
its figures. Pure Python: no torch, no GPU; milliseconds.
"""

from __future__ import annotations

import time

import pytest

from gputech_bench.estimator.allocator import (
    AllocatorSettings,
    CachingAllocatorModel,
    ModelOutOfMemory,
    SegmentGrowth,
)

KiB = 1024
MiB = 1024 * KiB

EXPANDABLE = AllocatorSettings(expandable_segments=True)


def live_by_size(model: CachingAllocatorModel) -> list[tuple[int, int]]:
    """(segment size, live bytes) for every segment, by address."""
    return [(segment.size, segment.live_bytes) for segment in model.segments()]


# --------------------------------------------------------------------------- rounding and pools


def test_a_request_rounds_up_to_512_bytes_in_a_2_mib_small_segment():
    # round_size: "if (size < kMinBlockSize) return kMinBlockSize" else a multiple of 512;
    # get_allocation_size: "if (size <= kSmallSize) return kSmallBuffer" (2 MiB).
    model = CachingAllocatorModel()
    model.malloc(1)
    assert model.allocated_bytes == 512
    assert model.reserved_bytes == 2 * MiB
    model.malloc(513)
    assert model.allocated_bytes == 512 + 1024
    (segment,) = model.segments()
    assert (segment.pool, segment.size, segment.live_bytes) == ("small", 2 * MiB, 1536)
    assert segment.largest_free_block == 2 * MiB - 1536


def test_small_requests_share_one_2_mib_segment_until_it_is_full():
    # "Small requests are packed into 2MB buffers": 600 KiB three times fits 2 MiB
    # (1,843,200 bytes), the fourth does not and gets a second 2 MiB segment.
    model = CachingAllocatorModel()
    model.malloc(600 * KiB)
    model.malloc(600 * KiB)
    assert model.reserved_bytes == 2 * MiB
    assert live_by_size(model) == [(2 * MiB, 1_228_800)]
    model.malloc(600 * KiB)
    assert model.reserved_bytes == 2 * MiB
    model.malloc(600 * KiB)
    assert model.reserved_bytes == 4 * MiB
    assert live_by_size(model) == [(2 * MiB, 1_843_200), (2 * MiB, 614_400)]


def test_small_pool_splits_off_any_remainder_of_512_bytes_or_more():
    # should_split: "if (block->pool->is_small ...) return remaining >= kMinBlockSize".
    model = CachingAllocatorModel()
    model.malloc(1 * MiB)  # the largest small request
    model.malloc(1 * MiB - 512)  # leaves exactly 512 bytes, still split off
    model.malloc(512)  # and that sliver serves a 512-byte request
    assert model.reserved_bytes == 2 * MiB
    assert model.allocated_bytes == 2 * MiB
    assert len(model.growths) == 1


def test_a_request_between_1_and_10_mib_reserves_20_mib_and_the_next_reuses_the_rest():
    # get_allocation_size: "else if (size < kMinLargeAlloc) return kLargeBuffer";
    # "requests between 1MB and 10MB will allocate and split a 20MB block".
    model = CachingAllocatorModel()
    model.malloc(5 * MiB)
    assert model.reserved_bytes == 20 * MiB
    model.malloc(5 * MiB)
    assert model.reserved_bytes == 20 * MiB
    assert model.allocated_bytes == 10 * MiB
    (segment,) = model.segments()
    assert (segment.pool, segment.live_bytes, segment.largest_free_block) == ("large", 10 * MiB, 10 * MiB)


def test_a_request_of_10_mib_or_more_reserves_its_size_rounded_up_to_2_mib():
    # get_allocation_size: "return kRoundLarge * ((size + kRoundLarge - 1) / kRoundLarge)".
    # 30,000,001 bytes rounds to 30,000,128 (a multiple of 512) and its segment to 30 MiB
    # (15 x 2 MiB); the 1,457,152 bytes left over are more than kSmallSize, so split off.
    model = CachingAllocatorModel()
    model.malloc(30_000_001)
    assert model.reserved_bytes == 30 * MiB == 31_457_280
    assert model.allocated_bytes == 30_000_128
    # kMinLargeAlloc is the boundary: 512 bytes under 10 MiB still gets a 20 MiB segment,
    # 10 MiB itself a segment of exactly 10 MiB.
    below = CachingAllocatorModel()
    below.malloc(10 * MiB - 512)
    assert below.reserved_bytes == 20 * MiB
    at = CachingAllocatorModel()
    at.malloc(10 * MiB)
    assert at.reserved_bytes == 10 * MiB


def test_a_large_block_keeps_a_remainder_of_1_mib_or_less_unsplit_and_counts_it_allocated():
    # should_split (large pool): "return (size < max_split_size) && (remaining > kSmallSize)";
    # alloc_found_block counts block->size in allocated_bytes, the remainder included.
    model = CachingAllocatorModel()
    model.malloc(19 * MiB)  # a 20 MiB segment with exactly 1 MiB left: not split
    assert model.allocated_bytes == 20 * MiB
    model.malloc(512 * KiB)  # a small request cannot use it anyway: another pool
    assert model.reserved_bytes == 22 * MiB


# --------------------------------------------------------------------------- reuse


def test_a_freed_block_serves_a_request_of_the_same_size_without_growth():
    # "Once freed, blocks can be re-allocated on the same stream".
    model = CachingAllocatorModel()
    handle = model.malloc(50 * MiB)
    model.free(handle)
    assert model.allocated_bytes == 0
    assert model.reserved_bytes == 50 * MiB  # cached, not returned to CUDA
    model.malloc(50 * MiB)
    assert model.reserved_bytes == 50 * MiB
    assert len(model.growths) == 1


def test_best_fit_takes_the_smaller_of_two_free_blocks():
    # "The allocator attempts to find the smallest cached block that will fit the requested
    # size": get_free_block's lower_bound on (stream, size).
    model = CachingAllocatorModel()
    small, large = model.malloc(40 * MiB), model.malloc(60 * MiB)
    model.free(large)
    model.free(small)
    model.malloc(30 * MiB)
    assert live_by_size(model) == [(40 * MiB, 30 * MiB), (60 * MiB, 0)]
    model.malloc(50 * MiB)  # the 60 MiB block is still there for this one
    assert live_by_size(model) == [(40 * MiB, 30 * MiB), (60 * MiB, 50 * MiB)]
    assert model.reserved_bytes == 100 * MiB


def test_freed_neighbours_merge_so_that_a_larger_request_fits():
    # free_block: "merge_candidates = {block->prev, block->next}" (try_merge_blocks); the
    # allocated part of a split sits at the block's lower address (alloc_found_block).
    model = CachingAllocatorModel()
    first, second, third = (model.malloc(5 * MiB) for _ in range(3))  # one 20 MiB segment
    model.free(second)
    model.free(first)  # merges with the free block after it
    (segment,) = model.segments()
    assert segment.largest_free_block == 10 * MiB
    model.malloc(9 * MiB)  # fits only in the merged 10 MiB
    assert model.reserved_bytes == 20 * MiB
    assert len(model.growths) == 1


def test_a_block_merges_with_both_neighbours_back_into_one_free_segment():
    model = CachingAllocatorModel()
    first, second, third = (model.malloc(5 * MiB) for _ in range(3))
    model.free(first)
    model.free(third)  # merges with the 5 MiB remainder after it
    model.free(second)  # merges with both: the segment is one free block again
    (segment,) = model.segments()
    assert (segment.live_bytes, segment.largest_free_block) == (0, 20 * MiB)
    model.malloc(20 * MiB)
    assert model.reserved_bytes == 20 * MiB


def test_another_streams_free_block_is_never_used():
    # "Once freed, blocks can be re-allocated on the same stream, but not on any other stream."
    # Both ways round: the pool's lower_bound on (stream, size) lands past a lower stream's
    # blocks, and on a higher stream's block, which get_free_block must then turn down.
    for cached_on, asked_on in ((0, 1), (1, 0)):
        model = CachingAllocatorModel()
        model.free(model.malloc(5 * MiB, stream=cached_on))  # a free 20 MiB segment
        model.malloc(5 * MiB, stream=asked_on)
        assert model.reserved_bytes == 40 * MiB
        assert [(s.stream, s.live_bytes) for s in model.segments()] == [(cached_on, 0), (asked_on, 5 * MiB)]


# --------------------------------------------------------------------------- max_split_size


def test_max_split_size_keeps_a_smaller_request_off_an_oversize_block():
    # get_free_block: "Do not return an oversized block for a large request": a request below
    # max_split_size never takes a cached block at or above it.
    default = CachingAllocatorModel()
    default.free(default.malloc(50 * MiB))
    default.malloc(30 * MiB)
    assert default.reserved_bytes == 50 * MiB  # split: 30 + 20
    limited = CachingAllocatorModel(AllocatorSettings.from_conf("max_split_size_mb:40"))
    limited.free(limited.malloc(50 * MiB))
    limited.malloc(30 * MiB)
    assert limited.reserved_bytes == 80 * MiB
    assert live_by_size(limited) == [(50 * MiB, 0), (30 * MiB, 30 * MiB)]


def test_max_split_size_lets_a_large_request_round_up_by_less_than_20_mib_without_splitting():
    # get_free_block: "Allow oversized block size to be rounded up but within a limit":
    # rejected when block size >= request + max_non_split_rounding_size (20 MiB by default);
    # should_split: a request >= max_split_size is never split.
    settings = AllocatorSettings(max_split_size_bytes=40 * MiB)
    model = CachingAllocatorModel(settings)
    model.free(model.malloc(100 * MiB))
    model.malloc(81 * MiB)  # 100 < 81 + 20: the whole 100 MiB block, unsplit
    assert model.allocated_bytes == 100 * MiB
    assert model.reserved_bytes == 100 * MiB
    model = CachingAllocatorModel(settings)
    model.free(model.malloc(100 * MiB))
    model.malloc(80 * MiB)  # 100 >= 80 + 20: a new segment
    assert model.reserved_bytes == 180 * MiB
    assert model.allocated_bytes == 80 * MiB


# --------------------------------------------------------------------------- expandable segments


def test_expandable_segments_map_only_what_a_free_tail_block_lacks():
    # try_allocate_expandable_block: "map_block will map some of unmapped and merge with free":
    # two 100 MiB blocks, the second (at the tail) freed; 150 MiB maps 50 MiB more, rounded
    # to the large pool's 20 MiB pages ("we use 2MiB pages for our small pool and 20MiB pages
    # for our large pool"): 60 MiB, so 260 MiB reserved, 10 MiB of it split off and free.
    # Without expandable segments the 150 MiB request is a third cudaMalloc: 350 MiB.
    for settings, reserved in ((AllocatorSettings(), 350 * MiB), (EXPANDABLE, 260 * MiB)):
        model = CachingAllocatorModel(settings)
        model.malloc(100 * MiB)
        model.free(model.malloc(100 * MiB))
        model.malloc(150 * MiB)
        assert model.reserved_bytes == reserved, settings
        assert model.allocated_bytes == 250 * MiB
    assert [(s.size, s.live_bytes, s.largest_free_block) for s in model.segments()] == [(260 * MiB, 250 * MiB, 10 * MiB)]


def test_expandable_segments_cannot_reuse_a_free_block_away_from_the_tail():
    # The same allocations with the first block freed: it is not before the unmapped tail, so
    # find_expandable_block maps 150 MiB at the end, rounded to 8 pages: 160 MiB. The freed
    # 100 MiB stays cached, and expandable reserves more than the 350 MiB of three cudaMallocs.
    model = CachingAllocatorModel(EXPANDABLE)
    first = model.malloc(100 * MiB)
    model.malloc(100 * MiB)
    model.free(first)
    model.malloc(150 * MiB)
    assert model.reserved_bytes == 360 * MiB
    assert [g.segment_bytes for g in model.growths] == [100 * MiB, 100 * MiB, 160 * MiB]


def test_expandable_segments_map_pages_of_20_mib_for_the_large_pool_and_2_mib_for_the_small():
    # alloc_block passes the rounded request (p.size(), not alloc_size) to
    # try_allocate_expandable_block; map() rounds it up to whole pages.
    model = CachingAllocatorModel(EXPANDABLE)
    model.malloc(5 * MiB)
    assert model.reserved_bytes == 20 * MiB  # one large page, 15 MiB of it free at the tail
    model.malloc(30 * MiB)  # the free 15 MiB tail + one more page: 35 MiB, split
    assert model.reserved_bytes == 40 * MiB  # cudaMalloc would hold 20 + 30 = 50 MiB
    model.malloc(1)
    assert model.reserved_bytes == 42 * MiB
    assert [(s.pool, s.size) for s in model.segments()] == [("large", 40 * MiB), ("small", 2 * MiB)]


def test_expandable_best_fit_prefers_a_block_away_from_the_tail():
    # get_free_block: "for the purposes of "best fit" we consider its size to be the size it
    # can expand to": the free 20 MiB block before the unmapped tail counts as huge, so a
    # 15 MiB request takes the free 60 MiB block instead and leaves 45 MiB of it.
    model = CachingAllocatorModel(EXPANDABLE)
    first = model.malloc(60 * MiB)
    model.malloc(20 * MiB)
    last = model.malloc(20 * MiB)
    model.free(first)
    model.free(last)
    model.malloc(15 * MiB)
    (segment,) = model.segments()
    assert (segment.size, segment.live_bytes, segment.largest_free_block) == (100 * MiB, 35 * MiB, 45 * MiB)


def test_expandable_empty_cache_unmaps_whole_free_pages_only():
    # release_blocks -> unmap_block: "unmaps all the completely empty segment_size_ segments";
    # the partial page under a live block stays mapped.
    model = CachingAllocatorModel(EXPANDABLE)
    model.malloc(5 * MiB)
    model.free(model.malloc(50 * MiB))  # maps [20, 60) MiB: 60 MiB in all
    assert model.reserved_bytes == 60 * MiB
    model.empty_cache()
    assert model.reserved_bytes == 20 * MiB


# --------------------------------------------------------------------------- a replay by hand


def test_a_hand_computed_replay():
    # Default settings, stream 0. Reserved after each event, worked out from the rules above:
    #  1 h1 = 1,000,000 B -> 1,000,448 (x512), small: new 2 MiB segment S           reserved  2 MiB
    #  2 h2 = 3 MiB, large: new 20 MiB segment L1, 17 MiB left free                          22 MiB
    #  3 h3 = 12 MiB: fits L1's 17 MiB; 5 MiB left (> 1 MiB: split)                           22 MiB
    #  4 h4 = 8 MiB: 5 MiB too small -> new 20 MiB segment L2 (8 < 10 MiB), 12 MiB free       42 MiB
    #  5 free h2: L1's first 3 MiB, next to live h3: no merge                                42 MiB
    #  6 h5 = 4 MiB: best fit is L1's 5 MiB tail; 1 MiB left is not > 1 MiB: all 5 MiB taken  42 MiB
    #  7 free h3: merges with the free 3 MiB before it: 15 MiB free at L1's start            42 MiB
    #  8 h6 = 14 MiB: takes those 15 MiB unsplit (1 MiB left)                                42 MiB
    #  9 h7 = 13 MiB: only L2's 12 MiB free -> new segment of 14 MiB (rounded to 2 MiB)      56 MiB
    # 10 free h4: L2 merges into one free 20 MiB block                                       56 MiB
    # 11 h8 = 700,000 B -> 700,416, small: fits S's 1,097,152 free bytes                     56 MiB
    # Peak reserved 56 MiB. Allocated peaks after event 9: 1,000,448 + 5 + 15 + 8 + 14 MiB.
    model = CachingAllocatorModel()
    h1 = model.malloc(1_000_000)
    h2 = model.malloc(3 * MiB)
    h3 = model.malloc(12 * MiB)
    h4 = model.malloc(8 * MiB)
    model.free(h2)
    h5 = model.malloc(4 * MiB)
    model.free(h3)
    h6 = model.malloc(14 * MiB)
    h7 = model.malloc(13 * MiB)
    model.free(h4)
    h8 = model.malloc(700_000)
    assert model.peak_reserved_bytes == 56 * MiB == model.reserved_bytes
    assert model.peak_allocated_bytes == 1_000_448 + 42 * MiB
    assert model.allocated_bytes == 1_000_448 + 700_416 + (5 + 15 + 14) * MiB
    assert [(s.pool, s.size, s.live_bytes) for s in model.segments()] == [
        ("small", 2 * MiB, 1_000_448 + 700_416),
        ("large", 20 * MiB, 20 * MiB),
        ("large", 20 * MiB, 0),
        ("large", 14 * MiB, 14 * MiB),
    ]
    for handle in (h1, h5, h6, h7, h8):
        model.free(handle)
    assert model.allocated_bytes == 0
    assert model.reserved_bytes == 56 * MiB  # a step never gives memory back on its own
    model.empty_cache()
    assert model.reserved_bytes == 0
    assert model.peak_reserved_bytes == 56 * MiB


def test_growth_records_list_the_segments_that_live_blocks_kept_from_serving():
    # The replay above grows at its 1st, 2nd, 4th and 7th malloc; at the 7th (13 MiB) both
    # 20 MiB large segments were big enough but held live blocks (L1 all 20 MiB, L2 8 MiB).
    model = CachingAllocatorModel()
    model.malloc(1_000_000)
    h2 = model.malloc(3 * MiB)
    h3 = model.malloc(12 * MiB)
    model.malloc(8 * MiB)
    model.free(h2)
    model.malloc(4 * MiB)
    model.free(h3)
    model.malloc(14 * MiB)
    model.malloc(13 * MiB)
    assert [(g.event_index, g.request_bytes, g.segment_bytes, g.pool) for g in model.growths] == [
        (1, 1_000_448, 2 * MiB, "small"),
        (2, 3 * MiB, 20 * MiB, "large"),
        (4, 8 * MiB, 20 * MiB, "large"),
        (7, 13 * MiB, 14 * MiB, "large"),
    ]
    first_large, second_large = (s.address for s in model.segments() if s.pool == "large" and s.size == 20 * MiB)
    assert model.growths[2].almost_free == ((first_large, 20 * MiB, 15 * MiB),)
    assert model.growths[3] == SegmentGrowth(
        event_index=7,
        request_bytes=13 * MiB,
        segment_bytes=14 * MiB,
        stream=0,
        pool="large",
        almost_free=((first_large, 20 * MiB, 20 * MiB), (second_large, 20 * MiB, 8 * MiB)),
    )
    assert model.growths[0].almost_free == () == model.growths[1].almost_free


# --------------------------------------------------------------------------- 0 bytes, empty_cache, capacity


def test_a_zero_byte_request_allocates_nothing_and_its_free_is_a_no_op():
    # NativeCachingAllocator::allocate: "if (size != 0) this->malloc(...)": a null pointer,
    # and free(): "if (!ptr) return;".
    model = CachingAllocatorModel()
    handle = model.malloc(0)
    assert (model.allocated_bytes, model.reserved_bytes, model.segments()) == (0, 0, [])
    model.free(handle)
    with pytest.raises(ValueError, match="not allocated"):
        model.free(handle)


def test_empty_cache_releases_only_segments_that_are_entirely_free():
    # release_blocks: "Frees all non-split blocks" (!block->prev && !block->next).
    model = CachingAllocatorModel()
    model.malloc(5 * MiB)  # a 20 MiB segment, split: stays
    model.free(model.malloc(30 * MiB))  # a free 30 MiB segment: goes
    model.free(model.malloc(1))  # a free 2 MiB small segment: goes
    assert model.reserved_bytes == 52 * MiB
    model.empty_cache()
    assert model.reserved_bytes == 20 * MiB
    assert live_by_size(model) == [(20 * MiB, 5 * MiB)]


def test_over_capacity_the_cached_segments_are_freed_and_the_cudamalloc_retried():
    # malloc: alloc_block fails -> "Free all non-split cached blocks and retry alloc." -> OOM.
    model = CachingAllocatorModel(capacity_bytes=60 * MiB)
    cached = model.malloc(20 * MiB)
    model.malloc(30 * MiB)
    model.free(cached)
    model.malloc(25 * MiB)  # 26 MiB segment: 50 + 26 > 60, so the cached 20 MiB goes first
    assert model.reserved_bytes == 56 * MiB
    # The 1 MiB left over is not more than kSmallSize: the whole 26 MiB is allocated.
    assert live_by_size(model) == [(30 * MiB, 30 * MiB), (26 * MiB, 26 * MiB)]
    with pytest.raises(ModelOutOfMemory):
        model.malloc(10 * MiB)  # nothing cached left to free
    unlimited = CachingAllocatorModel()
    cached = unlimited.malloc(20 * MiB)
    unlimited.malloc(30 * MiB)
    unlimited.free(cached)
    unlimited.malloc(25 * MiB)
    assert unlimited.reserved_bytes == 76 * MiB


# --------------------------------------------------------------------------- settings


def test_from_conf_reads_the_options_the_model_follows():
    assert AllocatorSettings.from_conf(None) == AllocatorSettings() == AllocatorSettings.from_conf("")
    settings = AllocatorSettings.from_conf("expandable_segments:True,max_split_size_mb:128")
    assert settings == AllocatorSettings(expandable_segments=True, max_split_size_bytes=128 * MiB)
    # AllocatorConfig::lexArgs drops spaces; the default backend may be named.
    assert AllocatorSettings.from_conf(" expandable_segments : True , backend:native") == EXPANDABLE
    assert AllocatorSettings.from_conf("expandable_segments:True,expandable_segments:False") == AllocatorSettings()
    assert AllocatorSettings().describe() == "expandable_segments:False (PyTorch's default)"
    assert settings.describe() == "expandable_segments:True, max_split_size_mb:128"
    assert AllocatorSettings(max_split_size_bytes=64 * MiB).describe() == "expandable_segments:False, max_split_size_mb:64"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("garbage_collection_threshold:0.6", "garbage_collection_threshold is not followed"),
        ("roundup_power2_divisions:4", "roundup_power2_divisions is not followed"),
        ("pinned_use_cuda_host_register:True", "pinned_use_cuda_host_register is not followed"),
        ("backend:cudaMallocAsync", "cudaMallocAsync.*does not follow"),
        ("expandable_segments", "needs a value"),
        ("expandable_segments:", "needs a value"),
        ("expandable_segments:yes", "True or False"),
        ("expandable_segments:True;max_split_size_mb:128", "expected ','"),
        ("expandable_segments:True,", "nothing after"),
        ("max_split_size_mb:abc", "whole number"),
        ("max_split_size_mb:10", "too small"),
        ("no_such_option:1", "unrecognized option 'no_such_option'"),
        (":True", "expected an option name"),
    ],
)
def test_from_conf_refuses_what_it_does_not_follow_or_cannot_read(text: str, message: str):
    with pytest.raises(ValueError, match=message):
        AllocatorSettings.from_conf(text)


# --------------------------------------------------------------------------- speed


def test_a_replay_of_100_000_events_takes_well_under_seconds():
    # A training step's trace: many tensors, most freed soon after; the model must keep up.
    model = CachingAllocatorModel()
    live: list[int] = []
    sizes = [512, 4 * KiB, 600 * KiB, 3 * MiB, 12 * MiB, 48 * MiB]
    started = time.perf_counter()
    for event in range(50_000):
        live.append(model.malloc(sizes[(event * 7) % len(sizes)] + event % 4096))
        if len(live) > 200:
            model.free(live.pop((event * 13) % len(live)))
    elapsed = time.perf_counter() - started
    assert model.peak_reserved_bytes >= model.peak_allocated_bytes > 0
    assert elapsed < 3.0, f"{elapsed:.2f} s for 100,000 events"
