"""The comparison table from stored results: one frame, four renderings, honest about failures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import assert_one_line_error, cpu_run, invoke, make_result, write_run

from gputech_bench.errors import ResultError
from gputech_bench.report.export import render
from gputech_bench.report.frame import COLUMNS, CPU_MEASURE, NVML_MEASURE, RESERVED_MEASURE, build_frame
from gputech_bench.report.table import extremes, markdown
from gputech_bench.results import load_run


def test_frame_compares_against_the_baseline_and_blanks_failed_cells():
    frame, measure = build_frame(cpu_run())
    assert measure == CPU_MEASURE
    assert list(frame.columns) == list(COLUMNS)
    one = frame.set_index("cell").loc["1"]
    assert one.memory_mib == 60.0 and one.memory_x_baseline == pytest.approx(0.6)
    assert one.epoch_x_baseline == pytest.approx(1.3)
    assert one.masked_accuracy_delta_points == pytest.approx(1.0)
    failed = frame.set_index("cell").loc["4"]
    assert failed.status == "oom" and math.isnan(failed.memory_mib)  # partial figures are not compared


def test_cuda_headline_is_nvml_and_falls_back_to_reserved():
    with_nvml = [make_result("baseline", "ok", "cuda", nvml_process_peak_mib=22000.0, peak_reserved_mib=21000.0, peak_allocated_mib=18000.0)]
    frame, measure = build_frame(with_nvml)
    assert measure == NVML_MEASURE and frame.memory_mib[0] == 22000.0
    without = [make_result("baseline", "ok", "cuda", nvml_process_peak_mib=None, peak_reserved_mib=21000.0)]
    frame, measure = build_frame(without)
    assert measure == RESERVED_MEASURE and frame.memory_mib[0] == 21000.0
    # allocated, reserved and NVML travel side by side in CSV/JSON
    row = build_frame(with_nvml)[0].iloc[0]
    assert (row.peak_allocated_mib, row.peak_reserved_mib, row.nvml_process_peak_mib) == (18000.0, 21000.0, 22000.0)


def test_best_and_worst_follow_each_columns_direction():
    frame, _ = build_frame(cpu_run())
    assert extremes(frame, "memory_mib") == (60.0, 100.0)  # lower is better, failed row ignored
    assert extremes(frame, "eval_masked_accuracy") == (0.41, 0.40)  # higher is better


def test_markdown_names_the_baseline_figures_in_its_headers():
    results = [make_result("baseline", "ok", "cuda", nvml_process_peak_mib=22528.0, epoch_seconds=110.0,
                           eval_masked_accuracy=0.5, eval_token_accuracy=0.89, peak_allocated_mib=20480.0),
               make_result("2", "ok", "cuda", nvml_process_peak_mib=9728.0, epoch_seconds=180.0,
                           eval_masked_accuracy=0.5, eval_token_accuracy=0.89, peak_allocated_mib=8192.0)]
    frame, measure = build_frame(results)
    text = markdown(frame, measure, results)
    assert "GPU memory (NVML) (baseline: 22.00 GiB)" in text
    assert "time / epoch (baseline: 110.0 s)" in text
    # On CUDA the allocated peak stands beside the NVML column.
    assert "| allocated (baseline: 20.00 GiB) |" in text
    assert "| 2 (accumulation) | 9.50 GiB (0.43x) | 8.00 GiB | 180.0 s (1.64x) | 50.0% (+0.0) | 89.0% | ok |" in text
    assert "NVIDIA A30 (24.0 GiB, CUDA 12.4)" in text


def test_a_corrupt_or_foreign_file_is_named_and_skipped(tmp_path: Path):
    write_run(tmp_path, cpu_run())
    (tmp_path / "1+2.json").write_text('{"status": "ok", "cel')  # cut short
    (tmp_path / "notes.json").write_text(json.dumps({"hello": "world"}))
    run = load_run(tmp_path)
    assert [r.cell for r in run.results] == ["baseline", "1", "4"]
    assert len(run.problems) == 2
    assert any("1+2.json" in p and "not a readable JSON result" in p for p in run.problems)
    assert any("notes.json" in p and "not a gputech-bench cell result" in p for p in run.problems)


def test_a_folder_without_results_is_an_error(tmp_path: Path):
    with pytest.raises(ResultError, match="no cell results"):
        load_run(tmp_path)
    with pytest.raises(ResultError, match="is not a run folder"):
        load_run(tmp_path / "missing")


def test_json_rendering_has_nulls_not_nans(tmp_path: Path):
    run = load_run(write_run(tmp_path, cpu_run()))
    payload = json.loads(render(run, "json"))
    oom = next(row for row in payload["rows"] if row["cell"] == "4")
    assert oom["memory_mib"] is None and oom["status"] == "oom"


def test_report_command_renders_every_format_and_warns_about_skipped_files(tmp_path: Path):
    run_dir = write_run(tmp_path / "run", cpu_run())
    (run_dir / "garbage.json").write_text("not json at all")
    out = invoke("report", str(run_dir), "--format", "csv")
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines()[0].startswith("cell,strategies,status,reason,repeats,memory_mib")
    assert "garbage.json" in out.stderr and "Traceback" not in out.stderr
    out = invoke("report", str(run_dir), "--format", "md", "--output", str(tmp_path / "t.md"), "--baseline", "1")
    assert out.exit_code == 0 and "(1: 60.0 MiB)" in (tmp_path / "t.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["report", "EMPTY"], "no cell results in", id="empty-folder"),
        pytest.param(["report", "RUN", "--baseline", "7"], "baseline cell '7' is not in", id="unknown-baseline"),
        pytest.param(["report", "RUN", "--format", "xml"], "unknown format 'xml'", id="unknown-format"),
        pytest.param(["report", "CORRUPT"], "no cell results in 'CORRUPT'", id="corrupt-result"),
    ],
)
def test_report_bad_input_is_one_line(tmp_path: Path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").mkdir()
    write_run(tmp_path / "RUN", cpu_run())
    (tmp_path / "CORRUPT").mkdir()
    (tmp_path / "CORRUPT" / "baseline.json").write_text("{ not json")
    out = invoke(*args)
    assert_one_line_error(out.exit_code, out.stderr, message)
