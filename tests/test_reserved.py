"""The reserved-memory prediction, mechanism by mechanism, with numbers on a CPU.

allocations.py records the device's allocations and frees (and the cuBLAS workspaces a real
run makes); trace.py traces dropout on the stand-in device as CUDA's fused kernel; reserved.py
replays the sequence through the allocator model, with a range over where the workspaces land.
Each test checks one of these against bytes worked out by hand, and the last checks the whole
chain against NVML peaks an H200 measured.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN
from torch._subclasses.fake_tensor import FakeTensorMode

from gputech_bench.config import apply_overrides, load_preset
from gputech_bench.estimator import trace as trace_module
from gputech_bench.estimator.allocations import ALLOC, FREE, AllocationRecorder, AllocationSequence, WorkspaceRule
from gputech_bench.estimator.reserved import ReservedRange, predict_reserved
from gputech_bench.estimator.trace import trace_cell, trace_inputs, trace_target
from gputech_bench.strategies import parse_cell

MIB = 2**20
META = torch.device("meta")
WORKSPACE = WorkspaceRule(32 * MIB, "test")


def _live_bytes(sequence: AllocationSequence, until: int) -> int:
    """Bytes allocated and not yet freed among the first ``until`` events."""
    live: dict[int, int] = {}
    for kind, handle, size, _ in sequence.events[:until]:
        if kind == ALLOC:
            live[handle] = size
        else:
            del live[handle]
    return sum(live.values())


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages among ``tensors`` on the stand-in device (tied weights once)."""
    storages = {}
    for tensor in tensors:
        if tensor is not None and tensor.device == META:
            storages[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


# --------------------------------------------------------------------------- 1. the recorder


def test_the_recorder_sees_each_new_storage_its_last_free_and_a_workspace_per_thread():
    recorder = AllocationRecorder(META, WORKSPACE)
    with FakeTensorMode(allow_non_fake_inputs=True), recorder:
        recorder.phase("forward")
        x = torch.empty(4, 8, device=META)  # 0: 128 bytes
        w = torch.empty(8, 16, device=META)  # 1: 512
        view = x.t()  # a view: shares x's storage, allocates nothing
        assert len(recorder.sequence().events) == 2
        y = x.mm(w)  # 2: 256, then 3: the forward thread's first matmul makes its workspace
        before = len(recorder.sequence().events)
        y.mul_(2)
        y.relu_()  # in place: nothing new
        assert len(recorder.sequence().events) == before
        z = y.mm(torch.empty(16, 2, device=META))  # 4: operand (128), 5: z (32), no workspace; 4 freed after
        del x  # the view still holds the storage: no free
        assert recorder.sequence().events[-1] == (FREE, 4, 0, 0)
        del view  # the last reference: 0 freed
        del y  # 2 freed
        recorder.phase("backward")
        a = torch.empty(3, 4, device=META)  # 6: 48
        b = torch.empty(4, 5, device=META, requires_grad=True)  # 7: 80
        # 8: a @ b (60), 9: the sum (4), 8 freed (sum's backward keeps no input);
        # backward: 10: the ones (4), 11: b's gradient a.T @ ones (80), 12: autograd's thread's workspace
        loss = a.mm(b).sum()
        loss.backward()
        del loss  # 10 went with the graph, then 9
        # A second pass: 13: a @ b, 14: the sum, 15: the ones, 16: the new gradient, added to
        # b.grad in place and freed; its matmuls (forward and backward) make no workspace.
        loss = a.mm(b).sum()
        loss.backward()
        del loss
    sequence = recorder.sequence()
    assert z.shape == (4, 2)
    ws = 32 * MIB
    assert list(sequence.events) == [
        (ALLOC, 0, 128, 0), (ALLOC, 1, 512, 0), (ALLOC, 2, 256, 0), (ALLOC, 3, ws, 0),
        (ALLOC, 4, 128, 0), (ALLOC, 5, 32, 0), (FREE, 4, 0, 0), (FREE, 0, 0, 0), (FREE, 2, 0, 0),
        (ALLOC, 6, 48, 0), (ALLOC, 7, 80, 0), (ALLOC, 8, 60, 0), (ALLOC, 9, 4, 0), (FREE, 8, 0, 0),
        (ALLOC, 10, 4, 0), (ALLOC, 11, 80, 0), (ALLOC, 12, ws, 0), (FREE, 10, 0, 0), (FREE, 9, 0, 0),
        (ALLOC, 13, 60, 0), (ALLOC, 14, 4, 0), (FREE, 13, 0, 0),
        (ALLOC, 15, 4, 0), (ALLOC, 16, 80, 0), (FREE, 16, 0, 0), (FREE, 15, 0, 0), (FREE, 14, 0, 0),
    ]
    assert sequence.phases == ((0, "forward"), (9, "backward"))
    assert sequence.modelled == frozenset({3, 12})
    assert sequence.workspaces == WORKSPACE
    assert sequence.resized == 0


# --------------------------------------------------------------------------- tiny BERT traces


def _tiny_config(cache_dir: Path, *overrides: str):
    return apply_overrides(load_preset("cpu"), TINY_RUN + [f"data.cache_dir={cache_dir}", "train.max_steps=2", *overrides])


@pytest.fixture(scope="module")
def tiny_dropout(cache_dir: Path):
    config = _tiny_config(cache_dir, "model.dropout=0.1", "model.attention=eager")
    return config, trace_inputs(config)


def test_live_bytes_at_each_phase_boundary_are_the_model_state_and_the_workspaces(tiny_dropout):
    config, inputs = tiny_dropout
    plans = []
    traced = trace_cell(parse_cell("baseline"), config, inputs, trace_target(), inspect=plans.append)
    sequence = traced.allocations
    assert sequence is not None
    starts = dict((label, index) for index, label in sequence.phases)
    assert list(starts) == ["placement", "step 1", "step 2", "step 3"]
    model, optimizer = plans[0].model, plans[0].optimizer
    weights = _storage_bytes([*model.parameters(), *model.buffers()])
    # The tiny BERT (hidden 32, 2 layers, vocab 400, 64 positions): well over 100 KB, tied
    # decoder counted once; the two int64 [1, 64] buffers (position and token-type ids) are 1,024.
    assert weights == _storage_bytes(model.parameters()) + 2 * 64 * 8
    assert weights > 100_000
    # After placement: the weights and buffers alone.
    assert _live_bytes(sequence, starts["step 1"]) == weights
    # After a step: the weights, AdamW's two moments (its step counters stay on the host), and
    # the two workspaces the step made; gradients were set to None.
    moments = _storage_bytes(value for state in optimizer.state.values() for value in state.values()
                             if isinstance(value, torch.Tensor))
    assert moments == 2 * _storage_bytes(model.parameters())
    after_a_step = weights + moments + 2 * 32 * MIB
    assert _live_bytes(sequence, starts["step 2"]) == after_a_step
    assert _live_bytes(sequence, starts["step 3"]) == after_a_step
    assert _live_bytes(sequence, len(sequence.events)) == after_a_step
    assert len(sequence.modelled) == 2


def test_dropout_on_the_stand_in_keeps_a_bool_mask_not_an_fp32_noise_tensor(tiny_dropout, monkeypatch):
    config, inputs = tiny_dropout
    target = trace_target()
    fused = trace_cell(parse_cell("baseline"), config, inputs, target)
    monkeypatch.setattr(trace_module, "_fused_dropout_on_stand_in", lambda target: contextlib.nullcontext())
    unfused = trace_cell(parse_cell("baseline"), config, inputs, target)

    # The baseline takes the whole batch at once; each forward has 1 + 2 x layers dropouts on
    # hidden states (embeddings, attention output, FFN output) and one per layer on the
    # attention probabilities (eager attention).
    batch, length = inputs.batches[1]["input_ids"].shape
    hidden, layers, heads = config.model.hidden_size, config.model.num_layers, config.model.num_heads
    hidden_elements, probability_elements = batch * length * hidden, batch * heads * length * length
    hidden_sites, probability_sites = 1 + 2 * layers, layers
    steps = 3
    assert (batch, length, hidden, layers, heads) == (16, 32, 32, 2, 2)  # what the numbers below are worked out for

    def sizes(traced):
        assert traced.allocations is not None
        return Counter(size for kind, _, size, _ in traced.allocations.events if kind == ALLOC)

    with_mask, with_noise = sizes(fused), sizes(unfused)
    # Fused: one bool mask (1 byte an element) per dropout of every forward...
    assert with_mask[hidden_elements] - with_noise[hidden_elements] == hidden_sites * steps
    assert with_mask[probability_elements] - with_noise[probability_elements] == probability_sites * steps
    # ...and none of the unfused path's fp32 noise tensors of the input's size.
    assert with_noise[4 * hidden_elements] - with_mask[4 * hidden_elements] == hidden_sites * steps
    assert with_noise[4 * probability_elements] - with_mask[4 * probability_elements] == probability_sites * steps

    # At the peak, backward keeps every dropout's mask of the last forward: 3 bytes an element
    # less than the noise. 3 x (5 x 16,384 + 2 x 32,768) = 442,368 bytes.
    dropped = hidden_sites * hidden_elements + probability_sites * probability_elements
    assert unfused.device.total_bytes - fused.device.total_bytes == 3 * dropped == 442_368


# --------------------------------------------------------------------------- 4. the replay and its range


def _sequence(events, modelled=()) -> AllocationSequence:
    # The modelled allocations here are workspaces: placed by a guess, so the range varies them.
    return AllocationSequence(tuple(events), ((0, "test"),), WORKSPACE, frozenset(modelled), 0, frozenset(modelled))


def test_a_workspace_that_pins_a_freed_logits_block_costs_a_segment_which_its_own_segment_avoids():
    # A 2,342 MiB block is freed, the workspace arrives with no smaller free block about: best
    # fit splits the big block and pins it, so the next 2,342 MiB request needs a new segment.
    sequence = _sequence([
        (ALLOC, 0, 2342 * MIB, 0), (FREE, 0, 0, 0),
        (ALLOC, 1, 32 * MIB, 0),  # the workspace
        (ALLOC, 2, 2342 * MIB, 0),
    ], modelled={1})
    reserved = predict_reserved(sequence)
    assert reserved.traced_bytes == 2 * 2342 * MIB
    assert reserved.segments == [[2342 * MIB, 2]]
    # In a segment of its own, the workspace leaves the big block to the second request.
    assert reserved.low_bytes == 2342 * MIB + 32 * MIB
    assert reserved.high_bytes == reserved.traced_bytes  # the largest free block is the one it took
    assert reserved.low_bytes < reserved.traced_bytes
    assert reserved.why is not None and "one 2,342 MiB segment fewer" in reserved.why
    assert reserved.variants == 2


def test_a_workspace_a_smaller_block_takes_may_still_land_in_the_big_one():
    sequence = _sequence([
        (ALLOC, 0, 64 * MIB, 0), (ALLOC, 1, 2342 * MIB, 0), (FREE, 0, 0, 0), (FREE, 1, 0, 0),
        (ALLOC, 2, 32 * MIB, 0),  # the workspace: best fit puts it in the 64 MiB block
        (ALLOC, 3, 2342 * MIB, 0),  # reuses the big block
    ], modelled={2})
    reserved = predict_reserved(sequence)
    assert reserved.traced_bytes == (64 + 2342) * MIB
    # In the largest free block instead, it pins that one: a second 2,342 MiB segment.
    assert reserved.high_bytes == (64 + 2 * 2342) * MIB
    # Its own segment adds 32 MiB only: within one workspace of the traced, so not counted.
    assert reserved.low_bytes == reserved.traced_bytes
    assert reserved.why is not None and "one 2,342 MiB segment more" in reserved.why
    assert "fewer" not in reserved.why


def test_without_modelled_allocations_the_range_is_the_replay():
    # The same events as the pinning case, but the 32 MiB request is a tensor the trace saw:
    # its place is known, so there is no range.
    sequence = _sequence([
        (ALLOC, 0, 2342 * MIB, 0), (FREE, 0, 0, 0), (ALLOC, 1, 32 * MIB, 0), (ALLOC, 2, 2342 * MIB, 0),
    ])
    reserved = predict_reserved(sequence)
    assert reserved.low_bytes == reserved.traced_bytes == reserved.high_bytes == 2 * 2342 * MIB
    assert reserved.why is None
    assert reserved.variants == 0


def test_the_traced_replay_of_a_small_sequence_is_what_the_allocator_rules_give_by_hand():
    # By hand, with PyTorch's rules (allocator.py): best fit in the request's pool, a large
    # block split only when over 1 MiB would remain.
    #   0: 1,000 B      -> 1,024 (512-byte rounding), small pool: a new 2 MiB segment.       reserved  2 MiB
    #   1: 5 MiB        -> large pool, under 10 MiB: a new 20 MiB segment A, split (15 left). reserved 22 MiB
    #   2: 12 MiB + 1   -> 12 MiB + 512 fits A's 15 MiB: split, 3 MiB - 512 left.
    #   free 1          -> A's first 5 MiB (its neighbour is allocated: no merge)
    #   3: 8 MiB        -> free 5 and 3 MiB - 512 are too small: a new 20 MiB segment B.     reserved 42 MiB
    #   4: 13 MiB       -> free 5, 3 - 512 B, 12 (B's rest): none fits; a new segment of 13
    #                      rounded up to 2 MiB = 14, whose 1 MiB rest is too small to split:
    #                      the whole 14 MiB block is allocated.                              reserved 56 MiB
    #   free 2          -> merges with both neighbours: A is one free 20 MiB block again
    #   5: 14 MiB       -> best fit: A (20) over B's 12, which is too small; split
    #   6: 600 KiB      -> the small pool's 2 MiB segment has room
    # Peak reserved 2 + 20 + 20 + 14 = 56 MiB. Allocated peaks at the end:
    # 1,024 + 8 MiB + 14 MiB (the unsplit block) + 14 MiB + 614,400 = 36 MiB + 615,424.
    sequence = _sequence([
        (ALLOC, 0, 1000, 0), (ALLOC, 1, 5 * MIB, 0), (ALLOC, 2, 12 * MIB + 1, 0), (FREE, 1, 0, 0),
        (ALLOC, 3, 8 * MIB, 0), (ALLOC, 4, 13 * MIB, 0), (FREE, 2, 0, 0), (ALLOC, 5, 14 * MIB, 0),
        (ALLOC, 6, 600 * 1024, 0),
    ])
    reserved = predict_reserved(sequence)
    assert reserved.traced_bytes == 56 * MIB
    assert reserved.allocated_bytes == 36 * MIB + 1024 + 614_400
    assert reserved.segments == [[20 * MIB, 2], [14 * MIB, 1], [2 * MIB, 1]]
    assert reserved.low_bytes == reserved.high_bytes == reserved.traced_bytes


# --------------------------------------------------------------------------- 5. serialisation


def test_a_reserved_range_survives_json():
    sequence = _sequence([
        (ALLOC, 0, 2342 * MIB, 0), (FREE, 0, 0, 0), (ALLOC, 1, 32 * MIB, 0), (ALLOC, 2, 2342 * MIB, 0),
    ], modelled={1})
    reserved = predict_reserved(sequence)
    assert reserved.why is not None and reserved.variants == 2  # every field holds something
    assert ReservedRange.from_dict(json.loads(json.dumps(reserved.to_dict()))) == reserved


# --------------------------------------------------------------------------- 6. the seed on the H200

#: Measured on an H200 (8 steps per cell, eager attention, torch 2.11): the CUDA context
#: NVML shows before any tensor, and each cell's NVML peak, in MiB. These are memory figures
#: the card reported, which the CPU-side model is checked against, not timings.
H200_CONTEXT_MIB = 742
H200_NVML_PEAK_MIB = {"baseline": 14_039, "1": 11_325, "3": 14_100, "4": 7_567}
H200_LORA_NVML_PEAK_MIB = 13_435


@pytest.mark.slow
def test_the_seed_cells_reserved_plus_the_context_match_the_h200s_nvml_peaks(cache_dir: Path):
    config = apply_overrides(load_preset("seed"), [f"data.cache_dir={cache_dir}"])
    inputs, target = trace_inputs(config), trace_target()

    def predicted(cell: str) -> ReservedRange:
        traced = trace_cell(parse_cell(cell), config, inputs, target)
        assert traced.allocations is not None
        return predict_reserved(traced.allocations)

    for cell, measured in H200_NVML_PEAK_MIB.items():
        nvml = predicted(cell).traced_bytes / MIB + H200_CONTEXT_MIB
        assert nvml == pytest.approx(measured, rel=0.03), cell
    lora = predicted("lora")
    low, high = lora.low_bytes / MIB + H200_CONTEXT_MIB, lora.high_bytes / MIB + H200_CONTEXT_MIB
    assert low <= H200_LORA_NVML_PEAK_MIB <= high
    assert lora.why is not None and "2,342 MiB" in lora.why


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the model with the real CUDA allocator: needs a CUDA device")
def test_the_model_replays_a_real_cuda_steps_reserved_bytes():
    # A small MLP's training step on a real card, its allocations recorded as the trace records
    # them, replayed through the model: the reserved growth must match torch's own figure.
    from gputech_bench.estimator.allocator import CachingAllocatorModel

    device = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    # Both threads' cuBLAS workspaces exist before the recorded step, so neither is in its growth.
    model(torch.randn(8, 1024, device=device)).sum().backward()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    model(torch.randn(8, 1024, device=device)).sum().backward()  # workspaces again, if empty_cache freed them
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    recorder = AllocationRecorder(device, WORKSPACE)
    with recorder:
        for _ in range(2):
            loss = model(torch.randn(512, 1024, device=device)).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_reserved(device) - before
    sequence = recorder.sequence()
    replay = CachingAllocatorModel()
    handles: dict[int, int] = {}
    for kind, handle, size, stream in sequence.events:
        if handle in sequence.modelled:
            continue  # the workspaces were made before the step
        if kind == ALLOC:
            handles[handle] = replay.malloc(size, stream)
        elif handle in handles:
            replay.free(handles.pop(handle))
    # The model's cache starts empty; the real one holds the parameters' segments, whose only
    # free room is what the biases left in their 2 MiB small-pool segments: at most two of
    # those small segments apart.
    assert abs(replay.peak_reserved_bytes - measured) <= 4 * MIB, (replay.peak_reserved_bytes, measured)


def test_a_modelled_figure_carries_its_proxys_replayed_reserve(tiny_dropout):
    # paged-adam8bit is modelled around a trace of 3: the allocator's bytes beyond the tensors,
    # replayed on 3's trace, sit on top of the modelled tensor peak, and the figure says so.
    from gputech_bench.estimator.predict import Setup, predict

    config, _ = tiny_dropout
    proxy, paged = predict([Setup("3"), Setup("paged-adam8bit")], config)
    assert proxy.reserved is not None and paged.reserved is not None
    assert paged.device.total_bytes < proxy.device.total_bytes  # its state went to the host side
    over_proxy = proxy.reserved.traced_bytes - proxy.device.total_bytes
    assert paged.reserved.traced_bytes - paged.device.total_bytes == over_proxy
    assert paged.reserved.high_bytes - paged.reserved.low_bytes == proxy.reserved.high_bytes - proxy.reserved.low_bytes
    assert "proxy '3'" in paged.reserved.workspaces


def test_fit_judges_the_upper_end_and_a_stopped_trace_by_its_tensors_and_the_context():
    from gputech_bench.estimator.fit import device_range, tensor_limit
    from gputech_bench.estimator.overheads import DEFAULTS
    from gputech_bench.estimator.predict import Prediction, Setup
    from gputech_bench.measure.tracker import TrackedPeak

    context = DEFAULTS.context_bytes
    ranged = ReservedRange(110 * MIB, 110 * MIB, 3000 * MIB, 100 * MIB, [], "", "", "one segment more", 2)
    replayed = Prediction(Setup("lora"), TrackedPeak("meta", 100 * MIB, {}), None, 0.0, {}, reserved=ranged)
    assert device_range(DEFAULTS, replayed) == (110 * MIB + context, 3000 * MIB + context)
    stopped = Prediction(Setup("baseline"), TrackedPeak("meta", 900 * MIB, {}), None, 0.0, {}, stopped=True)
    assert device_range(DEFAULTS, stopped) == (900 * MIB + context, 900 * MIB + context)
    # A trace may stop only where no reserve could bring it back under the budget.
    assert tensor_limit(4096 * MIB, DEFAULTS) == 4096 * MIB - context
