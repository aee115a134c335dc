"""What would mis-measure or stop a run on a real card, proven on a CPU with stubs: compiled
cells' peaks, paged optimizer state, the cap's context, evaluation under a cap, snapshots and
the attention kernel."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import NoOpFacts, context, make_result, tiny_bert

import gputech_bench.worker.cell as cell_module
from gputech_bench.cli.tables import results_table
from gputech_bench.config import BenchConfig, apply_overrides, load_preset
from gputech_bench.data import TokenizedSplit
from gputech_bench.measure.cap import overshoot_note
from gputech_bench.measure.paged import paged_state_bytes
from gputech_bench.measure.warmup import warm_up_cuda_libraries
from gputech_bench.measure.window import PeakWindow
from gputech_bench.report.frame import build_frame
from gputech_bench.report.table import markdown, table_notes
from gputech_bench.results import CellResult
from gputech_bench.strategies import Strategy, build_plan, parse_cell, register, unregister
from gputech_bench.training.loop import train
from gputech_bench.worker.cell import apply_memory_cap, new_result, record_paged_state, run_cell

MIB = 2**20


def value(result: CellResult, name: str):
    return result.value(name)


# --------------------------------------------------------------------------- 2. compiled cells


class FakeSampler:
    def __init__(self) -> None:
        self.restarts = 0

    def restart(self) -> None:
        self.restarts += 1


@pytest.fixture()
def stubbed_cuda(monkeypatch):
    """Records the CUDA calls a compiled cell's peak window makes, on a machine without CUDA."""
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset_peaks"))
    return calls


def test_a_compiled_cells_cuda_peaks_restart_after_the_eager_tracked_step(stubbed_cuda):
    sampler = FakeSampler()
    window = PeakWindow(torch.device("cuda", 0), sampler, compiled=True)
    window.after_tracked_step(more_steps=True)
    assert stubbed_cuda == ["synchronize", "empty_cache", "reset_peaks"] and sampler.restarts == 1
    assert window.description == "over the compiled training steps after the memory-tracked (eager) one"
    assert any("runs eagerly under MemTracker" in note for note in window.notes)


def test_an_eager_cells_peaks_cover_every_step(stubbed_cuda):
    sampler = FakeSampler()
    window = PeakWindow(torch.device("cuda", 0), sampler, compiled=False)
    window.after_tracked_step(more_steps=True)
    assert stubbed_cuda == [] and sampler.restarts == 0 and window.description == "over the training steps"
    assert window.notes == []


def test_a_compiled_cell_with_no_step_after_the_tracked_one_says_its_peaks_are_eager(stubbed_cuda):
    window = PeakWindow(torch.device("cuda", 0), FakeSampler(), compiled=True)
    window.after_tracked_step(more_steps=False)
    assert stubbed_cuda == [] and window.description == "over the training steps"
    assert any("raise train.max_steps to 3 or more" in note for note in window.notes)


class _Recompiles(NoOpFacts, Strategy):
    """Stands in for compile: a model that would recompile on a new batch shape."""

    key = "test-recompiles"
    name = "test-recompiles"
    saves = costs = "nothing (test double)"
    order = 97
    recompiles_on_new_shapes = True


@pytest.fixture()
def recompiling_strategy():
    register(_Recompiles)
    yield _Recompiles
    unregister(_Recompiles)


