"""scripts/gpu_check.sh --dry-run: the GPU acceptance script's whole pipeline, on CPU.

The dry run trains every cell of the GPU check (both runs), the bare loop and the
estimate at a tiny shape, then writes the same files a GPU run writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
CELLS = {
    "seed": ["baseline", "1", "2", "3", "4", "1+2+3", "1+2+4", "lora", "amp", "chunked-ce", "1+3+chunked-ce",
             "bf16-weights", "optimizer-in-backward", "fsdp-offload", "qlora", "fsdp"],
    "mlm": ["baseline", "sparse-head", "1+3+amp+sparse-head"],
}


@pytest.mark.slow
def test_dry_run_writes_few_shallow_files_and_passes(tmp_path: Path, cache_dir: Path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "GPUTECH_BENCH_CACHE": str(cache_dir),
        "PYTHON": sys.executable,  # the script runs everything with the test's interpreter
        "TMPDIR": str(tmp_path),  # its run folders, outside OUT
    }
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]

    # At most 6 files, all directly under OUT (the run folders live elsewhere).
    entries = list(out.iterdir())
    assert len(entries) <= 6 and all(entry.is_file() for entry in entries), entries
    assert {"summary.md", "summary.json", "report.csv", "report-expandable.csv", "gpu_check.log"} <= {
        entry.name for entry in entries}

    # One table: the project's baseline against the bare loop, their ratio, then every cell of both runs.
    markdown = (out / "summary.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    first = [row.split("|")[1].strip() for row in table[2:5]]
    assert first == ["project baseline (seed run)", "bare loop (transformers + torch)", "project / bare"]
    for run, cells in CELLS.items():
        for cell in cells:
            assert any(row.startswith(f"| {run}: {cell} | ok |") for row in table), (run, cell)
    assert "NOT CHECKED allocated memory: not checked on CPU (allocated is CUDA-only)" in markdown
    assert "PASS cells: 19 of 19 ok" in markdown
    # The estimate beside every measured peak, each cell more than 10% off flagged (none at this shape).
    estimate = markdown.split("Estimate (fake-tensor trace) against measured, seed run:", 1)[1].split("Acceptance:")[0]
    assert "| baseline |" in estimate and "| 1+3+chunked-ce |" in estimate and "FLAG" not in estimate
    assert "of the measured peak" in next(a["detail"] for a in summary_acceptance(out) if a["detail"].startswith("estimate"))

    # Predicted against measured reserved and NVML for every cell ("-" where the estimate predicts neither).
    reserved = markdown.split("Predicted against measured reserved and NVML, seed run", 1)[1].split("Estimate (")[0]
    assert "| baseline |" in reserved and "| 1+3+chunked-ce |" in reserved
    # baseline and lora again with expandable segments, beside the default allocator's figures; on CPU
    # without the snapshot, which is CUDA-only.
    expandable = markdown.split("With and without expandable segments", 1)[1].split("Acceptance:")[0]
    for cell in ("baseline", "lora"):
        for allocator in ("default", "expandable"):
            assert f"| {cell} | {allocator} | ok |" in expandable, (cell, allocator)
    assert "no snapshot recorded (--memory-snapshot is CUDA-only)" in expandable
    assert "--allocator has no effect on CPU" in (out / "gpu_check.log").read_text()

    summary = json.loads((out / "summary.json").read_text())
    assert [row["expandable"]["allocator"] for row in summary["expandable_segments"]] == ["expandable_segments:True"] * 2
    assert {(c["run"], c["cell"]) for c in summary["cells"]} == {(r, c) for r, cells in CELLS.items() for c in cells}
    assert all(c["status"] == "ok" for c in summary["cells"])
    assert summary["mode"] == "dry-run" and summary["passed"] is True and summary["exit_code"] == 0
    bare = summary["comparison"]["bare_loop"]
    assert bare["status"] == "ok" and bare["imports_gputech_bench"] is False
    assert bare["mean_step_seconds"] > 0 and bare["peak_allocated_mib"] is None  # memory: CUDA only
    project = summary["comparison"]["project_baseline"]
    assert bare["steps"] == project["steps_run"] == 3
    # The time check is reported in the dry run but never counts toward the exit code.
    time_check = next(a for a in summary["acceptance"] if a["detail"].startswith("step time"))
    assert time_check["counts_toward_exit_code"] is False

    log = (out / "gpu_check.log").read_text()
    assert f"output folder: {out}" in log and "Overall: PASS" in log and "gpu_check: exit 0" in log


def summary_acceptance(out: Path) -> list[dict]:
    return json.loads((out / "summary.json").read_text())["acceptance"]
