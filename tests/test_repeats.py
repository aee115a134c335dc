"""Repeated cells: round-robin jobs, aggregation into medians and statistics, and the
"within noise" marks the report draws from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_RUN, repeated, run_result

from gputech_bench.report.frame import build_frame
from gputech_bench.report.table import markdown
from gputech_bench.results import merge_repeats, read_result
from gputech_bench.run.runner import Job, plan_jobs
from gputech_bench.stats import HIGHER, LOWER, WITHIN_NOISE


def test_jobs_go_round_robin_so_drift_spreads_over_the_cells():
    jobs = plan_jobs(["baseline", "1"], repeats=3, seeds=[5, 6, 7])
    assert [(job.cell, job.repeat, job.seed) for job in jobs] == [
        ("baseline", 1, 5), ("1", 1, 5), ("baseline", 2, 6), ("1", 2, 6), ("baseline", 3, 7), ("1", 3, 7)]
    assert jobs[2].label == "baseline.rep2"
    assert plan_jobs(["baseline"]) == [Job("baseline")]


def test_a_cell_carries_the_medians_and_the_statistics_of_its_repeats():
    result = repeated("1", [3.0, 3.4, 3.1], 80.0, [0.04, 0.05, 0.06])
    assert result.status == "ok" and result.reason is None
    assert result.value("epoch_seconds") == 3.1
    assert result.method("epoch_seconds").endswith("median of 3 repeats")
    stats = result.repeats["statistics"]
    assert stats["epoch_seconds"]["values"] == [3.0, 3.4, 3.1]
    assert (stats["epoch_seconds"]["min"], stats["epoch_seconds"]["max"]) == (3.0, 3.4)
    assert "epoch_time_extrapolated" not in stats  # booleans are not statistics
    assert result.repeats["count"] == 3 and result.repeats["vary_seed"] is False


def test_a_failed_or_missing_repeat_is_the_cells_status_and_the_rest_is_kept():
    runs = [run_result("2", 3.0, 80.0, 0.05), run_result("2", 0, 0, 0, status="oom")]
    failed = merge_repeats("2", runs, 3, [1, 2, 3])
    assert failed.status == "oom" and failed.reason == "repeat 2 of 3: boom"
    assert failed.value("epoch_seconds") == 3.0  # from the ok repeat
    partial = merge_repeats("2", runs[:1], 3, [1, 2, 3])
    assert partial.status == "interrupted" and "1 of 3 repeats done" in partial.reason
    assert partial.repeats["seeds"] == [1] and partial.repeats["vary_seed"] is True


def test_differences_against_the_baseline_are_marked_within_noise_only_when_ranges_overlap():
    results = [
        repeated("baseline", [10.0, 10.4, 9.8], 100.0, [0.050, 0.052, 0.051]),
        repeated("1", [9.9, 10.3, 10.1], 60.0, [0.050, 0.051, 0.052]),  # faster by the median, within noise
        repeated("4", [14.0, 14.2, 13.9], 100.0, [0.040, 0.041, 0.042]),  # clearly slower, same memory
    ]
    frame, measure = build_frame(results)
    verdicts = frame.set_index("cell")[["memory_vs_baseline", "time_vs_baseline", "masked_accuracy_vs_baseline"]]
    assert list(verdicts.loc["1"]) == [LOWER, WITHIN_NOISE, WITHIN_NOISE]
    assert list(verdicts.loc["4"]) == [WITHIN_NOISE, HIGHER, LOWER]
    assert verdicts.loc["baseline"].isna().all()
    text = markdown(frame, measure, results)
    assert "| 1 | 60.0 MiB (0.60x) | 10.1 s (1.01x ≈) | 5.1% (+0.0 ≈) |" in text
    assert "figures are medians of 3 repeats" in text and "≈ within noise of the baseline" in text


@pytest.mark.slow
def test_repeat_with_vary_seed_runs_fresh_processes_and_aggregates(tmp_path: Path, cache_dir: Path):
    args = ["--preset", "cpu", "--no-estimate", "--strategies", "1", "--repeat", "2", "--vary-seed",
            "--run-name", "rep", "--results", str(tmp_path)]
    for override in [*TINY_RUN, f"data.cache_dir={cache_dir}", "train.max_steps=3"]:
        args += ["--set", override]
    out = subprocess.run([sys.executable, "-m", "gputech_bench", "run", *args], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "200"}, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run = tmp_path / "rep"
    assert sorted(path.name for path in (run / "repeats").glob("*.json")) == [
        "1.rep1.json", "1.rep2.json", "baseline.rep1.json", "baseline.rep2.json"]
    seeds = [json.loads((run / "repeats" / f"1.rep{k}.json").read_text())["config"]["train"]["seed"] for k in (1, 2)]
    assert seeds[1] == seeds[0] + 1
    cell = read_result(run / "1.json")
    assert cell.repeats["seeds"] == seeds and cell.repeats["vary_seed"] is True
    assert cell.repeats["statistics"]["epoch_seconds"]["n"] == 2
    assert "medians of 2 repeats" in out.stdout
    assert "each cell 2 times" in out.stdout
