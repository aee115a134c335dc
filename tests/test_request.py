"""One run request: built once from run_matrix's keywords or the command line's flags, and
what the runner receives; each launcher starts a real worker that writes its result."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from helpers import invoke, run_request

from gputech_bench import run_matrix
from gputech_bench.api import _run
from gputech_bench.api._run import FORK_SERVER_PRELOAD
from gputech_bench.config import BenchConfig
from gputech_bench.errors import ConfigError
from gputech_bench.results import RunFolder, read_result
from gputech_bench.run.forkserver import ForkServer
from gputech_bench.run.launch import Launch
from gputech_bench.run.launcher import ForkedChild, FreshInterpreter, Launcher
from gputech_bench.run.request import CellPlacement, RunRequest, Schedule
from gputech_bench.run.runner import SILENT, Listeners, prepare_run_dir, run_cells


class Received(Exception):
    """Raised by the stand-in runner once it holds the request: nothing runs."""


@pytest.fixture()
def received(monkeypatch: pytest.MonkeyPatch) -> list[tuple[RunRequest, Launcher]]:
    """What the runner was handed, call after call, by ``run_matrix`` and by ``run``."""
    calls: list[tuple[RunRequest, Launcher]] = []

    def runner(request: RunRequest, launcher: Launcher, listeners: Listeners = SILENT):
        calls.append((request, launcher))
        raise Received

    monkeypatch.setattr(_run, "run_cells", runner)
    return calls


def test_run_matrix_and_the_command_line_hand_the_runner_one_equal_request(tmp_path: Path, cache_dir: Path, received):
    results = tmp_path / "results"
    with pytest.raises(Received):
        run_matrix(["1", "3"], preset="cpu", device="cpu", overrides={"train.max_steps": 4, "data.cache_dir": str(cache_dir)},
                   results=results, run_name="same", repeat=3, vary_seed=True, cell_timeout=30, force=True,
                   estimate=False, progress=False)
    invoke("run", "--strategies", "1,3", "--preset", "cpu", "--device", "cpu", "--set", "train.max_steps=4",
           "--set", f"data.cache_dir={cache_dir}", "--results", str(results), "--run-name", "same", "--repeat", "3",
           "--vary-seed", "--cell-timeout", "30", "--force", "--no-estimate")
    assert len(received) == 2, "the command line did not reach the runner"
    (ours, launcher), (theirs, _) = received
    assert ours == theirs
    seed = ours.config.train.seed
    assert ours.cells == ("baseline", "1", "3") and ours.config.train.max_steps == 4
    assert ours.placement == CellPlacement(Launch(), (None,))
    assert ours.schedule == Schedule(repeats=3, seeds=(seed, seed + 1, seed + 2), vary_seed=True, cell_timeout=30.0, force=True)
    assert ours.folder == RunFolder(results / "same")
    # On CPU the cells are forked from a server that preloads the worker's stack and the tracer.
    assert isinstance(launcher, ForkedChild) and launcher.server.preload == FORK_SERVER_PRELOAD


def test_fit_verify_hands_the_runner_a_request_for_the_one_setup(tmp_path: Path, tiny_config: BenchConfig, received):
    from gputech_bench.api._fit import _verify
    from gputech_bench.api._output import Output
    from gputech_bench.estimator.predict import Setup

    class Chosen:
        setup = Setup("1+2", micro_batch_size=4)

    with pytest.raises(Received):
        _verify(Chosen(), tiny_config, tmp_path, 1 << 30, Output(), progress=False)  # type: ignore[arg-type]
    (request, _), = received
    assert request.cells == ("1+2",) and request.config == Chosen.setup.config_for(tiny_config)
    assert request.placement == CellPlacement(Launch(), (None,))
    assert request.schedule == Schedule(repeats=1, seeds=None, vary_seed=False, cell_timeout=None, force=False)
    assert request.folder.root.parent == tmp_path and request.name.startswith("fit-")


def test_a_schedule_with_a_seed_per_repeat_and_a_placement_without_slots_are_refused():
    with pytest.raises(ConfigError, match="one per repeat"):
        Schedule(repeats=3, seeds=(1, 2), vary_seed=True, cell_timeout=None, force=False)
    with pytest.raises(ConfigError, match="at least one slot"):
        CellPlacement(Launch(), ())


@pytest.mark.slow
@pytest.mark.parametrize("how", ["fresh interpreter", "forked from the runner's preloaded fork server"])
def test_each_launcher_starts_a_worker_that_writes_its_result(tmp_path: Path, tiny_config: BenchConfig, how: str):
    folder = RunFolder(tmp_path / "run")
    request = run_request(folder, ("baseline",), config=dataclasses.replace(
        tiny_config, train=dataclasses.replace(tiny_config.train, max_steps=2)))
    prepare_run_dir(request)
    launcher: Launcher = (FreshInterpreter() if how == "fresh interpreter"
                          else ForkedChild(ForkServer(folder.fork_server_log_path, FORK_SERVER_PRELOAD)))
    try:
        outcome = run_cells(request, launcher)
    finally:
        launcher.close()
    result = read_result(folder.result_path("baseline"))
    assert [r.status for r in outcome.results] == ["ok"], outcome.results[0].reason
    assert result.ok and result.provenance["process"] == how
