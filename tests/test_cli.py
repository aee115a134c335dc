"""The command line. Bad input is checked in-process (typer's CliRunner): each refusal
happens before any worker starts, so an interpreter per case would only add its start-up.
A real process checks the entry point once, and the slow tests run real workers."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN, assert_one_line_error, gputech, invoke


def tiny_sets(cache_dir: Path, *leave_out: str) -> list[str]:
    args = []
    for override in TINY_RUN + [f"data.cache_dir={cache_dir}", "train.max_steps=3"]:
        if not override.startswith(leave_out):
            args += ["--set", override]
    return args


@pytest.mark.slow
def test_run_writes_a_result_per_cell_and_prints_the_table(tmp_path: Path, cache_dir: Path):
    # Without dropout, so that the post-run estimate (a GPU's fused dropout) and the CPU run compare like for like.
    out = gputech("run", "--strategies", "4,lora", "--preset", "cpu", *tiny_sets(cache_dir),
                  "--set", "model.dropout=0.0", "--set", "strategy.lora_dropout=0.0",
                  "--results", str(tmp_path / "results"), "--run-name", "smoke", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "results" / "smoke"
    cells = ["baseline", "4", "lora"]
    assert {p.name for p in run_dir.glob("*.json")} == {"config.json", "report.json", "estimate.json", *(f"{c}.json" for c in cells)}
    results = {c: json.loads((run_dir / f"{c}.json").read_text()) for c in cells}
    assert all(r["status"] == "ok" for r in results.values())

    # The terminal table: the seed's columns, rows in the seed's order.
    assert "tensor peak (CPU)" in out.stdout and "time / epoch" in out.stdout and "token acc (seed)" in out.stdout
    measured_table, estimate_table = out.stdout.split("predicted (fake-tensor trace) against measured")
    table_rows = [line for line in measured_table.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in table_rows] == cells
    # After the cells, the fake-tensor estimate of each, against what was measured.
    estimate = {row["cell"]: row for row in json.loads((run_dir / "estimate.json").read_text())["rows"]}
    assert set(estimate) == set(cells)
    assert abs(estimate["baseline"]["error_percent"]) < 5 and abs(estimate["lora"]["error_percent"]) < 5
    assert estimate["4"]["measured_what"].startswith("n/a on CPU") and estimate["4"]["host_peak_mib"] > 0
    assert "| baseline" not in estimate_table and "│ baseline" in estimate_table
    assert "compute copy runs in bfloat16 on the CPU" in out.stdout  # strategy 4 says its dtype
    assert "trains " in out.stdout and "parameters (" in out.stdout  # LoRA reports trainable/total

    # Markdown shaped like the seed's: baseline figures in the headers, provenance below.
    markdown = (run_dir / "report.md").read_text()
    baseline_peak = results["baseline"]["metrics"]["tracked_peak_mib"]["value"]
    assert f"tensor peak (CPU) (baseline: {baseline_peak:,.1f} MiB)" in markdown
    assert "| 4 (mixed-precision) |" in markdown and "**device:** CPU" in markdown and "torch " in markdown

    # CSV and JSON: one row per cell, every measured field, stable names.
    import pandas as pd

    from gputech_bench.report.frame import COLUMNS

    csv = pd.read_csv(run_dir / "report.csv")
    assert list(csv.columns) == list(COLUMNS) and list(csv["cell"]) == cells
    assert csv.loc[csv.cell == "4", "tracked_peak_mib"].item() == results["4"]["metrics"]["tracked_peak_mib"]["value"]
    report = json.loads((run_dir / "report.json").read_text())
    assert [row["cell"] for row in report["rows"]] == cells and report["memory_column"] == "tracked_peak_mib"
    assert report["rows"][0]["memory_x_baseline"] == 1.0


@pytest.mark.slow
def test_user_text_files_replace_the_embedded_corpus(tmp_path: Path, cache_dir: Path):
    sentences = [f"Sentence number {i} talks about the {w} of a small benchmark." for i, w in
                 enumerate(["shape", "cost", "memory", "speed", "time", "size"] * 12)]
    (tmp_path / "train.txt").write_text("\n".join(sentences[:60]) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(sentences[60:]) + "\n")
    # No data.train_sentences: a user's file is used whole unless that is set.
    out = gputech("run", "--strategies", "1", "--preset", "cpu", *tiny_sets(cache_dir, "data.train_sentences"), "--train-file", "train.txt",
                  "--eval-file", "eval.txt", "--results", "results", "--run-name", "files", "--no-estimate", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "files" / "1.json").read_text())
    assert result["data"]["train_sentences"] == 60 and result["data"]["eval_sentences"] == 12
    assert result["data"]["corpus_source"].startswith("files")


def refused(*args: str, fragments: tuple[str, ...], results: Path) -> None:
    """``run ARGS`` is refused in one line naming ``fragments``, and nothing was started."""
    out = invoke("run", "--preset", "cpu", *args, "--results", str(results))
    assert out.exception is None or isinstance(out.exception, SystemExit), out.exception
    assert_one_line_error(out.exit_code, out.stderr, *fragments)
    assert out.stdout == ""
    assert not results.exists()  # nothing was started


@pytest.mark.parametrize(
    "args, fragments",
    [
        pytest.param(["--strategies", "9"], ["unknown strategy '9'"], id="unknown-strategy"),
        pytest.param(["--strategies", "1++2"], ["malformed combination '1++2'"], id="malformed-cell"),
        pytest.param(["--preset", "huge"], ["unknown preset 'huge'"], id="unknown-preset"),
        pytest.param(["--set", "train.epoch=1"], ["unknown config key 'train.epoch'", "did you mean 'train.epochs'"],
                     id="set-unknown-key"),
        pytest.param(["--set", "train.epochs=many"], ["train.epochs expects an integer"], id="set-bad-value"),
        pytest.param(["--train-file", "missing.txt"], ["--train-file 'missing.txt' is not a file"], id="missing-file"),
        pytest.param(["--strategies", "4+amp"], ["'4' cannot run with 'amp'", "neither the seed's recipe nor amp's"],
                     id="4+amp"),
        pytest.param(["--strategies", "3+fsdp-offload"], ["'fsdp-offload' cannot run with '3'", "DTensor"],
                     id="3+fsdp-offload"),
        pytest.param(["--nnodes", "2"], ["--nnodes > 1 needs --rdzv-endpoint HOST:PORT"], id="nnodes-without-endpoint"),
        pytest.param(["--nproc-per-node", "2", "--rdzv-endpoint", "node0"], ["'node0' is not HOST:PORT"],
                     id="endpoint-without-port"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, monkeypatch, args: list[str], fragments: list[str]):
    monkeypatch.chdir(tmp_path)  # relative paths such as missing.txt
    refused(*args, fragments=tuple(fragments), results=tmp_path / "r")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
@pytest.mark.parametrize("args, fragment", [
    pytest.param(["--strategies", "paged-adam8bit"], "paged-adam8bit needs a CUDA device and this run has none",
                 id="paged-adam8bit"),
    pytest.param(["--gpus", "0,1"], "--gpus needs CUDA devices and this run has none", id="gpus"),
    pytest.param(["--gpu-memory-limit", "24GiB"], "need a CUDA device", id="gpu-memory-limit"),
])
def test_cuda_only_options_are_refused_without_cuda(tmp_path: Path, args: list[str], fragment: str):
    refused(*args, fragments=(fragment,), results=tmp_path / "r")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_cuda_requested_without_cuda_is_refused(tmp_path: Path):
    refused("--device", "cuda", fragments=("--device cuda", "use --device cpu"), results=tmp_path / "r")


def test_unwritable_results_folder_is_refused(tmp_path: Path):
    blocker = tmp_path / "occupied"
    blocker.write_text("a file where the results folder should be")
    out = invoke("run", "--preset", "cpu", "--results", str(blocker))
    assert_one_line_error(out.exit_code, out.stderr, "cannot write to results folder", "--results")
    assert blocker.read_text() == "a file where the results folder should be"


def test_help_shows_examples():
    out = invoke("run", "--help")
    assert out.exit_code == 0
    assert "gputech-bench run --matrix" in out.stdout


def test_strategies_and_presets_list_everything():
    strategies = invoke("strategies")
    assert strategies.exit_code == 0
    for name in ("checkpointing", "accumulation", "adam8bit", "mixed-precision", "lora"):
        assert name in strategies.stdout
    presets = invoke("presets")
    assert presets.exit_code == 0 and "seed" in presets.stdout and "model.num_layers = 2" in presets.stdout


def test_an_empty_corpus_file_is_refused(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    refused("--train-file", "empty.txt", fragments=("--train-file 'empty.txt' is empty", "one sentence per line"),
            results=tmp_path / "r")


def test_a_real_process_refuses_bad_input_in_one_line(tmp_path: Path):
    # The entry point as installed: python -m gputech_bench, its exit status and stderr.
    out = gputech("run", "--preset", "cpu", "--strategies", "9", "--results", str(tmp_path / "r"), cwd=tmp_path)
    assert_one_line_error(out.returncode, out.stderr, "unknown strategy '9'")
    assert out.stdout == "" and not (tmp_path / "r").exists()


def test_the_entry_point_takes_ctrl_c_back_when_started_with_it_ignored(monkeypatch, capsys, ctrl_c_raises):
    # A shell starts a script's background commands with SIGINT ignored, and a process keeps
    # an inherited "ignore": the command would then stop neither on Ctrl-C nor on `kill -INT`.
    from gputech_bench.cli import main

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    monkeypatch.setattr(sys, "argv", ["gputech-bench", "--version"])
    with pytest.raises(SystemExit):
        main()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert "gputech-bench" in capsys.readouterr().out
