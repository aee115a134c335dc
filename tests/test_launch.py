"""Launching cells: GPU slots (--gpus), torchrun's options, and merging the ranks' results."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import CommandLauncher, run_request, sleeping_worker, slept

from gputech_bench.errors import ConfigError
from gputech_bench.results import SCHEMA, CellResult, RunFolder, merge_ranks, read_result, write_result
from gputech_bench.run import runner
from gputech_bench.run.launch import Launch, gpu_slots, slot_environment
from gputech_bench.run.launcher import FreshInterpreter, Torchrun, WorkerCall
from gputech_bench.run.ranks import describe_launch, read_rank_results
from gputech_bench.run.slots import run_on_slots

# --------------------------------------------------------------------------- --gpus


@pytest.fixture()
def nothing_inherited(monkeypatch):
    """The runner's environment without CUDA_VISIBLE_DEVICES: --gpus names the machine's GPUs."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_gpus_become_slots_of_nproc_gpus_each(nothing_inherited):
    assert gpu_slots(None) == [None]
    assert gpu_slots("0,1,2,3") == [("0",), ("1",), ("2",), ("3",)]
    assert gpu_slots("0, 1,2,3", nproc_per_node=2) == [("0", "1"), ("2", "3")]
    uuid = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
    assert gpu_slots(uuid) == [(uuid,)]


@pytest.mark.parametrize("text, message", [
    ("0,,1", "not a list of GPU indices"),
    ("a,b", "not a list of GPU indices"),
    ("0,0", "names a GPU twice"),
    ("0,1,2", "does not divide"),
], ids=["empty-entry", "not-numbers", "twice", "not-divisible"])
def test_bad_gpu_lists_are_refused_with_the_fix(text, message, nothing_inherited):
    with pytest.raises(ConfigError, match=message):
        gpu_slots(text, nproc_per_node=2 if message == "does not divide" else 1)


def test_gpus_count_within_an_inherited_allocation(monkeypatch):
    # A scheduler gave the job GPUs 4-7: --gpus 0,1 are the first two of those, not GPUs 0 and 1.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert gpu_slots("0,1") == [("4",), ("5",)]
    assert gpu_slots("1,3") == [("5",), ("7",)]
    assert gpu_slots("0,1,2,3", nproc_per_node=2) == [("4", "5"), ("6", "7")]
    assert gpu_slots(None) == [None]  # the cell inherits the whole allocation
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa-1111,GPU-bbbb-2222")
    assert gpu_slots("1") == [("GPU-bbbb-2222",)]
    assert gpu_slots("GPU-AAAA-1111") == [("GPU-aaaa-1111",)]
    # The environment can also be passed in, rather than read from os.environ.
    assert gpu_slots("1", environ={"CUDA_VISIBLE_DEVICES": "6,7"}) == [("7",)]


