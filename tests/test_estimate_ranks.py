"""estimate and fit per rank: one rank traced in a fake process group of N (issue 24).

fsdp's state per rank is its DTensor shards, counted exactly (FSDP's padding included); a
replicated cell (DDP) holds the whole state and its gradient buckets; real gloo runs of 2 and
4 ranks measure each rank within 5% of the prediction.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from helpers import TINY_RUN, assert_one_line_error, invoke

from gputech_bench.config import apply_overrides, load_preset, to_dict
from gputech_bench.estimator.fit import candidates
from gputech_bench.estimator.predict import Prediction, Setup, _trace_in_worker
from gputech_bench.estimator.trace import trace_cell, trace_inputs, trace_target
from gputech_bench.modeling import build_shape_model
from gputech_bench.results import read_result
from gputech_bench.strategies import parse_cell

MIB = 2**20


@pytest.fixture(scope="module")
def tiny(cache_dir: Path):
    # No dropout: a CPU run keeps a noise tensor for it where the trace follows CUDA's mask.
    config = apply_overrides(load_preset("cpu"), TINY_RUN + [f"data.cache_dir={cache_dir}", "model.dropout=0.0",
                                                             "train.max_steps=2"])
    return config, trace_inputs(config)


def shard_elements(config, inputs, world_size: int) -> tuple[int, int, int]:
    """(parameters, rank 0's padded shard elements, parameter tensors) of the tiny model. FSDP2
    splits each parameter on dim 0 into ``world_size`` chunks of ceil(rows / N) rows (the last
    ones padded): rank 0's chunk is the first, always full."""
    model = build_shape_model(config.model, inputs.tokenizer_size, inputs.pad_token_id, config.train.seed)
    params = list(model.parameters())
    shard = sum(math.ceil(p.shape[0] / world_size) * (p.numel() // p.shape[0]) for p in params)
    return sum(p.numel() for p in params), shard, len(params)


def test_fsdp_state_per_rank_is_16_bytes_a_parameter_over_the_ranks(tiny):
    config, inputs = tiny
    world = 4
    traced = trace_cell(parse_cell("fsdp"), config, inputs, trace_target(), world_size=world)
    parameters, shard, tensors = shard_elements(config, inputs, world)
    at_peak, at_state = traced.device.by_category, traced.state
    # Exactly: fp32 shards of 4 bytes an element, the gradients' shards the same, AdamW's two
    # moments, and its step counter (one fp32 scalar a parameter tensor, unsharded).
    assert at_peak["parameters"] == 4 * shard
    assert at_state["gradients"] == 4 * shard
    assert at_peak["optimizer_state"] == 8 * shard + 4 * tensors
    state = at_peak["parameters"] + at_state["gradients"] + at_peak["optimizer_state"]
    assert state == 16 * shard + 4 * tensors
    # Against 16 x parameters / N: off by FSDP's padding (rank 0 holds whole rows) and the counters only.
    padding = shard - parameters / world
    assert padding >= 0
    assert state - 16 * parameters / world == pytest.approx(16 * padding + 4 * tensors)
    assert at_peak["optimizer_state"] - 4 * tensors == 8 * shard
    assert abs(at_peak["optimizer_state"] - 8 * parameters / world) <= 8 * padding + 4 * tensors
    # The gathered units are their own category, never in the shards'.
    assert at_peak["gathered"] > 0
    assert traced.facts["fsdp_world_size"] == world
    assert not dist.is_initialized()  # the fake group is torn down


def test_a_replicated_cell_holds_the_whole_state_and_ddp_buckets_on_a_share_of_the_batch(tiny):
    config, inputs = tiny
    one = trace_cell(parse_cell("baseline"), config, inputs, trace_target())
    four = trace_cell(parse_cell("baseline"), config, inputs, trace_target(), world_size=4)
    parameters, _, _ = shard_elements(config, inputs, 1)
    assert four.device.by_category["parameters"] == one.device.by_category["parameters"] == 4 * parameters
    assert four.device.by_category["gradient_buckets"] == 4 * parameters
    assert "gradient_buckets" not in one.device.by_category
    # A quarter of the batch: a quarter of the activations.
    assert four.device.by_category["activations"] == pytest.approx(one.device.by_category["activations"] / 4, rel=0.05)
    assert not dist.is_initialized()


def test_fit_weighs_fsdp_only_over_several_ranks(tiny):
    config, _ = tiny
    alone = {setup.cell for setup in candidates(config)}
    eight = candidates(config, world_size=8)
    assert "fsdp" not in alone and "fsdp-offload" in alone
    assert {"fsdp", "fsdp-offload", "baseline", "1+fsdp"} <= {setup.cell for setup in eight}
    assert {setup.world_size for setup in eight} == {8}
    assert "fsdp+fsdp-offload" not in {setup.cell for setup in eight}


@pytest.mark.parametrize("option", [("--nproc-per-node", "0"), ("--nnodes", "-2")])
def test_ranks_must_be_positive_in_one_line(option):
    for command in (["estimate", "--preset", "cpu"], ["fit", "--budget", "1GiB", "--preset", "cpu"]):
        result = invoke(*command, *option)
        assert result.exit_code != 0
        assert_one_line_error(result.exit_code, result.output, option[0], "positive whole number")


# --------------------------------------------------------------------------- real gloo ranks


def run_ranks(tmp_path: Path, cache_dir: Path, ranks: int) -> Path:
    name = f"ranks{ranks}"
    args = ["run", "--preset", "cpu", "--no-estimate", "--strategies", "fsdp", "--run-name", name,
            "--results", str(tmp_path), "--nproc-per-node", str(ranks)]
    for override in [*TINY_RUN, f"data.cache_dir={cache_dir}", "train.max_steps=2", "model.dropout=0.0"]:
        args += ["--set", override]
    process = subprocess.run([sys.executable, "-m", "gputech_bench", *args], cwd=tmp_path, capture_output=True,
                             text=True, env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}, timeout=600)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-2000:]
    return tmp_path / name


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_each_gloo_rank_measures_within_5_percent_of_the_per_rank_prediction(tmp_path: Path, cache_dir: Path, tiny,
                                                                              ranks: int):
    config, inputs = tiny
    started = time.perf_counter()
    folder = run_ranks(tmp_path, cache_dir, ranks)
    for cell in ("baseline", "fsdp"):
        predicted = trace_cell(parse_cell(cell), config, inputs, trace_target(), world_size=ranks).device.total_bytes
        merged = read_result(folder / f"{cell}.json")
        assert merged.status == "ok", merged.reason
        assert merged.distributed["world_size"] == ranks
        for rank in range(ranks):
            measured = read_result(folder / "ranks" / f"{cell}.rank{rank}.json").value("tracked_peak_mib") * MIB
            assert predicted == pytest.approx(measured, rel=0.05), (cell, rank, predicted / MIB, measured / MIB)
    compared = invoke("estimate", "--compare", str(folder), "--jobs", "1", "--format", "md")
    assert compared.exit_code == 0, compared.output
    assert f"per rank of {ranks}" in compared.output
    rows = [line for line in compared.output.splitlines() if line.startswith(("| baseline", "| fsdp"))]
    assert len(rows) == 2
    for row in rows:
        error = float(row.rstrip(" |").rsplit("|", 1)[1].strip().rstrip("%"))
        assert abs(error) < 5, row
    print(f"{ranks} ranks: {time.perf_counter() - started:.0f} s")


def live_peak(sequence) -> int:
    """The largest sum of allocated, not yet freed sizes in a recorded sequence (workspaces left out)."""
    live: dict[int, int] = {}
    current = peak = 0
    for kind, handle, size, _stream in sequence.events:
        if handle in sequence.modelled:
            continue
        if kind == "alloc":
            live[handle] = size
            current += size
            peak = max(peak, current)
        else:
            current -= live.pop(handle, 0)
    return peak


@pytest.mark.parametrize("cell", ["fsdp", "1+fsdp"])
def test_a_sharded_cells_recorded_allocations_free_what_fsdp_frees(tiny, cell):
    # FSDP frees a gathered unit by emptying its storage in place (UntypedStorage.resize_(0)),
    # and a DTensor is a wrapper whose global-shape storage holds nothing: the allocator model's
    # sequence must follow both, or every gathered unit stays allocated for the whole run and
    # every shard counts at its full size. Its live peak is then the tracker's tensor peak.
    config, inputs = tiny
    traced = trace_cell(parse_cell(cell), config, inputs, trace_target(), world_size=4)
    assert traced.allocations is not None and traced.allocations.resized > 0
    assert live_peak(traced.allocations) == pytest.approx(traced.device.total_bytes, rel=0.02)


def test_adam4bit_under_fsdp_quantises_each_ranks_shard_of_the_moments(tiny):
    # torchao quantises the local shard of a sharded parameter's moments: the model counts the
    # rank's shards (not the DTensor's global shape), on the device the sharded proxy runs on.
    config, inputs = tiny
    # Layers wide enough that each rank's shard of a matrix is quantised (4,096 values or more).
    config = apply_overrides(config, ["model.hidden_size=128", "model.intermediate_size=512"])
    world = 4
    data = to_dict(config)
    plain = Prediction.from_dict(_trace_in_worker(data, Setup("fsdp", None, world)))
    quantised = Prediction.from_dict(_trace_in_worker(data, Setup("adam4bit+fsdp", None, world)))
    assert quantised.error is None and quantised.source == "modelled"
    _, shard, _ = shard_elements(config, inputs, world)
    (device, state), = quantised.facts["modelled"]["optimizer_state"].items()
    assert device == plain.device.device
    assert state["adamw_bytes"] == 8 * shard  # AdamW's two fp32 moments of this rank's shards
    assert state["low_bit_bytes"] < state["adamw_bytes"] / 2
    moved = state["adamw_bytes"] - state["low_bit_bytes"]
    assert (plain.device.by_category["optimizer_state"] - quantised.device.by_category["optimizer_state"]) == moved
