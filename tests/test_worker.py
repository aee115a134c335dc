"""The worker: one cell, one honest result file, whatever happens."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import NoOpFacts

from gputech_bench.config import BenchConfig, apply_overrides, from_dict, to_dict
from gputech_bench.results import SCHEMA, CellResult, read_result
from gputech_bench.strategies import Strategy, register, unregister
from gputech_bench.worker.__main__ import main as worker_main
from gputech_bench.worker.cell import new_result, run_cell


@pytest.fixture(autouse=True)
def signal_handlers_kept():
    """``worker_main`` is a process's entry: it takes SIGINT and SIGTERM (and ignores both while
    it writes a failed cell's result). Called in this process, it must not leave those
    dispositions to the tests that run after it, which may send SIGINT."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def write_config(path: Path, config: BenchConfig) -> Path:
    path.write_text(json.dumps(to_dict(config)))
    return path


def run_worker(tmp_path: Path, config: BenchConfig, cell: str) -> tuple[int, CellResult]:
    config_path = write_config(tmp_path / "config.json", config)
    out = tmp_path / f"{cell}.json"
    code = worker_main(["--cell", cell, "--config", str(config_path), "--out", str(out)])
    return code, read_result(out)


def value(result: CellResult, metric: str):
    return result.value(metric)


@pytest.mark.slow
def test_worker_process_writes_a_complete_result(tmp_path: Path, tiny_config: BenchConfig):
    config = apply_overrides(tiny_config, ["train.max_steps=4"])
    config_path = write_config(tmp_path / "resolved.json", config)
    out = tmp_path / "cells" / "1+2+3.json"
    process = subprocess.run(
        [sys.executable, "-m", "gputech_bench.worker", "--cell", "1+2+3", "--config", str(config_path), "--out", str(out), "--events"],
        capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    result = read_result(out)
    written = json.loads(out.read_text())
    assert written["schema"] == SCHEMA and result.status == "ok" and result.cell == "1+2+3"
    assert result.strategies == ["checkpointing", "accumulation", "adam8bit"]
    # Every figure in the file names its unit and method, and reads back as the same Figure.
    for name, entry in written["metrics"].items():
        assert set(entry) == {"value", "unit", "method"} and entry["unit"] and entry["method"], name
        assert result.metrics[name].to_dict() == entry, name
    assert value(result, "tracked_peak_mib") > 0
    assert value(result, "peak_rss_mib") > value(result, "tracked_peak_mib")
    assert set(result.memory_breakdown["cpu"]) >= {"parameters_mib", "gradients_mib", "optimizer_state_mib", "activations_mib", "temporaries_mib"}
    assert value(result, "epoch_seconds") > 0 and value(result, "samples_per_second") > 0
    assert value(result, "epoch_time_extrapolated") is True
    assert any("extrapolated" in note for note in result.notes)
    assert 0 <= value(result, "eval_masked_accuracy") <= 1 and 0 <= value(result, "eval_token_accuracy") <= 1
    assert value(result, "steps_run") == 4
    # Provenance and the resolved config travel with the figures.
    provenance = result.provenance
    assert provenance["packages"]["torch"] and provenance["python"] and provenance["started_at"] and provenance["finished_at"]
    assert result.data["corpus_fingerprint"] and from_dict(result.config) == config
    assert result.strategy_facts["optimizer"].endswith("Adam8bit")
    # Progress events for a runner, one JSON object per line.
    events = [json.loads(line) for line in process.stdout.splitlines()]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4]
    assert events[-1] == {"event": "done", "status": "ok", "reason": None}
    assert not list(out.parent.glob(".*.tmp"))  # atomic write leaves no temporary behind


def test_same_seed_gives_the_same_loss_twice(tiny_config: BenchConfig):
    config = apply_overrides(tiny_config, ["train.max_steps=3"])
    first = run_cell("2", config, new_result("2", config))
    second = run_cell("2", config, new_result("2", config))
    assert value(first, "final_train_loss") == value(second, "final_train_loss")
    assert value(first, "eval_loss") == value(second, "eval_loss")
    other_seed = apply_overrides(config, ["train.seed=7"])
    third = run_cell("2", other_seed, new_result("2", other_seed))
    assert value(third, "final_train_loss") != value(first, "final_train_loss")


def test_full_epochs_are_measured_not_extrapolated(tiny_config: BenchConfig):
    result = run_cell("baseline", tiny_config, new_result("baseline", tiny_config))
    assert value(result, "epoch_time_extrapolated") is False
    assert value(result, "steps_run") == 6  # 96 sentences / batch 16, one epoch
    assert "complete epoch" in result.method("epoch_seconds")


class _Exploding(NoOpFacts, Strategy):
    key = "test-explode"
    name = "test-exploding"
    saves = costs = "nothing (test double)"
    order = 98
    error: BaseException = RuntimeError("boom in prepare_model")

    def prepare_model(self, model, ctx):
        raise type(self).error


