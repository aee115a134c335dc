"""The CUDA caching allocator's settings and segments: ``run --allocator`` merged into every
cell's environment, recorded in every result, named under the tables and warned about by
``compare``; the reserved segments read at the end of training, and the note that says when a
cell's reserve is the allocator's caching rather than tensors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import CommandLauncher, invoke, make_result, run_request, write_run

from gputech_bench.api import _run as api_run
from gputech_bench.cli.common import OutputConsole, print_table
from gputech_bench.cli.tables import results_table
from gputech_bench.measure.allocator import (
    ALLOC_CONF_ENV,
    ALLOCATOR_OPTION_ENV,
    NOT_RECORDED,
    caching_excess,
    cell_environment,
    describe,
    merge_conf,
    recorded_setting,
    segment_sizes,
    split_options,
)
from gputech_bench.report.compare import compare_runs
from gputech_bench.report.export import render
from gputech_bench.report.frame import build_frame
from gputech_bench.report.table import table_notes
from gputech_bench.results import CellResult, RunFolder, load_run
from gputech_bench.run import runner
from gputech_bench.run.launcher import FreshInterpreter, Torchrun, WorkerCall

FIXTURES = Path(__file__).parent / "fixtures" / "plots"
GIB = 1024.0

# --------------------------------------------------------------------------- the conf


@pytest.mark.parametrize("inherited, expected", [
    (None, "expandable_segments:True"),
    ("", "expandable_segments:True"),
    ("max_split_size_mb:128", "max_split_size_mb:128,expandable_segments:True"),
    ("expandable_segments:False,garbage_collection_threshold:0.6", "garbage_collection_threshold:0.6,expandable_segments:True"),
    ("roundup_power2_divisions:[256:1,512:2], expandable_segments:True",
     "roundup_power2_divisions:[256:1,512:2],expandable_segments:True"),
])
def test_expandable_replaces_or_adds_its_key_and_keeps_the_users_other_options(inherited, expected):
    assert merge_conf(inherited, "expandable") == expected


def test_default_leaves_the_inherited_conf_alone_and_an_unknown_choice_is_refused():
    assert merge_conf("max_split_size_mb:64", "default") == "max_split_size_mb:64"
    assert merge_conf(None, "default") is None
    assert cell_environment("default", {ALLOC_CONF_ENV: "max_split_size_mb:64"}) == {}
    with pytest.raises(ValueError, match="unknown --allocator 'huge'"):
        merge_conf(None, "huge")
    assert split_options("a:1,b:[1,2],,c:3") == ["a:1", "b:[1,2]", "c:3"]


def test_what_a_cell_records_says_the_conf_the_option_and_what_it_inherited():
    assert recorded_setting({}) == {"conf": None, "option": "default", "inherited": None}
    assert describe(recorded_setting({})) == "PyTorch's default (PYTORCH_CUDA_ALLOC_CONF unset)"
    inherited = {ALLOC_CONF_ENV: "max_split_size_mb:128"}
    assert describe(recorded_setting(inherited)) == \
        "PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:128 (inherited from the environment)"
    alone = recorded_setting(cell_environment("expandable", {}))
    assert describe(alone) == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (set by --allocator expandable)"
    merged = recorded_setting(cell_environment("expandable", inherited))
    assert merged == {"conf": "max_split_size_mb:128,expandable_segments:True", "option": "expandable",
                      "inherited": "max_split_size_mb:128"}
    assert describe(merged) == ("PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:128,expandable_segments:True "
                                "(set by --allocator expandable, over the inherited PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:128)")
    assert describe(None) == NOT_RECORDED


# --------------------------------------------------------------------------- the cells' environment


def test_the_request_gives_every_cell_the_allocators_environment(tmp_path: Path):
    request = run_request(RunFolder(tmp_path / "run"))
    assert request.allocator == "default" and request.cell_environment({ALLOC_CONF_ENV: "x:1"}) == {}
    expandable = run_request(RunFolder(tmp_path / "run"))
    object.__setattr__(expandable, "allocator", "expandable")
    environment = expandable.cell_environment({ALLOC_CONF_ENV: "max_split_size_mb:32"})
    assert environment[ALLOC_CONF_ENV] == "max_split_size_mb:32,expandable_segments:True"
    assert json.loads(environment[ALLOCATOR_OPTION_ENV]) == {"option": "expandable", "inherited": "max_split_size_mb:32"}
    with pytest.raises(ValueError, match="unknown --allocator"):
        type(request)(request.config, request.cells, request.placement, request.schedule, request.folder, "huge")
    # torchrun's launcher starts its process as a fresh interpreter does: with the call's environment.
    assert Torchrun.start is FreshInterpreter.start


#: Writes the allocator's variables it was started with beside its result, then exits.
_ENV_WORKER = ("import json, os, sys; json.dump({k: os.environ.get(k) for k in sys.argv[2:]}, "
               "open(sys.argv[1] + '.env', 'w'))")


def test_a_cells_fresh_interpreter_gets_the_requests_allocator_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ALLOC_CONF_ENV, "max_split_size_mb:256")
    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir()
    request = run_request(folder, ("baseline",))
    object.__setattr__(request, "allocator", "expandable")

    def command(call: WorkerCall) -> list[str]:
        return [sys.executable, "-c", _ENV_WORKER, str(call.out), ALLOC_CONF_ENV, ALLOCATOR_OPTION_ENV]

    runner.run_cells(request, CommandLauncher(command))
    seen = json.loads(Path(f"{folder.result_path('baseline')}.env").read_text())
    assert seen[ALLOC_CONF_ENV] == "max_split_size_mb:256,expandable_segments:True"
    assert recorded_setting(seen)["option"] == "expandable"


# --------------------------------------------------------------------------- the result and the tables


def cuda_result(cell: str, allocated: float, reserved: float, segments: list[list[float]] | None,
                allocator: dict | None = None) -> CellResult:
    metrics = {"peak_allocated_mib": allocated, "peak_reserved_mib": reserved, "nvml_process_peak_mib": reserved + 500,
               "epoch_seconds": 10.0, "eval_masked_accuracy": 0.4, "eval_token_accuracy": 0.9}
    if segments is not None:
        metrics |= {"reserved_segments": segments, "largest_segment_mib": segments[0][0]}
    result = make_result(cell, device="cuda", **metrics)
    result.allocator = allocator
    return result


def test_the_allocator_field_round_trips_and_an_old_file_without_it_still_loads(tmp_path: Path):
    setting = recorded_setting(cell_environment("expandable", {}))
    result = cuda_result("baseline", 9000.0, 9500.0, [[2342.0, 3], [20.0, 4]], setting)
    again = CellResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.allocator == setting and again.value("reserved_segments") == [[2342.0, 3], [20.0, 4]]
    assert "allocator" not in again.extra
    old = result.to_dict()
    del old["allocator"]
    assert CellResult.from_dict(old).allocator is None
    write_run(tmp_path / "old", [CellResult.from_dict(old)])
    text = render(load_run(tmp_path / "old"), "md")
    assert f"- allocator: {NOT_RECORDED}" in text


def test_the_caching_note_names_a_reserve_above_allocated_by_more_than_the_largest_segment():
    segments = [[2342.0, 4], [440.0, 1], [2.0, 7]]
    caching = cuda_result("lora", 9423.0, 12693.0, segments)  # 3,270 MiB above: more than 2,342
    tensors = cuda_result("baseline", 11000.0, 12693.0, segments)  # 1,693 MiB above: within one segment
    assert caching_excess(9423.0, 12693.0, 2342.0) == 3270.0 and caching_excess(11000.0, 12693.0, 2342.0) is None
    frame, _ = build_frame([tensors, caching])
    notes = table_notes(frame)
    assert ("lora: reserved 12,693 MiB is 3,270 MiB above allocated 9,423 MiB, more than its largest segment "
            "(2,342 MiB): allocator caching, not tensors (segments: 4 x 2,342 MiB, 1 x 440 MiB, 7 x 2.0 MiB); "
            "compare strategies on allocated") in notes
    assert not any(note.startswith("baseline:") for note in notes)
    assert "allocator: not recorded (results written before the allocator setting was recorded)" in notes


def test_the_allocator_is_named_under_a_cuda_table_and_on_cpu_only_when_set():
    expandable = recorded_setting(cell_environment("expandable", {}))
    frame, _ = build_frame([cuda_result("baseline", 1.0, 2.0, [[2.0, 1]], recorded_setting({}))])
    assert "allocator: PyTorch's default (PYTORCH_CUDA_ALLOC_CONF unset)" in table_notes(frame)
    cpu = make_result("baseline", tracked_peak_mib=10.0, epoch_seconds=1.0)
    cpu.allocator = recorded_setting({})
    assert not any(note.startswith("allocator") for note in table_notes(build_frame([cpu])[0]))
    cpu.allocator = expandable
    assert ("allocator: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (set by --allocator expandable); "
            "no effect on CPU") in table_notes(build_frame([cpu])[0])
    mixed = [cuda_result("baseline", 1.0, 2.0, [[2.0, 1]], recorded_setting({})),
             cuda_result("lora", 1.0, 2.0, [[2.0, 1]], expandable)]
    (line,) = [note for note in table_notes(build_frame(mixed)[0]) if note.startswith("allocator")]
    assert line.startswith("allocator settings differ between cells") and "lora" in line


def test_every_cuda_table_shows_allocated_beside_nvml():
    results = load_run(FIXTURES / "cuda").results
    frame, measure = build_frame(results)
    out = OutputConsole(file=__import__("io").StringIO(), width=200, color_system=None)
    print_table(results_table(frame, measure), out=out)
    text = out.file.getvalue()
    header = next(line for line in text.splitlines() if "GPU memory (NVML)" in line)
    assert "allocated" in header
    for cell, shown in (("baseline", "12.09 GiB"), ("1", "5.16 GiB"), ("1+2+3", "3.22 GiB")):
        assert shown in next(line for line in text.splitlines() if line.lstrip("│ ").startswith(f"{cell} ")), cell
    markdown = render(load_run(FIXTURES / "cuda"), "md")
    assert "| allocated (baseline: 12.09 GiB) |" in markdown and "| 12.09 GiB |" in markdown
    html = render(load_run(FIXTURES / "cuda"), "html")
    assert "<th>allocated</th>" in html
    cpu = render(load_run(FIXTURES / "cpu"), "md")
    assert "allocated" not in cpu.splitlines()[0]


def test_compare_warns_when_two_cuda_runs_differ_in_their_allocator(tmp_path: Path):
    default, expandable = recorded_setting({}), recorded_setting(cell_environment("expandable", {}))
    write_run(tmp_path / "a", [cuda_result("baseline", 1.0, 2.0, [[2.0, 1]], default)])
    write_run(tmp_path / "b", [cuda_result("baseline", 1.0, 2.0, [[2.0, 1]], expandable)])
    write_run(tmp_path / "c", [cuda_result("baseline", 1.0, 2.0, [[2.0, 1]], default)])
    (warning,) = [w for w in compare_runs(load_run(tmp_path / "a"), load_run(tmp_path / "b")).warnings
                  if w.startswith("allocator settings differ")]
    assert "PyTorch's default" in warning and "expandable_segments:True" in warning and "allocated" in warning
    same = compare_runs(load_run(tmp_path / "a"), load_run(tmp_path / "c")).warnings
    assert not any(w.startswith("allocator") for w in same)


def test_compare_of_cuda_runs_shows_allocated_beside_memory(tmp_path: Path):
    from gputech_bench.report.compare import comparison_rows, headers

    write_run(tmp_path / "a", [cuda_result("baseline", 9000.0, 12000.0, [[2342.0, 1]])])
    write_run(tmp_path / "b", [cuda_result("baseline", 8000.0, 12000.0, [[2342.0, 1]])])
    comparison = compare_runs(load_run(tmp_path / "a"), load_run(tmp_path / "b"))
    assert headers(comparison)[1:7] == ["memory A", "memory B", "B/A", "alloc A", "alloc B", "B/A"]
    assert comparison_rows(comparison)[0][4:7] == ["8.79 GiB", "7.81 GiB", "0.89x"]
    cpu = compare_runs(load_run(FIXTURES / "cpu"), load_run(FIXTURES / "cpu"))
    assert "alloc A" not in headers(cpu)


def test_segment_sizes_group_a_snapshots_segments_largest_first():
    snapshot = [{"total_size": 2 << 20}, {"total_size": 2342 << 20}, {"total_size": 2 << 20}, {"total_size": 20 << 20}]
    assert segment_sizes(snapshot) == [[2342.0, 1], [20.0, 1], [2.0, 2]]


# --------------------------------------------------------------------------- the command line


def test_run_lists_the_allocator_option_and_refuses_an_unknown_one():
    shown = invoke("run", "--help").output
    assert "--allocator" in shown and "--allocator expandable" in shown
    refused = invoke("run", "--strategies", "1", "--device", "cpu", "--allocator", "huge", "--no-estimate")
    assert refused.exit_code != 0 and "unknown --allocator 'huge'" in refused.output


def test_allocator_on_cpu_is_accepted_recorded_and_noticed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    seen = {}

    def execute(request, **kwargs):
        seen["request"] = request
        raise SystemExit(0)

    monkeypatch.setattr(api_run, "execute", execute)
    monkeypatch.delenv(ALLOC_CONF_ENV, raising=False)
    result = invoke("run", "--strategies", "1", "--device", "cpu", "--allocator", "expandable", "--results",
                    str(tmp_path), "--no-estimate")
    assert "--allocator has no effect on CPU" in result.output.replace("\n", " ")
    request = seen["request"]
    assert request.allocator == "expandable"
    assert request.cell_environment(os.environ)[ALLOC_CONF_ENV] == "expandable_segments:True"


# --------------------------------------------------------------------------- on a GPU


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _has_cuda(), reason="reads the CUDA allocator's segments: needs a CUDA device")
def test_a_tiny_cuda_runs_segments_sum_to_its_reserved_bytes(tiny_config):
    import torch

    from gputech_bench.config import apply_overrides
    from gputech_bench.units import MIB
    from gputech_bench.worker.cell import new_result, run_cell

    config = apply_overrides(tiny_config, ["device=cuda"])
    result = run_cell("baseline", config, new_result("baseline", config))
    segments = result.value("reserved_segments")
    assert segments and result.value("largest_segment_mib") == segments[0][0]
    assert [size for size, _ in segments] == sorted((size for size, _ in segments), reverse=True)
    # Read at the end of training, where nothing has emptied the cache: the reserve is still its peak.
    assert "equals the peak reserved" in result.method("reserved_segments")
    reserved = result.value("peak_reserved_mib")
    assert sum(size * count for size, count in segments) == pytest.approx(reserved, abs=0.01)
    assert torch.cuda.max_memory_reserved() / MIB >= reserved
    assert result.allocator is not None and result.allocator["option"] == "default"