def tiny_split(rows: int) -> TokenizedSplit:
    ids = torch.randint(5, 300, (rows, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    return TokenizedSplit(ids, torch.ones_like(ids))


@pytest.mark.parametrize("cell, untimed_short", [("baseline", 0), ("test-recompiles", 2)], ids=["eager", "recompiling"])
def test_the_short_last_batch_of_a_recompiling_model_is_kept_out_of_the_timing(recompiling_strategy, cell, untimed_short):
    from gputech_bench.data import MaskingSpec

    ctx = context("train.batch_size=8", "train.epochs=2")
    plan = build_plan(parse_cell(cell), tiny_bert(), ctx)
    spec = MaskingSpec(mask_token_id=4, vocab_size=300, special_token_ids=(0, 1, 2, 3, 4))
    outcome = train(plan, tiny_split(28), spec, ctx)  # batches of 8, 8, 8, 4 in each of 2 epochs
    assert outcome.steps_run == 8 and outcome.untimed_short_batches == untimed_short
    # Never timed: the warm-up step, the tracked step, and (recompiling only) each short batch.
    assert len(outcome.step_seconds) == 8 - 2 - untimed_short
    assert len(outcome.epoch_seconds) == 2, "both epochs still get a time, the short step at the mean"
    assert ("recompiles under torch.compile" in outcome.epoch_time[1]) == bool(untimed_short)


# --------------------------------------------------------------------------- 3. paged optimizer state


def test_paged_optimizer_state_is_counted_and_shown_apart():
    paged = torch.zeros(1000, dtype=torch.uint8)
    paged.is_paged = True  # what bitsandbytes' get_paged() sets on a cudaMallocManaged buffer
    ordinary = torch.zeros(1000, dtype=torch.float32)
    optimizer = type("Optimizer", (), {"state": {0: {"state1": paged, "absmax1": ordinary, "step": 3}}})()
    assert paged_state_bytes(optimizer) == 1000

    big = torch.zeros(3 * MIB, dtype=torch.uint8)
    big.is_paged = True
    optimizer.state[1] = {"state2": big}
    result = CellResult("paged-adam8bit", memory_breakdown={"cpu": {"optimizer_state_mib": 3.0}, "cuda:0": {}})
    record_paged_state(result, optimizer)
    assert result.value("paged_optimizer_state_mib") == pytest.approx((3 * MIB + 1000) / MIB, abs=1e-3)  # to_mib rounds
    assert "not in the allocated or reserved peaks" in result.method("paged_optimizer_state_mib")
    assert result.memory_breakdown["cpu"]["paged_optimizer_state_mib"] == pytest.approx(3.0, abs=0.01)

    rows = [make_result("baseline", device="cuda", nvml_process_peak_mib=1000.0, epoch_seconds=1.0),
            make_result("paged-adam8bit", device="cuda", nvml_process_peak_mib=900.0, epoch_seconds=1.0,
                        paged_optimizer_state_mib=123.4)]
    frame, measure = build_frame(rows)
    note = next(note for note in table_notes(frame) if "unified memory" in note)
    assert "paged-adam8bit 123.4 MiB" in note and "outside the memory column" in note
    assert "paged-adam8bit 123.4 MiB" in markdown(frame, measure, rows)


def test_an_optimizer_without_paged_state_adds_nothing():
    result = CellResult("3")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))])
    record_paged_state(result, optimizer)
    assert result == CellResult("3")


# --------------------------------------------------------------------------- 4. the cap's context


def test_the_context_is_measured_after_the_libraries_have_loaded(monkeypatch):
    order: list[str] = []
    monkeypatch.setattr(cell_module, "warm_up_cuda_libraries",
                        lambda device, keys: order.append(f"warm up {sorted(keys)}") or ["cuBLAS/cuBLASLt fp32"])
    monkeypatch.setattr(cell_module.cuda_memory, "context_bytes",
                        lambda device: order.append("measure") or (740 * MIB, "NVML process usage minus the allocator's reserve"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 80 * 2**30})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, device: order.append("cap"))
    config = apply_overrides(BenchConfig(), ["gpu_memory_limit=24GiB"])
    result = CellResult("1+3")
    apply_memory_cap(config, torch.device("cuda", 0), result, {"3", "1"})
    assert order == ["warm up ['1', '3']", "measure", "cap"]
    assert result.memory_cap["context_mib"] == 740.0
    assert "after warming up cuBLAS/cuBLASLt fp32" in result.memory_cap["context_method"]


def test_the_warm_up_runs_a_step_of_each_kind_the_cell_uses():
    warmed = warm_up_cuda_libraries(torch.device("cpu"), {"bitsandbytes"})
    assert warmed == ["cuBLAS/cuBLASLt fp32", "autocast float16", "autocast bfloat16", "bitsandbytes 8-bit optimizer"]
    assert "bitsandbytes 8-bit optimizer" not in warm_up_cuda_libraries(torch.device("cpu"), {"peft"})


def test_an_nvml_peak_past_the_limit_is_named():
    cap = {"limit_mib": 24576.0}
    assert overshoot_note(cap, 24000.0) is None and overshoot_note(cap, None) is None
    note = overshoot_note(cap, 25000.0)
    assert "went 424 MiB past the --gpu-memory-limit of 24,576 MiB" in note


# --------------------------------------------------------------------------- 5. evaluation under a cap


def test_evaluation_runs_no_more_rows_than_a_training_forward(monkeypatch, tiny_config):
    seen: list[int] = []
    real_evaluate = cell_module.evaluate

    def recording(model, eval_set, device, batch_size, autocast):
        seen.append(batch_size)
        return real_evaluate(model, eval_set, device, batch_size, autocast)

    monkeypatch.setattr(cell_module, "evaluate", recording)
    config = apply_overrides(tiny_config, ["train.max_steps=3", "train.eval_batch_size=16"])
    baseline = run_cell("baseline", config, new_result("baseline", config))
    accumulated = run_cell("2", config, new_result("2", config))
    assert seen == [16, 4]  # batch 16 in one forward; micro-batches of 4 under 2
    assert accumulated.evaluation["rows_per_forward"] == 4
    # Slicing changes how many rows run at once, never the scores' meaning.
    assert value(accumulated, "eval_token_accuracy") is not None and value(baseline, "eval_masked_accuracy") is not None


