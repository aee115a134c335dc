"""The memory estimate: fake-tensor traces checked against real tracked CPU runs, and fit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN, NoOpFacts
from typer.testing import CliRunner

from gputech_bench.cli import app
from gputech_bench.config import apply_overrides, load_preset
from gputech_bench.estimator.fit import FitSearch, candidates, modelled_factor
from gputech_bench.estimator.overheads import DEFAULTS, Overheads, calibrate
from gputech_bench.estimator.predict import Setup, predict, setups_for
from gputech_bench.estimator.trace import trace_cell, trace_inputs, trace_target
from gputech_bench.results import CellResult, Figure
from gputech_bench.strategies import parse_cell
from gputech_bench.worker.cell import new_result, run_cell

MIB = 2**20


def tiny_config(cache_dir: Path):
    return apply_overrides(load_preset("cpu"), TINY_RUN + [f"data.cache_dir={cache_dir}"])


@pytest.fixture(scope="module")
def tiny(cache_dir: Path):
    config = apply_overrides(tiny_config(cache_dir), ["train.max_steps=2"])
    return config, trace_inputs(config)


@pytest.mark.parametrize("cell", ["baseline", "1", "2", "3", "1+2+3"])
def test_the_traced_peak_matches_a_real_tracked_cpu_run_within_5_percent(tiny, cell):
    # Without dropout: a CPU run's dropout is unfused (it keeps a noise tensor of the input's
    # dtype for backward), where the trace follows a GPU's fused kernel (a 1-byte mask).
    config = apply_overrides(tiny[0], ["model.dropout=0.0"])
    inputs = trace_inputs(config)
    traced = trace_cell(parse_cell(cell), config, inputs, trace_target())
    real = run_cell(cell, config, new_result(cell, config))
    measured = real.value("tracked_peak_mib") * MIB
    assert traced.device.total_bytes == pytest.approx(measured, rel=0.05)
    # Not just the total: parameters and optimizer state are the same tensors.
    real_categories = real.memory_breakdown["cpu"]
    for category in ("parameters", "optimizer_state"):
        assert traced.device.by_category[category] == pytest.approx(real_categories[f"{category}_mib"] * MIB, abs=0.01 * MIB)


def test_the_trace_allocates_nothing_and_keeps_the_host_apart_for_strategy_4(tiny):
    config, inputs = tiny
    traced = trace_cell(parse_cell("4"), config, inputs, trace_target())
    baseline = trace_cell(parse_cell("baseline"), config, inputs, trace_target())
    # The device holds half-precision weights; the fp32 master and AdamW's two moments are on the host.
    assert traced.device.by_category["parameters"] == pytest.approx(baseline.device.by_category["parameters"] / 2, rel=0.02)
    assert traced.device.by_category["optimizer_state"] == 0
    assert traced.host is not None
    assert traced.host.by_category["parameters"] == pytest.approx(baseline.device.by_category["parameters"], rel=0.01)
    # The moments, plus what AdamW allocates inside its step (counted as optimizer state).
    assert traced.host.by_category["optimizer_state"] >= baseline.device.by_category["optimizer_state"]


def test_8bit_adam_state_is_about_a_quarter_of_adamw_in_the_trace(tiny):
    config, inputs = apply_overrides(tiny[0], ["model.hidden_size=128", "model.intermediate_size=512"]), None
    inputs = trace_inputs(config)
    adamw = trace_cell(parse_cell("baseline"), config, inputs, trace_target()).device.by_category["optimizer_state"]
    adam8 = trace_cell(parse_cell("3"), config, inputs, trace_target()).device.by_category["optimizer_state"]
    assert 0.2 < adam8 / adamw < 0.35


@pytest.mark.slow
def test_the_seed_estimate_orders_memory_as_physics_says(cache_dir: Path):
    config = apply_overrides(load_preset("seed"), [f"data.cache_dir={cache_dir}"])
    cells = ["baseline", "1", "2", "1+2+3", "1+2+4"]
    peaks = {p.setup.cell: p.device.total_bytes for p in predict(setups_for(cells, config), config, jobs=2)}
    assert peaks["1+2+4"] < peaks["1+2+3"] < peaks["2"] < peaks["baseline"]
    assert peaks["1"] < peaks["baseline"]


def test_overheads_are_calibrated_from_measured_cuda_cells():
    def cuda_result(allocated, reserved, nvml):
        metrics = {"peak_allocated_mib": {"value": allocated}, "peak_reserved_mib": {"value": reserved},
                   "nvml_process_peak_mib": {"value": nvml}}
        return CellResult("baseline", "ok", None, device={"type": "cuda"},
                          metrics={name: Figure.from_dict(entry) for name, entry in metrics.items()})

    overheads = calibrate([cuda_result(1000, 1200, 1700), cuda_result(2000, 2200, 2800), CellResult("1", "oom", "out of memory")])
    assert overheads.reserve_fraction == pytest.approx((0.2 + 0.1) / 2)
    assert overheads.context_bytes == 550 * MIB
    assert "2 measured" in overheads.context_source
    assert calibrate([]) == DEFAULTS


def test_fit_candidates_keep_the_effective_batch(cache_dir: Path):
    config = load_preset("seed")
    setups = candidates(config)
    micro = {s.micro_batch_size for s in setups if "2" in s.cell.split("+")}
    assert micro == {16, 8, 4, 2}
    assert Setup("baseline") in setups and all(s.micro_batch_size is None for s in setups if "2" not in s.cell.split("+"))
    assert modelled_factor(Setup("1+2", 8), config) == pytest.approx(4 / 3 * 1.6)
    assert "lora" not in {s.cell for s in candidates(config, exclude={"lora"})}


def _fake_trace(device_bytes: dict[str, int]):
    """A trace that returns set peaks per cell: fit's search logic on its own."""
    from gputech_bench.estimator.predict import Prediction
    from gputech_bench.measure.tracker import TrackedPeak

    def trace(setups, config, limit=None):
        out = []
        for setup in setups:
            base = device_bytes.get(setup.cell, device_bytes["default"])
            scale = config.data.max_length / 128 * ((setup.micro_batch_size or 32) / 32 if "2" in setup.cell else 1)
            out.append(Prediction(setup, TrackedPeak("meta", int(base * scale), {}), None, 0.0, {}))
        return out

    return trace


