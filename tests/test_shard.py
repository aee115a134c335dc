"""One matrix spread over machines (``run --shard K/N``): the slicing, K/N refused in one line,
two shards of the real command line at the same time into one folder, the missing-cells line,
a mismatched shard refused, and one shard resumed on its own.

The two shards run as background processes of their own, as a slurm array or ssh would start
them; nothing here sends a signal, so the tests hold whatever SIGINT disposition they inherit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import TINY_RUN, assert_one_line_error, gputech, invoke

from gputech_bench.files import create_exclusive_bytes
from gputech_bench.results import CellResult, RunFolder, read_result, write_result
from gputech_bench.run.shard import Shard, ShardPlan, missing_line, owner, parse_shard


def tiny_sets(cache_dir: Path, *extra: str) -> list[str]:
    args = []
    for override in [*TINY_RUN, f"data.cache_dir={cache_dir}", "train.max_steps=3", *extra]:
        args += ["--set", override]
    return args


# --------------------------------------------------------------------------- slicing and K/N


def test_cells_are_dealt_round_robin_and_the_baseline_is_shard_1s():
    cells = ["baseline", "1", "2", "3", "4", "1+2+3", "1+2+4", "lora"]
    slices = [Shard(k, 3).cells(cells) for k in (1, 2, 3)]
    assert slices == [("baseline", "3", "1+2+4"), ("1", "4", "lora"), ("2", "1+2+3")]
    assert sorted(c for s in slices for c in s) == sorted(cells)  # disjoint, and every cell once
    assert all(owner(cells, cell, 3).cells(cells).count(cell) == 1 for cell in cells)
    assert Shard(1, 1).cells(cells) == tuple(cells)
    assert missing_line([("4", Shard(2, 3)), ("lora", Shard(2, 3)), ("2", Shard(3, 3))]) == \
        "missing: 4, lora (shard 2/3); 2 (shard 3/3)"


def test_k_n_parses_from_text_or_a_pair():
    assert parse_shard("2/3") == parse_shard(" 2 / 3 ") == parse_shard((2, 3)) == Shard(2, 3)
    assert parse_shard(None) is None


@pytest.mark.parametrize("args, fragments", [
    pytest.param(["--shard", "two"], ["--shard 'two': pass K/N", "--shard 1/3"], id="syntax"),
    pytest.param(["--shard", "2-3"], ["--shard '2-3': pass K/N"], id="dash"),
    pytest.param(["--shard", "0/3"], ["--shard 0/3: K counts from 1", "JOB_COMPLETION_INDEX"], id="k-zero"),
    pytest.param(["--shard", "4/3"], ["--shard 4/3: K must be between 1 and 3"], id="k-past-n"),
    pytest.param(["--shard", "1/0"], ["--shard 1/0: N must be at least 1"], id="n-zero"),
    pytest.param(["--shard", "1/-2"], ["--shard 1/-2: N must be at least 1"], id="n-negative"),
    pytest.param(["--shard", "1/2", "--no-run-name"], ["--shard 1/2 needs --run-name NAME"], id="no-run-name"),
    pytest.param(["--shard", "3/3"], ["--shard 3/3: the run has 2 cell(s)", "at most 2 ways"], id="more-shards-than-cells"),
])
def test_bad_shards_are_one_line_and_exit_2(tmp_path: Path, args: list[str], fragments: list[str]):
    name = [] if "--no-run-name" in args else ["--run-name", "split"]
    args = [arg for arg in args if arg != "--no-run-name"]
    out = invoke("run", "--strategies", "1", "--preset", "cpu", "--set", "device=cpu", "--results", str(tmp_path / "r"),
                 *name, *args)
    assert_one_line_error(out.exit_code, out.stderr, *fragments)
    assert not (tmp_path / "r").exists()


def test_the_first_writer_wins_and_the_others_are_told(tmp_path: Path):
    path = tmp_path / "shared" / "config.json"
    assert create_exclusive_bytes(path, b"first\n")
    assert not create_exclusive_bytes(path, b"second\n")
    assert path.read_bytes() == b"first\n"
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temporary file left behind


def test_a_plan_names_what_differs():
    recorded = ShardPlan(2, ("baseline", "1", "2"))
    assert ShardPlan(3, ("baseline", "1", "2")).differences(recorded) == ["N 3, recorded 2"]
    assert ShardPlan(2, ("baseline", "1")).differences(recorded) == ["cells baseline,1, recorded baseline,1,2"]
    assert ShardPlan(2, ("baseline", "1", "2"), 3, (222, 222, 222)).differences(recorded) == ["--repeat 3, recorded 1"]


# --------------------------------------------------------------------------- real shards


def start_shard(k: int, n: int, tmp_path: Path, cache_dir: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """``gputech-bench run --strategies 1,2 --shard k/n`` as a background process; its output in a file."""
    log = tmp_path / f"shard{k}.out"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gputech_bench", "run", "--strategies", "1,2", "--preset", "cpu",
             *tiny_sets(cache_dir), "--results", str(tmp_path / "results"), "--run-name", "split",
             "--shard", f"{k}/{n}", *extra],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"},
        )
    return process, log


def table_cells(text: str) -> list[str]:
    return [line.split("│")[1].strip() for line in text.split("predicted (fake-tensor")[0].splitlines() if line.startswith("│")]


@pytest.mark.slow
def test_two_shards_at_once_make_one_table(tmp_path: Path, cache_dir: Path):
    started = [start_shard(k, 2, tmp_path, cache_dir) for k in (1, 2)]
    for process, log in started:
        assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    first, second = (log.read_text() for _, log in started)
    assert "shard 1/2: baseline, 2 (of 3 cells" in first and "shard 2/2: 1 (of 3 cells" in second
    run_dir = tmp_path / "results" / "split"

    # Every file whole: each JSON parses, no temporary file is left, each shard kept its own logs and estimate.
    files = {str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if path.is_file()}
    assert not [name for name in files if name.endswith(".tmp") or "/." in name or name.startswith(".")]
    for name in files:
        if name.endswith(".json"):
            json.loads((run_dir / name).read_text())
    assert {"logs/fork-server.1-of-2.log", "logs/fork-server.2-of-2.log", "logs/estimate.1-of-2.log",
            "logs/estimate.2-of-2.log", "shards/estimate.1-of-2.json", "shards/estimate.2-of-2.json",
            "shards.json", "config.json"} <= files
    assert {read_result(run_dir / f"{cell}.json").status for cell in ("baseline", "1", "2")} == {"ok"}
    plan = json.loads((run_dir / "shards.json").read_text())
    assert plan["count"] == 2 and plan["cells"] == ["baseline", "1", "2"] and plan["owners"] == {"baseline": 1, "1": 2, "2": 1}

    # The report files, rewritten by whichever shard finished last, hold every cell.
    assert list(pd.read_csv(run_dir / "report.csv")["cell"]) == ["baseline", "1", "2"]
    assert [row["cell"] for row in json.loads((run_dir / "report.json").read_text())["rows"]] == ["baseline", "1", "2"]

    # report: one table of every cell, nothing missing, both shards' estimates as one.
    out = gputech("report", str(run_dir), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert table_cells(out.stdout) == ["baseline", "1", "2"]
    assert "missing" not in out.stdout + out.stderr and "skipped" not in out.stderr
    estimate_rows = [line.split("│")[1].strip() for line in out.stdout.split("predicted (fake-tensor")[1].splitlines()
                     if line.startswith("│")]
    assert [row.split(" ")[0] for row in estimate_rows] == ["baseline", "1", "2"]


@pytest.mark.slow
def test_one_shard_says_what_is_missing_refuses_a_mismatch_and_resumes_alone(tmp_path: Path, cache_dir: Path):
    process, log = start_shard(1, 2, tmp_path, cache_dir, "--no-estimate")
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    run_dir = tmp_path / "results" / "split"
    assert "missing: 1 (shard 2/2)" in log.read_text()

    # report renders what is there and names the missing cell and its shard.
    out = invoke("report", str(run_dir))
    assert out.exit_code == 0, out.output
    assert table_cells(out.stdout) == ["baseline", "2"] and "missing: 1 (shard 2/2)" in out.stdout
    md = invoke("report", str(run_dir), "--format", "md")
    assert "missing: 1 (shard 2/2)" in md.stderr and "missing" not in md.stdout

    # A second shard that does not match the first is refused in one line, before it runs anything.
    config = (run_dir / "config.json").read_text()
    base = ["run", "--preset", "cpu", "--results", str(tmp_path / "results"), "--run-name", "split", "--no-estimate"]
    for args, fragment in [
        (["--strategies", "1,2", *tiny_sets(cache_dir, "train.max_steps=2"), "--shard", "2/2"],
         "shard 2/2: run folder"),
        (["--strategies", "1,2", *tiny_sets(cache_dir), "--shard", "2/3"], "N 3, recorded 2"),
        (["--strategies", "1,2,4", *tiny_sets(cache_dir), "--shard", "2/2"], "cells baseline,1,2,4, recorded baseline,1,2"),
        (["--strategies", "1,2", *tiny_sets(cache_dir), "--shard", "2/2", "--repeat", "2"], "--repeat 2, recorded 1"),
    ]:
        refused = invoke(*base, *args)
        assert_one_line_error(refused.exit_code, refused.stderr, fragment, "use another --run-name")
    assert (run_dir / "config.json").read_text() == config
    assert not (run_dir / "1.json").exists()

    # Resume shard 1 alone: its interrupted cell runs again, its finished one is reused, shard 2's is left.
    interrupted = CellResult.failed("2", "interrupted", "stopped by Ctrl-C")
    write_result(RunFolder(run_dir).result_path("2"), interrupted)
    process, log = start_shard(1, 2, tmp_path, cache_dir, "--no-estimate")
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "reused 1 finished cell(s): baseline" in text and "missing: 1 (shard 2/2)" in text
    assert read_result(run_dir / "2.json").ok and read_result(run_dir / "previous" / "2.json").status == "interrupted"
    assert not (run_dir / "1.json").exists()


def test_run_help_shows_a_shard_example():
    out = invoke("run", "--help")
    assert out.exit_code == 0
    assert "--shard 2/4" in out.stdout and "SLURM_ARRAY_TASK_ID" in out.stdout


def test_the_api_takes_a_shard_as_text_or_a_pair_and_refuses_it_in_one_line(tmp_path: Path):
    from gputech_bench import UserError, run_matrix

    for shard, fragment in [((0, 2), "--shard 0/2: K counts from 1"), ("1/2", "needs --run-name NAME"),
                            ((3, 2), "--shard 3/2: K must be between 1 and 2")]:
        with pytest.raises(UserError, match=fragment):
            run_matrix(strategies=["1"], preset="cpu", device="cpu", results=tmp_path / "r",
                       run_name=None if shard == "1/2" else "split", shard=shard)
    assert not (tmp_path / "r").exists()