@pytest.fixture()
def exploding_strategy():
    register(_Exploding)
    yield _Exploding
    unregister(_Exploding)


def test_worker_writes_an_error_result_for_a_strategy_that_raises(tmp_path, tiny_config, exploding_strategy):
    exploding_strategy.error = RuntimeError("boom in prepare_model")
    code, result = run_worker(tmp_path, tiny_config, "test-explode")
    assert code == 1
    assert result.status == "error"
    assert result.reason == "RuntimeError: boom in prepare_model"
    assert "boom in prepare_model" in result.traceback[-1]
    assert result.data["corpus_fingerprint"]  # what ran before the failure is kept


def test_worker_classifies_out_of_memory(tmp_path, tiny_config, exploding_strategy):
    exploding_strategy.error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    code, result = run_worker(tmp_path, tiny_config, "test-explode")
    assert code == 1 and result.status == "oom"
    assert result.reason == "out of memory: asked for 2,048 MiB"
    assert result.oom["requested_mib"] == 2048.0
    assert "Tried to allocate 2.00 GiB" in result.traceback[-1]


def test_worker_records_a_refused_cell_as_a_one_line_error(tmp_path, tiny_config):
    code, result = run_worker(tmp_path, tiny_config, "1++2")
    assert code == 1 and result.status == "error"
    assert result.reason.startswith("malformed combination '1++2'")
    assert result.traceback is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_worker_explains_missing_cuda(tmp_path, tiny_config):
    code, result = run_worker(tmp_path, apply_overrides(tiny_config, ["device=cuda"]), "baseline")
    assert code == 1 and result.status == "error"
    assert "CUDA was requested but torch.cuda.is_available() is False: use --device cpu" in result.reason


def test_worker_records_an_unreadable_config(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    code = worker_main(["--cell", "1", "--config", str(bad), "--out", str(tmp_path / "r.json")])
    result = read_result(tmp_path / "r.json")
    assert code == 1 and result.status == "error"
    assert result.reason.startswith(f"cannot use config {bad} (JSONDecodeError)")
    assert "cannot use config" in capsys.readouterr().err
    # Stopped before torch was imported, the result still says how its process started.
    assert result.provenance["process"] == "fresh interpreter"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_worker_measures_cuda_memory(tmp_path, tiny_config):
    code, result = run_worker(tmp_path, apply_overrides(tiny_config, ["device=cuda", "train.max_steps=3"]), "1+2+4")
    assert code == 0, result.reason
    assert value(result, "peak_allocated_mib") > 0
    assert value(result, "peak_reserved_mib") >= value(result, "peak_allocated_mib")
    assert result.device["name"] and result.device["total_memory_mib"] > 0
    assert result.strategy_facts["compute_dtype"] == "float16"


@pytest.mark.slow
def test_a_worker_whose_runner_is_gone_stops_as_interrupted(tmp_path: Path, tiny_config: BenchConfig):
    # The runner was killed: its end of the events pipe is closed before its SIGTERM reaches the
    # worker. The next event then finds no reader, which is the same stop, not an error.
    config = apply_overrides(tiny_config, ["train.max_steps=0", "train.epochs=40"])
    config_path = write_config(tmp_path / "resolved.json", config)
    out = tmp_path / "cells" / "1.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "gputech_bench.worker", "--cell", "1", "--config", str(config_path), "--out", str(out), "--events"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    assert json.loads(process.stdout.readline())["event"]  # running: its first event arrived
    process.stdout.close()
    process.wait(timeout=300)
    result = read_result(out)
    assert result.status == "interrupted", result.reason


#: ``python -c IGNORING_CTRL_C ARGS`` runs ``python ARGS`` as a shell runs a background job:
#: with SIGINT ignored across the exec.
IGNORING_CTRL_C = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                   "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


@pytest.mark.slow
def test_a_worker_started_with_ctrl_c_ignored_still_stops_on_it(tmp_path: Path, tiny_config: BenchConfig):
    # A shell starts a script's background commands with SIGINT ignored, and a process keeps an
    # inherited "ignore"; the worker takes Ctrl-C back, so that it stops as it does at a prompt.
    config = apply_overrides(tiny_config, ["train.max_steps=0", "train.epochs=40"])  # seconds of training
    config_path = write_config(tmp_path / "resolved.json", config)
    out = tmp_path / "cells" / "1.json"
    process = subprocess.Popen(
        [sys.executable, "-c", IGNORING_CTRL_C,
         "-m", "gputech_bench.worker", "--cell", "1", "--config", str(config_path), "--out", str(out), "--events"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    assert json.loads(process.stdout.readline())["event"]  # running, its handlers in place
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=300)
    assert process.returncode == 1
    result = read_result(out)
    assert result.status == "interrupted", result.reason