# Tensor bytes alone: no context, no reserve, the allocator's replay left out (its segments
# and workspaces would dwarf a tiny model's bytes; tests/test_reserved.py checks the replay).
NO_OVERHEAD = Overheads(0, "test", 0.0, "test", replayed=False)


def test_fit_picks_the_fastest_setup_that_fits_when_the_baseline_does_not():
    config = load_preset("seed")
    trace = _fake_trace({"baseline": 20 * 2**30, "3": 19 * 2**30, "1": 12 * 2**30, "default": 4 * 2**30})
    # Without the setups faster than the baseline (lora, bf16-weights, amp's cells at x0.6) or as fast
    # (optimizer-in-backward, adam4bit and paged-adam8bit at x1.0, which this fake trace would let fit),
    # which fit would weigh first: the baseline would never be weighed, and the search has to reject it first.
    result = FitSearch(config, 16 * 2**30, NO_OVERHEAD, trace, wanted=2,
                       exclude={"lora", "bf16-weights", "amp", "amp-fp16", "optimizer-in-backward", "adam4bit",
                                "paged-adam8bit"}).run()
    assert result.floor is None
    assert result.chosen[0].setup.cell != "baseline" and result.chosen[0].fits
    assert all(c.device_total <= 16 * 2**30 for c in result.chosen)
    assert {c.setup.cell for c in result.rejected} >= {"baseline"}
    factors = [c.time.factor for c in result.chosen]
    assert factors == sorted(factors)


def test_fit_says_what_would_fit_when_nothing_does():
    config = load_preset("seed")
    # The floor (every strategy, micro-batch 2) needs 3 GiB x 2/32; half the sequence length halves that.
    result = FitSearch(config, int(0.15 * 2**30), NO_OVERHEAD, _fake_trace({"default": 3 * 2**30})).run()
    assert result.floor is not None and not result.chosen
    assert result.suggestions and "data.max_length=64" in result.suggestions[0]