def test_the_worker_environment_stays_inside_the_allocation(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    runner_environment = {"CUDA_VISIBLE_DEVICES": "4,5,6,7", "PATH": "/bin"}
    [slot, _] = gpu_slots("0,1")
    assert slot_environment(slot, runner_environment) == {"CUDA_VISIBLE_DEVICES": "4", "PATH": "/bin"}
    assert slot_environment(None, runner_environment) == runner_environment


@pytest.mark.parametrize("inherited, gpus, message", [
    ("4,5,6,7", "0,4", "--gpus 4 is outside the 4 GPU(s) that CUDA_VISIBLE_DEVICES=4,5,6,7 gives this run: "
                       "--gpus counts within that list, so pass indices 0..3"),
    ("GPU-aaaa-1111", "GPU-cccc-3333", "--gpus GPU-cccc-3333 is not among the GPUs that CUDA_VISIBLE_DEVICES=GPU-aaaa-1111 "
                                       "gives this run"),
    ("4,5", "0,GPU-aaaa-1111", "--gpus GPU-aaaa-1111 is not among the GPUs that CUDA_VISIBLE_DEVICES=4,5"),
    ("", "0", "CUDA_VISIBLE_DEVICES='' (no GPU) gives this run: drop --gpus, or unset CUDA_VISIBLE_DEVICES"),
    ("GPU-aaaa-1111", "0,GPU-aaaa-1111", "names a GPU of CUDA_VISIBLE_DEVICES=GPU-aaaa-1111 twice"),
], ids=["index-outside", "unknown-uuid", "uuid-outside", "empty-allocation", "uuid-twice"])
def test_gpus_outside_the_inherited_allocation_are_refused_in_one_line(inherited, gpus, message, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", inherited)
    with pytest.raises(ConfigError) as refused:
        gpu_slots(gpus)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_fake_devices_run_every_cell_once_and_never_two_on_one_device():
    cells = [f"cell{i}" for i in range(9)]
    slots = [("0",), ("1",), ("2",)]
    busy: dict[tuple[str, ...], str] = {}
    lock = threading.Lock()
    ran: list[tuple[str, tuple[str, ...]]] = []
    overlaps: list[str] = []

    def run_one(cell: str, slot: tuple[str, ...]) -> bool:
        with lock:
            if slot in busy:
                overlaps.append(f"{cell} started on GPU {slot} while {busy[slot]} ran there")
            busy[slot] = cell
        time.sleep(0.01 * (1 + len(cell) % 3))
        with lock:
            del busy[slot]
            ran.append((cell, slot))
        return True

    run_on_slots(cells, slots, run_one, threading.Event())
    assert sorted(cell for cell, _ in ran) == sorted(cells)  # each exactly once
    assert not overlaps
    assert {slot for _, slot in ran} == set(slots)  # all devices were used


def test_a_slot_that_fails_stops_the_others_and_the_error_reaches_the_caller():
    started: list[str] = []

    def run_one(cell: str, slot: str) -> bool:
        started.append(cell)
        if cell == "b":
            raise OSError("disk full")
        time.sleep(0.05)
        return True

    with pytest.raises(OSError, match="disk full"):
        run_on_slots(["a", "b", "c", "d", "e", "f"], ["x", "y"], run_one, threading.Event())
    assert len(started) < 6


FAKE_WORKER = """
import json, os, sys, time
out = sys.argv[sys.argv.index("--out") + 1]
cell = sys.argv[sys.argv.index("--cell") + 1]
start = time.monotonic()
time.sleep(0.3)
result = {"schema": "%s", "cell": cell, "status": "ok", "reason": None, "metrics": {}, "memory_breakdown": {},
          "notes": [], "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "span": [start, time.monotonic()]}
open(out, "w").write(json.dumps(result))
""" % SCHEMA


def test_the_runner_pins_each_cell_to_its_slot_and_keeps_the_table_order(tmp_path: Path, nothing_inherited):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    fake_worker = CommandLauncher(lambda call: [sys.executable, str(script), "--cell", call.cell, "--out", str(call.out)])
    cells = ["baseline", "1", "2", "3", "4", "1+2+3"]
    request = run_request(RunFolder(tmp_path / "run"), tuple(cells), slots=tuple(gpu_slots("0,1")))
    runner.prepare_run_dir(request)
    outcome = runner.run_cells(request, fake_worker)

    assert [result.cell for result in outcome.results] == cells
    assert {result.extra["gpu"] for result in outcome.results} == {"0", "1"}  # what the fake worker wrote
    spans = {gpu: sorted(result.extra["span"] for result in outcome.results if result.extra["gpu"] == gpu)
             for gpu in ("0", "1")}
    for gpu_spans in spans.values():
        assert all(earlier[1] <= later[0] for earlier, later in zip(gpu_spans, gpu_spans[1:])), gpu_spans
    # Two slots really ran at once: a cell on GPU 0 and one on GPU 1 were running at the same
    # moment (one system-wide monotonic clock). Not a bound on the wall time, which a loaded
    # machine (or pytest -n) can stretch past any threshold.
    assert any(a[0] < b[1] and b[0] < a[1] for a in spans["0"] for b in spans["1"]), spans


def test_ctrl_c_stops_every_running_slot_and_records_its_cell(tmp_path: Path, nothing_inherited, ctrl_c_raises):
    folder = RunFolder(tmp_path / "run")
    request = run_request(folder, ("baseline", "1", "2", "3"), slots=tuple(gpu_slots("0,1")))
    runner.prepare_run_dir(request)
    running: set[str] = set()
    lock = threading.Lock()

    def ctrl_c_once_both_slots_run(label: str, event: dict) -> None:
        with lock:
            running.add(label)
            if len(running) == 2:
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C at the terminal: to the process

    outcome = runner.run_cells(request, CommandLauncher(sleeping_worker), runner.Listeners(on_event=ctrl_c_once_both_slots_run))
    assert outcome.interrupted
    statuses = {result.cell: result.status for result in outcome.results}
    assert statuses == {"baseline": "interrupted", "1": "interrupted"}  # 2 and 3 never started
    assert read_result(folder.result_path("1")).status == "interrupted"
    assert not slept(folder.result_path("baseline")) and not slept(folder.result_path("1"))  # stopped, not waited for


# --------------------------------------------------------------------------- torchrun


def test_one_node_uses_a_private_rendezvous_and_several_pass_torchruns_options_through():
    call = WorkerCall("1", Path("c.json"), Path("o/1.json"), None)
    single = Torchrun(Launch(nproc_per_node=2)).command(call)
    assert single[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert single[single.index("--nproc-per-node") + 1] == "2"
    assert single[single.index("-m", 3):][:2] == ["-m", "gputech_bench.worker"]

    node = Launch(nproc_per_node=8, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500")
    command = Torchrun(node).command(call)
    for option, value in (("--nnodes", "2"), ("--node-rank", "1"), ("--rdzv-endpoint", "10.0.0.1:29500")):
        assert command[command.index(option) + 1] == value
    assert "--standalone" not in command
    assert FreshInterpreter().command(call)[1:3] == ["-m", "gputech_bench.worker"]


@pytest.mark.parametrize("launch, message", [
    (Launch(nnodes=2), "needs --rdzv-endpoint"),
    (Launch(nnodes=2, node_rank=2, rdzv_endpoint="h:1"), "outside 0..1"),
    (Launch(nproc_per_node=2, rdzv_endpoint="no-port"), "not HOST:PORT"),
], ids=["nnodes-without-endpoint", "node-rank-outside", "endpoint-without-port"])
def test_bad_torchrun_options_are_refused_with_the_fix(launch, message):
    with pytest.raises(ConfigError, match=message):
        launch.check()


def rank_result(rank: int, status: str = "ok", reason: str | None = None, **metrics: float) -> CellResult:
    return CellResult.from_dict({
        "schema": SCHEMA, "cell": "fsdp-offload", "status": status, "reason": reason, "memory_breakdown": {}, "notes": [],
        "rank": {"rank": rank, "world_size": 2},
        "metrics": {name: {"value": value, "unit": "MiB", "method": "m"} for name, value in metrics.items()}
        | {"samples_per_second": {"value": 10.0, "unit": "samples/s", "method": "samples / s"}},
    })


def test_merged_memory_is_the_largest_rank_with_mean_and_total_beside_it():
    launch = Launch(nproc_per_node=2)
    merged = merge_ranks(
        [rank_result(1, peak_allocated_mib=300.0), rank_result(0, peak_allocated_mib=100.0)], describe_launch(launch)
    )
    assert merged.status == "ok"
    assert merged.value("peak_allocated_mib") == 300.0
    assert merged.memory_per_rank["peak_allocated_mib"] == {
        "max": 300.0, "mean": 200.0, "total": 400.0, "by_rank": {"1": 300.0, "0": 100.0}}
    assert merged.distributed["world_size"] == 2
    assert [rank["rank"] for rank in merged.ranks] == [1, 0]
    assert "all 2 ranks" in merged.method("samples_per_second")
    assert merged.rank is None and "rank" not in merged.to_dict()


def test_the_rank_that_caused_a_failure_explains_the_cell(tmp_path: Path):
    launch = Launch(nproc_per_node=2)
    merged = merge_ranks(
        [rank_result(0, "interrupted", "stopped"), rank_result(1, "oom", "CUDA out of memory")], describe_launch(launch)
    )
    assert (merged.status, merged.reason) == ("oom", "rank 1: CUDA out of memory")

    folder = RunFolder(tmp_path)
    write_result(folder.rank_path("fsdp-offload", 0), rank_result(0))
    ranks = read_rank_results(folder, "fsdp-offload", launch)  # rank 1 left nothing
    assert [r.status for r in ranks] == ["ok", "crashed"]
    assert merge_ranks(ranks, describe_launch(launch)).reason.startswith("rank 1: left no result")
    assert json.loads(folder.rank_path("fsdp-offload", 0).read_text())["rank"]["rank"] == 0
