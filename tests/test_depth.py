"""fit's ranks of a deep model: two shallow traces, extrapolated moment by moment (issue 24).

A 70B rank's traced step costs seconds per block, so fit traces each setup at 3 and 4 blocks
and extrapolates (``estimator/depth.py``). These tests hold the extrapolation to whole traces
of deeper models, byte for byte, and show why the peak itself cannot be extrapolated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_estimate_llm import LLM_DATA, SMALL_LLAMA

from gputech_bench.config import apply_overrides, load_preset, to_dict
from gputech_bench.estimator.depth import Depth, depth_to_extrapolate, peak_of_moments
from gputech_bench.estimator.fit import candidates, not_searched
from gputech_bench.estimator.predict import Prediction, Setup, _trace_in_worker
from gputech_bench.estimator.reserved import ReservedRange
from gputech_bench.estimator.trace import trace_cell, trace_inputs, trace_target
from gputech_bench.modeling import model_depth
from gputech_bench.strategies import parse_cell

MIB = 2**20


def small_llama(folder: Path, cache_dir: Path, layers: int, *sets: str):
    (folder / "config.json").write_text(json.dumps({**SMALL_LLAMA, "num_hidden_layers": layers}))
    config = apply_overrides(load_preset("cpu"), [*LLM_DATA, f"model.pretrained={folder}",
                                                  f"data.cache_dir={cache_dir}", *sets])
    return config, trace_inputs(config)


def whole_and_extrapolated(config, inputs, cell: str, world_size: int):
    """The cell traced whole, and its peak extrapolated from traces at 3 and 4 blocks."""
    depth = Depth(model_depth(config.model))
    whole = trace_cell(parse_cell(cell), config, inputs, trace_target(), world_size=world_size)
    shallow, deep = (trace_cell(parse_cell(cell), depth.config(config, blocks), inputs, trace_target(),
                                world_size=world_size, moments=True) for blocks in depth.shallow)
    assert set(shallow.moments) == set(deep.moments)  # the same moments at either depth
    device = whole.device.device
    extrapolated = peak_of_moments(shallow.moments, deep.moments, device, depth.steps)
    return whole, shallow, deep, extrapolated


@pytest.fixture(scope="module")
def ten_blocks(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    # Batches of 4 rows a rank (16 over 4), in micro-batches of 2: accumulation has 2 to sum.
    return small_llama(tmp_path_factory.mktemp("ten-blocks"), cache_dir, 10, "train.batch_size=16",
                       "data.max_length=64")


@pytest.mark.parametrize("cell", ["fsdp", "1+2+fsdp", "fsdp+lora", "baseline"])
def test_each_moment_extrapolated_from_3_and_4_blocks_gives_the_whole_10_block_trace(ten_blocks, cell):
    config, inputs = ten_blocks
    whole, _, deep, extrapolated = whole_and_extrapolated(config, inputs, cell, world_size=4)
    # The moments cover the measured step: at 4 blocks their largest is the traced peak.
    assert peak_of_moments(deep.moments, deep.moments, deep.device.device, 0) == deep.device
    assert extrapolated is not None
    assert extrapolated.total_bytes == whole.device.total_bytes  # to the byte
    assert {k: v for k, v in extrapolated.by_category.items() if v} == {
        k: v for k, v in whole.device.by_category.items() if v}


def test_the_peaks_own_line_misses_a_deeper_model_that_peaks_at_another_moment(tmp_path: Path, cache_dir: Path):
    # Checkpointed, at 3 and 4 blocks the loss's logits top the step; at 40, every block's
    # gradients at the optimizer step do. A line through the two shallow peaks follows the
    # logits' moment and falls short; the moments, each on its own line, do not.
    config, inputs = small_llama(tmp_path, cache_dir, 40, "train.batch_size=8", "data.max_length=64")
    whole, shallow, deep, extrapolated = whole_and_extrapolated(config, inputs, "1", world_size=2)
    assert extrapolated is not None and extrapolated.total_bytes == whole.device.total_bytes
    steps = Depth(40).steps
    peaks_line = deep.device.total_bytes + steps * (deep.device.total_bytes - shallow.device.total_bytes)
    assert peaks_line < 0.95 * whole.device.total_bytes


def test_a_rank_of_a_deep_model_is_predicted_from_shallow_traces_as_fit_asks(ten_blocks):
    config, _ = ten_blocks
    setup = Setup("1+fsdp", None, 4)
    whole = Prediction.from_dict(_trace_in_worker(to_dict(config), setup))
    fast = Prediction.from_dict(_trace_in_worker(to_dict(config), setup, extrapolate=True))
    assert "depth" not in whole.facts
    assert fast.facts["depth"].startswith("traced at 3 and 4 blocks and extrapolated to 10")
    assert fast.device.total_bytes == whole.device.total_bytes
    # The reserve keeps the 4-block replay's bytes beyond the tensors, and says so.
    assert fast.reserved is not None and whole.reserved is not None
    assert fast.reserved.traced_bytes >= fast.device.total_bytes
    assert "replayed at 4 blocks" in (fast.reserved.why or "")
    # One rank is traced whole: extrapolation is for the ranks fit weighs.
    one = Prediction.from_dict(_trace_in_worker(to_dict(config), Setup("1", None, 1), extrapolate=True))
    assert "depth" not in one.facts


def test_models_of_fewer_than_8_blocks_are_traced_whole():
    assert depth_to_extrapolate(7) is None
    assert depth_to_extrapolate(8) == Depth(8)
    assert Depth(80).steps == 76


def test_fit_on_ranks_leaves_out_what_runs_on_one_rank_only(ten_blocks):
    config, _ = ten_blocks
    on_four = {setup.cell for setup in candidates(config, world_size=4)}
    assert not any("optimizer-in-backward" in cell for cell in on_four)
    assert any("optimizer-in-backward" in setup.cell for setup in candidates(config))
    assert not_searched(config, "meta", world_size=4)["optimizer-in-backward"].startswith("one rank only")


def test_a_replay_holding_more_than_the_traced_tensors_is_reconciled_to_them():
    replay = ReservedRange(100 * MIB, 90 * MIB, 110 * MIB, 80 * MIB, [], "default", "32 MiB")
    # Allocated 80 MiB = 50 MiB of tensors + 10 MiB of workspaces + 20 MiB the tracker never counted.
    fixed = replay.reconciled(50 * MIB, 10 * MIB)
    extra = 20 * MIB - (50 * MIB) // 100
    assert (fixed.traced_bytes, fixed.low_bytes, fixed.high_bytes) == (100 * MIB - extra, 90 * MIB - extra,
                                                                         110 * MIB - extra)
    assert "beyond the traced tensors" in (fixed.why or "")
    assert replay.reconciled(70 * MIB, 10 * MIB) is replay  # nothing beyond them: unchanged
