"""--nproc-per-node through torchrun on CPU (gloo): every rank recorded, losses as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_RUN

from gputech_bench.results import read_result

CELLS = "fsdp-offload,1+2"


def run_cli(tmp_path: Path, cache_dir: Path, name: str, *extra: str) -> Path:
    args = ["--preset", "cpu", "--no-estimate", "--strategies", CELLS, "--run-name", name, "--results", str(tmp_path)]
    # No dropout, and rows with equal targets: the ranks' mean loss is then the whole batch's.
    for override in [*TINY_RUN, f"data.cache_dir={cache_dir}", "train.max_steps=3", "model.dropout=0"]:
        args += ["--set", override]
    process = subprocess.run(
        [sys.executable, "-m", "gputech_bench", "run", *args, *extra], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-2000:]
    return tmp_path / name


@pytest.mark.slow
def test_two_gloo_ranks_record_every_rank_and_train_like_one_process(tmp_path: Path, cache_dir: Path):
    together = run_cli(tmp_path, cache_dir, "one")
    ranked = run_cli(tmp_path, cache_dir, "two", "--nproc-per-node", "2")

    for cell in ("baseline", "fsdp-offload", "1+2"):
        merged = read_result(ranked / f"{cell}.json")
        assert merged.status == "ok", merged.reason
        assert merged.distributed["world_size"] == 2
        assert [rank["rank"] for rank in merged.ranks] == [0, 1]
        for rank in (0, 1):
            assert read_result(ranked / "ranks" / f"{cell}.rank{rank}.json").rank["rank"] == rank
        per_rank = merged.memory_per_rank["tracked_peak_mib"]
        assert per_rank["total"] == pytest.approx(sum(per_rank["by_rank"].values()))
        assert merged.value("tracked_peak_mib") == per_rank["max"]

        single = read_result(together / f"{cell}.json")
        assert single.distributed is None
        # Each rank takes half of every batch and the gradients are averaged: the same
        # training, up to the weighting of the two halves' masked-token means.
        loss, reference = merged.value("final_train_loss"), single.value("final_train_loss")
        assert loss == pytest.approx(reference, rel=0.02), cell
        masked, single_masked = (r.value("eval_masked_accuracy") for r in (merged, single))
        assert masked == pytest.approx(single_masked, abs=0.05), cell

    facts = read_result(ranked / "fsdp-offload.json").strategy_facts
    assert facts["fsdp_world_size"] == 2
    # The sharded cell's ranks each hold half of the weights' storage.
    sharded = read_result(ranked / "ranks" / "fsdp-offload.rank0.json").memory_breakdown["cpu"]["parameters_mib"]
    whole = read_result(together / "fsdp-offload.json").memory_breakdown["cpu"]["parameters_mib"]
    assert sharded < whole
