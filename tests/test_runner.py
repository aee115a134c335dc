"""The matrix runner with real worker processes: crashes, timeouts, Ctrl-C and resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    TINY_RUN,
    CommandLauncher,
    NoOpFacts,
    assert_one_line_error,
    invoke,
    run_request,
    sleeping_worker,
    slept,
)

from gputech_bench.results import RunFolder, read_result

#: 240 steps instead of 3: a forked cell of the tiny model then runs for seconds (about 6 s for
#: the baseline, 9 s for 1 on 2 cores), so a test can stop it mid-training at a moment it chooses.
LONG_CELL = "train.epochs=40"


def tiny_args(cache_dir: Path, *extra: str) -> list[str]:
    args = ["--preset", "cpu", "--no-estimate"]  # the estimate after a run is tested in test_cli
    for override in TINY_RUN + [f"data.cache_dir={cache_dir}", "train.max_steps=3", *extra]:
        args += ["--set", override]
    return args


def start_cli(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gputech_bench", "run", *args, "--results", str(tmp_path / "results")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"},
    )


def worker_pids(cell: str, under: Path) -> list[int]:
    """Worker processes of ``cell`` whose results go below ``under`` (read from /proc).

    A fresh interpreter names the cell on its command line. A child of the fork server
    (every CPU cell) carries the server's command line, and is known by its stderr: the
    cell's own log below ``under``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "gputech_bench.worker" in args and "--cell" in args and args[args.index("--cell") + 1] == cell:
            if str(under) in args[args.index("--out") + 1]:
                pids.append(int(entry))
        elif "gputech_bench.run.forkserver" in args:
            try:
                stderr = os.readlink(f"/proc/{entry}/fd/2")
            except OSError:
                continue
            if stderr.startswith(str(under)) and stderr.endswith(f"/logs/{cell}.log"):
                pids.append(int(entry))
    return pids


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``signum`` (SigCgt in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (signum - 1) & 1)


def forked(result) -> bool:
    """Whether the worker that wrote ``result`` was a child of the fork server."""
    return result.provenance.get("process", "").startswith("forked")


def wait_for(condition, timeout: float = 600.0) -> None:
    """Until ``condition()`` holds. As long as a run's own limit (communicate's): on a loaded
    2-core machine the baseline's 240 steps alone have taken over 3 minutes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds worker processes through /proc")


@pytest.mark.slow
def test_a_worker_killed_with_sigkill_is_a_crashed_row_and_the_matrix_goes_on(tmp_path: Path, cache_dir: Path):
    # Long cells: a 3-step forked cell can end before the killer finds it.
    process = start_cli(tmp_path, "--strategies", "1,lora", *tiny_args(cache_dir, "train.max_steps=0", LONG_CELL),
                        "--run-name", "kill")

    def kill_cell_1() -> None:
        # Or until the run ended without it: the assertions below then say what happened.
        wait_for(lambda: bool(worker_pids("1", tmp_path)) or process.poll() is not None)
        for pid in worker_pids("1", tmp_path):
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_cell_1)
    killer.start()
    stdout, stderr = process.communicate(timeout=600)
    killer.join()
    assert process.returncode == 1, stderr[-2000:]
    run_dir = tmp_path / "results" / "kill"
    crashed = read_result(run_dir / "1.json")
    assert crashed.status == "crashed" and crashed.reason.startswith("worker killed by SIGKILL")
    assert read_result(run_dir / "baseline.json").status == "ok"
    assert read_result(run_dir / "lora.json").status == "ok"
    assert "crashed" in stdout and "Traceback" not in stderr
    # The guarantee held through the fork server: the cells around the killed one were its children.
    assert forked(read_result(run_dir / "baseline.json")) and forked(read_result(run_dir / "lora.json"))


@pytest.mark.slow
def test_interrupted_run_resumes_without_rerunning_finished_cells(tmp_path: Path, cache_dir: Path):
    # Long cells: a 3-step forked cell can end before the Ctrl-C lands.
    args = ["--strategies", "1,2", *tiny_args(cache_dir, "train.max_steps=0", LONG_CELL), "--run-name", "resume"]
    run_dir = tmp_path / "results" / "resume"
    process = start_cli(tmp_path, *args)
    # Ctrl-C once the baseline is done and cell 1's worker is running.
    wait_for(lambda: (run_dir / "baseline.json").exists() and bool(worker_pids("1", tmp_path)))
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted" in stdout and "--run-name resume" in stdout
    assert read_result(run_dir / "1.json").status == "interrupted"
    assert not (run_dir / "2.json").exists()
    finished = (run_dir / "baseline.json").read_bytes()
    finished_mtime = (run_dir / "baseline.json").stat().st_mtime_ns

    process = start_cli(tmp_path, *args)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-2000:]
    assert "reused 1 finished cell(s): baseline" in stdout
    assert (run_dir / "baseline.json").read_bytes() == finished
    assert (run_dir / "baseline.json").stat().st_mtime_ns == finished_mtime
    assert {read_result(run_dir / f"{c}.json").status for c in ("1", "2")} == {"ok"}
    assert read_result(run_dir / "previous" / "1.json").status == "interrupted"  # the old attempt is kept
    assert forked(read_result(run_dir / "2.json"))


@pytest.mark.slow
def test_a_runner_killed_with_sigkill_loses_nothing_and_its_worker_stops(tmp_path: Path, cache_dir: Path):
    run_dir = tmp_path / "results" / "killed"
    # Cell 1 must still be training when the runner is killed: a long cell, since a forked cell
    # of 3 steps can end before its SIGTERM handler is found in place.
    process = start_cli(tmp_path, "--strategies", "1", *tiny_args(cache_dir, "train.max_steps=0", LONG_CELL),
                        "--run-name", "killed")
    # Killed once cell 1's worker has put its SIGTERM handler in place: from then on it records the stop.
    wait_for(lambda: (run_dir / "baseline.json").exists()
             and any(catches(pid, signal.SIGTERM) for pid in worker_pids("1", tmp_path)))
    finished = (run_dir / "baseline.json").read_bytes()
    process.kill()
    process.communicate(timeout=60)
    # The orphaned worker is told (SIGTERM on parent death), stops, and says so.
    wait_for(lambda: not worker_pids("1", tmp_path))
    assert (run_dir / "baseline.json").read_bytes() == finished
    assert read_result(run_dir / "baseline.json").status == "ok"
    interrupted = read_result(run_dir / "1.json")
    assert interrupted.status == "interrupted" and forked(interrupted)
    # The fork server went with its runner: nothing of the run is left behind.
    assert not fork_servers_of(tmp_path)


def fork_servers_of(under: Path) -> list[int]:
    """Fork servers whose log is below ``under``."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")
            if "gputech_bench.run.forkserver" in args and os.readlink(f"/proc/{entry}/fd/2").startswith(str(under)):
                pids.append(int(entry))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_cell_timeout_stops_the_worker_and_records_timeout(tmp_path: Path, cache_dir: Path):
    # A forked cell starts at once, so it is made long: 1,000 epochs of the tiny run.
    long_cells = ["--set", "train.max_steps=0", "--set", "train.epochs=1000"]
    args = ["--strategies", "1", *tiny_args(cache_dir), *long_cells, "--run-name", "slow", "--cell-timeout", "1"]
    process = start_cli(tmp_path, *args)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-2000:]
    for cell in ("baseline", "1"):
        result = read_result(tmp_path / "results" / "slow" / f"{cell}.json")
        assert result.status == "timeout" and result.reason.startswith("exceeded --cell-timeout of 1 s")
    assert not worker_pids("1", tmp_path) and not worker_pids("baseline", tmp_path)