def test_evaluation_out_of_memory_keeps_every_training_figure(monkeypatch, tiny_config):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.30 GiB. this process has 21.50 GiB memory in use.")

    monkeypatch.setattr(cell_module, "evaluate", out_of_memory)
    config = apply_overrides(tiny_config, ["train.max_steps=3"])
    result = run_cell("1", config, new_result("1", config))
    assert result.status == "eval-oom" and "evaluation ran out of memory" in result.reason
    for name in ("tracked_peak_mib", "epoch_seconds", "final_train_loss", "cell_seconds"):
        assert value(result, name) is not None, name
    assert "eval_masked_accuracy" not in result.metrics
    assert result.oom["requested_mib"] == pytest.approx(2.3 * 1024)

    baseline = make_result("baseline", tracked_peak_mib=100.0, epoch_seconds=10.0, eval_masked_accuracy=0.4,
                           eval_token_accuracy=0.9)
    frame, measure = build_frame([baseline, result])
    row = frame.set_index("cell").loc["1"]
    assert row.memory_mib == value(result, "tracked_peak_mib") and not math.isnan(row.epoch_seconds)
    assert math.isnan(row.eval_masked_accuracy)
    text = markdown(frame, measure, [baseline, result])
    line = next(line for line in text.splitlines() if line.startswith("| 1 "))
    assert f"{row.memory_mib:,.1f} MiB" in line and "eval-oom: training finished" in line


# --------------------------------------------------------------------------- 8. memory snapshots


def test_a_snapshot_runs_time_is_flagged_in_every_table_and_in_compare(tmp_path):
    from gputech_bench.report.compare import compare_runs
    from gputech_bench.results import LoadedRun, RunFolder

    plain = make_result("baseline", device="cuda", nvml_process_peak_mib=1000.0, epoch_seconds=10.0)
    recorded = make_result("baseline", device="cuda", nvml_process_peak_mib=1000.0, epoch_seconds=14.0)
    recorded.memory_snapshot = "results/x/baseline.snapshot.pickle"
    frame, measure = build_frame([recorded])
    assert frame["memory_snapshot"].tolist() == [True]
    assert any(note.startswith("† recorded a CUDA memory snapshot") for note in table_notes(frame))
    assert "14.0 s†" in markdown(frame, measure, [recorded])
    warnings = compare_runs(LoadedRun(RunFolder(tmp_path / "a"), [plain]), LoadedRun(RunFolder(tmp_path / "b"), [recorded])).warnings
    assert any("memory snapshots (--memory-snapshot) were recorded in no cell -> baseline" in w for w in warnings)


# --------------------------------------------------------------------------- 9. the attention kernel


def test_every_table_names_the_attention_kernel():
    rows = [make_result("baseline", tracked_peak_mib=100.0, epoch_seconds=1.0),
            make_result("1", tracked_peak_mib=60.0, epoch_seconds=1.3)]
    for row in rows:
        row.model = {"attention": "eager"}
    frame, _ = build_frame(rows)
    assert any(note.startswith("attention: eager (the seed's 2022 kernel") for note in table_notes(frame))
    rows[1].model = {"attention": "sdpa"}
    frame, measure = build_frame(rows)
    assert any(note.startswith("attention differs between cells") for note in table_notes(frame))
    results_table(frame, measure)  # renders


def test_sdpa_traces_below_eager_on_the_stand_in_device_and_says_it_is_modelled():
    from gputech_bench.estimator.trace import (
        FUSED_SDPA_NOTE,
        modelled_attention_note,
        trace_cell,
        trace_inputs,
        trace_target,
    )

    base = apply_overrides(load_preset("cpu"), ["device=cpu", "data.train_sentences=64", "data.max_length=64",
                                                "model.max_position_embeddings=64"])
    inputs = trace_inputs(base)
    target = trace_target()
    peaks = {}
    for kernel in ("eager", "sdpa"):
        config = apply_overrides(base, [f"model.attention={kernel}"])
        peaks[kernel] = trace_cell(parse_cell("baseline"), config, inputs, target).device.by_category["activations"]
    # Eager keeps batch x heads x L x L probabilities (and their dropout) per layer; the fused kernel does not.
    kept_by_eager = 2 * 32 * 2 * 64 * 64 * 4  # layers x batch x heads x L x L fp32 probabilities
    assert peaks["eager"] - peaks["sdpa"] >= kept_by_eager, peaks
    if target.device.type == "meta":
        assert modelled_attention_note(apply_overrides(base, ["model.attention=sdpa"]), target) == FUSED_SDPA_NOTE
    assert modelled_attention_note(base, target) is None


def test_sdpa_runs_end_to_end_and_the_result_says_so(tiny_config):
    config = apply_overrides(tiny_config, ["train.max_steps=3", "model.attention=sdpa"])
    result = run_cell("baseline", config, new_result("baseline", config))
    assert result.status == "ok" and result.model["attention"] == "sdpa"
    frame, _ = build_frame([result])
    assert any(note.startswith("attention: sdpa") for note in table_notes(frame))