def test_fit_on_a_real_trace_of_the_tiny_model(tiny):
    config, _ = tiny
    trace = lambda setups, cfg, limit=None: predict(setups, cfg, jobs=1, limit=limit)  # noqa: E731
    baseline = trace([Setup("baseline")], config)[0].device.total_bytes
    result = FitSearch(config, int(baseline * 0.8), NO_OVERHEAD, trace, wanted=1, exclude={"lora", "3"}).run()
    assert result.chosen and result.chosen[0].device_total < baseline * 0.8


runner = CliRunner()


@pytest.mark.parametrize("budget", ["24 GB", "24GiB"])
def test_fit_reads_budgets_as_people_write_them(budget, cache_dir: Path):
    args = ["fit", "--budget", budget, "--preset", "cpu", "--jobs", "1", *sum((["--set", o] for o in TINY_RUN), []),
            "--set", f"data.cache_dir={cache_dir}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "best" in result.output


def test_fit_rejects_a_budget_it_cannot_read():
    result = runner.invoke(app, ["fit", "--budget", "lots", "--preset", "cpu"])
    assert result.exit_code == 2
    assert "cannot read memory size 'lots'" in result.output and "Traceback" not in result.output


def test_fit_refuses_cleanly_when_nothing_fits(cache_dir: Path):
    args = ["fit", "--budget", "1KiB", "--preset", "cpu", "--jobs", "1", *sum((["--set", o] for o in TINY_RUN), []),
            "--set", f"data.cache_dir={cache_dir}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "nothing fits" in result.output and "Traceback" not in result.output
    # A budget under 1 GiB reads in MiB or bytes, never as 0.0 GiB.
    assert "nothing fits 1,024 bytes" in result.output and "0.0 GiB" not in result.output


@pytest.mark.parametrize("size, text", [
    (40 * 2**20, "40.00 MiB"), (24 * 2**30, "24.00 GiB"), (3_000, "3,000 bytes"), (0, "0.00 MiB"),
    (2**30 - 1, "1024.00 MiB"),
])
def test_every_size_reads_in_the_unit_that_shows_it(size: int, text: str):
    from gputech_bench.report.table import fmt_mib
    from gputech_bench.units import format_gib, format_size

    assert format_size(size) == text
    assert format_gib(40 * 2**20) == "40.0 MiB" and format_gib(24 * 2**30) == "24.0 GiB"
    assert fmt_mib(0.04) == "0.04 MiB" and fmt_mib(512) == "512.0 MiB"  # a figure under 1 MiB is never 0.0


def test_estimate_command_prints_categories_and_fit(cache_dir: Path):
    args = ["estimate", "--strategies", "1,4", "--preset", "cpu", "--jobs", "1", "--device-memory", "1GiB",
            *sum((["--set", o] for o in TINY_RUN), []), "--set", f"data.cache_dir={cache_dir}", "--format", "md"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| baseline |" in result.output and "| 4 |" in result.output and "fits 1.0 GiB" in result.output


def test_estimate_compares_with_a_run_it_is_given(tmp_path: Path, cache_dir: Path):
    from helpers import run_request

    from gputech_bench.results import RunFolder, write_result
    from gputech_bench.run.runner import prepare_run_dir

    config = tiny_config(cache_dir)
    layout = RunFolder(tmp_path / "run")
    prepare_run_dir(run_request(layout, config=config))
    measured = dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=2))
    result = run_cell("1", measured, new_result("1", measured))
    write_result(layout.result_path("1"), result)
    out = runner.invoke(app, ["estimate", "--compare", str(layout.root), "--jobs", "1", "--format", "json"])
    assert out.exit_code == 0, out.output
    import json

    rows = {row["cell"]: row for row in json.loads(out.output)["rows"]}
    assert abs(rows["1"]["error_percent"]) < 5


def test_estimate_refuses_a_folder_that_is_not_a_run(tmp_path: Path):
    result = runner.invoke(app, ["estimate", "--compare", str(tmp_path)])
    assert result.exit_code == 2 and "holds no config.json" in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: fake CUDA tensors need a CUDA build of torch")
def test_fake_cuda_trace_runs_on_a_gpu_machine(tiny):
    config, inputs = tiny
    target = trace_target()
    assert target.device.type == "cuda"
    before = torch.cuda.memory_allocated()
    traced = trace_cell(parse_cell("1+2+4"), config, inputs, target)
    assert traced.device.total_bytes > 0 and traced.host is not None
    assert torch.cuda.memory_allocated() == before  # nothing real was allocated


@pytest.mark.slow
def test_fit_verify_runs_the_best_setup_and_checks_the_prediction(tmp_path: Path, cache_dir: Path):
    # Without dropout, for the reason the CPU comparison above gives.
    sets = sum((["--set", o] for o in TINY_RUN + [f"data.cache_dir={cache_dir}", "train.max_steps=2", "model.dropout=0.0"]), [])
    result = runner.invoke(app, ["fit", "--budget", "1GiB", "--preset", "cpu", "--jobs", "1", *sets, "--top", "1",
                                 "--verify", "--results", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    import re

    text = " ".join(result.output.split())  # rich wraps long lines
    error = float(re.search(r"predicted tensor peak .*?: ([+-][0-9.]+)%", text).group(1))
    assert abs(error) < 5
    assert len(list((tmp_path / "r").glob("fit-*/*.json"))) >= 2  # config.json and the cell's result


def test_report_shows_the_saved_estimate_under_the_table(tmp_path: Path, cache_dir: Path):
    from gputech_bench.api._estimate import build_estimate
    from gputech_bench.estimator.render import write_estimate
    from gputech_bench.results import RunFolder, write_result

    config = apply_overrides(tiny_config(cache_dir), ["train.max_steps=2"])
    result = run_cell("baseline", config, new_result("baseline", config))
    write_result(tmp_path / "baseline.json", result)
    write_estimate(RunFolder(tmp_path), build_estimate(config, ["baseline"], 1, None, [result]))
    out = runner.invoke(app, ["report", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "predicted (fake-tensor trace) against measured" in out.output and "skipped" not in out.output
    (tmp_path / "estimate.json").write_text("{broken")
    out = runner.invoke(app, ["report", str(tmp_path)])
    assert out.exit_code == 0 and "estimate.json is unreadable" in " ".join(out.output.split())


def test_a_cell_the_tracer_cannot_follow_is_a_row_with_its_reason_and_the_others_stand(tiny):
    from gputech_bench.strategies import Strategy, register, unregister

    class ReadsAValue(NoOpFacts, Strategy):
        key = "test-reads"
        name = "test-reads-a-value"
        saves = costs = "nothing (test)"
        order = 95

        def prepare_model(self, model, ctx):
            float(next(model.parameters()).sum())  # data-dependent: fake tensors have no values
            return model

    register(ReadsAValue)
    try:
        config, _ = tiny
        predictions = predict([Setup("baseline"), Setup("test-reads")], config, jobs=1)
    finally:
        unregister(ReadsAValue)
    assert predictions[0].error is None and predictions[0].device.total_bytes > 0
    assert predictions[1].error and "DataDependentOutputException" in predictions[1].error
    from gputech_bench.estimator.render import EstimateReport, markdown

    text = markdown(EstimateReport("test", None, predictions, NO_OVERHEAD, 2**30))
    assert "| test-reads | not traced [1] |" in text
    assert "- [1] not traced: DataDependentOutputException" in text


class _SavedOnCpu(torch.nn.Module):
    """The model with every tensor saved for backward moved to the host (torch's save_on_cpu)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        with torch.autograd.graph.save_on_cpu():
            return self.model(**inputs)


def test_activations_moved_to_the_host_keep_the_host_peak_in_the_estimate():
    from gputech_bench.strategies import Cell, Strategy

    class OffloadActivations(NoOpFacts, Strategy):  # a cell of its own, never registered
        key = name = "test-offload-activations"
        saves = costs = "test"
        order = 99

        def prepare_model(self, model, ctx):
            return _SavedOnCpu(model)

    config = load_preset("cpu")
    inputs = trace_inputs(config)
    offloaded = trace_cell(Cell((OffloadActivations,)), config, inputs, trace_target())
    kept = trace_cell(parse_cell("baseline"), config, inputs, trace_target())
    # The host holds none of the weights, only activations: its peak is still a figure.
    assert offloaded.host is not None and offloaded.host.by_category["parameters"] == 0
    assert offloaded.host.by_category["activations"] > 0.9 * kept.device.by_category["activations"]
    assert offloaded.device.by_category["activations"] < 0.01 * kept.device.by_category["activations"]
    assert kept.host is None  # the baseline's host holds only the optimizer's step counters