def test_a_run_name_with_another_config_is_refused(tmp_path: Path, cache_dir: Path):
    run_dir = tmp_path / "results" / "mixed"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"preset": "seed", "train": {"epochs": 9}}))
    out = invoke("run", *tiny_args(cache_dir), "--run-name", "mixed", "--results", str(tmp_path / "results"))
    assert_one_line_error(out.exit_code, out.stderr, "holds results of a different config", "--force")
    assert json.loads((run_dir / "config.json").read_text())["train"] == {"epochs": 9}  # untouched


def test_refused_combination_exits_2_before_anything_runs(tmp_path: Path):
    from gputech_bench.strategies import Placement, Strategy, register, unregister

    class HostPlacement(NoOpFacts, Strategy):
        key, name, saves, costs, order = "test-host", "test-host-placement", "-", "-", 99

        def placement(self, model, ctx) -> Placement:  # pragma: no cover - never reached
            raise AssertionError

    register(HostPlacement)
    try:
        out = invoke("run", "--preset", "cpu", "--strategies", "4+test-host", "--results", str(tmp_path / "r"))
    finally:
        unregister(HostPlacement)
    assert out.exit_code == 2
    assert "refused cell '4+test-host'" in out.output and "both own the placement hook" in out.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_broken_bitsandbytes_fails_only_its_cells_with_the_fix(tmp_path: Path, cache_dir: Path):
    fake = tmp_path / "fake-site" / "bitsandbytes"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("libbitsandbytes_cuda128.so: cannot open shared object file")\n')
    # In front of whatever PYTHONPATH already holds, so that the run still imports this checkout.
    python_path = os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path, "COLUMNS": "200"}
    process = subprocess.run(
        [sys.executable, "-m", "gputech_bench", "run", "--strategies", "1,3", *tiny_args(cache_dir),
         "--results", str(tmp_path / "results"), "--run-name", "nobnb"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600,
    )
    assert process.returncode == 1, process.stderr[-2000:]
    run_dir = tmp_path / "results" / "nobnb"
    broken = read_result(run_dir / "3.json")
    assert broken.status == "error" and broken.traceback is None
    assert broken.reason.startswith("bitsandbytes could not be imported (libbitsandbytes_cuda128.so")
    assert "pip install 'bitsandbytes>=0.45'" in broken.reason
    assert {read_result(run_dir / f"{c}.json").status for c in ("baseline", "1")} == {"ok"}


def test_ctrl_c_delivered_to_another_thread_still_stops_the_worker_at_once(tmp_path: Path, ctrl_c_raises):
    """The kernel may hand SIGINT to any thread; the runner must not wait for the worker to finish."""
    from gputech_bench.run import runner

    layout = RunFolder(tmp_path / "run")
    layout.root.mkdir()

    def ctrl_c_once_it_sleeps(cell: str, event: dict) -> None:
        # The worker's first event says it runs; the runner relays events in a thread of its own.
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # not the main thread

    run = runner.run_worker(runner.Job("1"), run_request(layout), CommandLauncher(sleeping_worker), ctrl_c_once_it_sleeps)
    assert run.interrupted and run.result.status == "interrupted"
    assert not slept(layout.result_path("1"))  # stopped, not waited for
