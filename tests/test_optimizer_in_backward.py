"""optimizer-in-backward does what its name says, proven with numbers on a tiny CPU BERT:
the same updates as the plain optimizer, LR schedule included; each gradient freed inside
backward, so the gradients' bytes leave the tracked peak; clipping turned off and said so;
the pairs it cannot run with refused in one line."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN, context, make_result, random_batch, tiny_bert

from gputech_bench.config import apply_overrides, load_preset
from gputech_bench.errors import StrategyError
from gputech_bench.estimator.trace import trace_cell, trace_inputs, trace_target
from gputech_bench.measure.tracker import StepMemoryTracker
from gputech_bench.report.frame import build_frame
from gputech_bench.report.table import table_notes
from gputech_bench.strategies import build_plan, device_refusal, launch_refusal, parse_cell
from gputech_bench.strategies.optimizer_in_backward import StepInBackward
from gputech_bench.training.loop import accumulate_gradients, optimizer_step
from gputech_bench.training.schedule import linear_schedule_with_warmup
from gputech_bench.worker.cell import new_result, run_cell

CELL = "optimizer-in-backward"
NO_CLIPPING = "train.max_grad_norm=0"
MIB = 2**20


def train_steps(cell: str, steps: int = 4, *overrides: str, warmup: int = 2, vocab: int = 300, hidden: int = 32):
    """``steps`` optimizer steps of ``cell`` under the seed's warm-up-then-decay schedule:
    the trained weights and the learning rate each step ran at."""
    ctx = context("train.batch_size=8", NO_CLIPPING, *overrides)
    plan = build_plan(parse_cell(cell), tiny_bert(vocab=vocab, hidden=hidden), ctx)
    scheduler = linear_schedule_with_warmup(plan.optimizer, warmup, steps + 2)
    rates = []
    for step in range(steps):
        rates.append(plan.optimizer.param_groups[0]["lr"])
        optimizer_step(plan, scheduler, random_batch(8, 16, vocab, seed=step), ctx)
    return {name: p.detach().clone() for name, p in plan.model.named_parameters()}, rates


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


# --------------------------------------------------------------------------- the same training


def test_updates_equal_the_plain_adamw_step_by_step_under_the_lr_schedule():
    plain, plain_rates = train_steps("baseline")
    in_backward, rates = train_steps(CELL)
    # The schedule drives the updates made inside backward: it warms up, then decays.
    assert rates == plain_rates and rates[0] == 0 and len(set(rates)) > 2
    assert largest_difference(plain, in_backward) < 1e-6
    # Negative controls: training moved the weights far more than that tolerance, and another
    # schedule (no warm-up) gives weights the comparison would tell apart.
    initial = {name: p.detach().clone() for name, p in tiny_bert(vocab=300).named_parameters()}
    assert largest_difference(initial, in_backward) > 1e-5
    unwarmed, _ = train_steps(CELL, 4, warmup=0)
    assert largest_difference(unwarmed, in_backward) > 1e-5


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_with_3_the_8bit_adam_is_the_optimizer_stepped_in_backward():
    ctx = context(NO_CLIPPING)
    plan = build_plan(parse_cell(f"3+{CELL}"), tiny_bert(), ctx)
    assert plan.facts["optimizer"] == "bitsandbytes.optim.Adam8bit"
    eight_bit, _ = train_steps("3", 3, vocab=2000, hidden=128)
    eight_bit_in_backward, _ = train_steps(f"3+{CELL}", 3, vocab=2000, hidden=128)
    assert largest_difference(eight_bit, eight_bit_in_backward) < 1e-6


def test_each_gradient_is_freed_inside_backward():
    batch = random_batch(8, 16, 300)
    gradients = {}
    for cell in ("baseline", CELL):
        ctx = context("train.batch_size=8")
        plan = build_plan(parse_cell(cell), tiny_bert(), ctx)
        before = {name: p.detach().clone() for name, p in plan.model.named_parameters()}
        accumulate_gradients(plan, batch, ctx.device)  # forward and backward only: no optimizer.step()
        gradients[cell] = sum(p.grad is not None for p in plan.model.parameters())
        moved = sum(not torch.equal(before[name], p) for name, p in plan.model.named_parameters())
        if cell == CELL:
            parameters = len(before)
            # Every parameter was updated, once, before backward returned, and holds no gradient.
            assert isinstance(plan.optimizer, StepInBackward) and plan.optimizer.steps_in_backward == parameters
            assert moved == parameters
        else:
            assert moved == 0  # negative control: the plain optimizer waits for step()
    assert gradients == {"baseline": len(list(tiny_bert().parameters())), CELL: 0}


def test_a_gradient_no_hook_stepped_stops_the_step_in_one_line():
    plan = build_plan(parse_cell(CELL), tiny_bert(), context())
    parameter = next(plan.model.parameters())
    parameter.grad = torch.ones_like(parameter)  # written without autograd, as FSDP would
    with pytest.raises(StrategyError, match="1 parameter\\(s\\) got a gradient that no backward hook stepped") as error:
        plan.optimizer.step()
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- memory


def tracked_step(cell: str):
    """The second step of ``cell`` under MemTracker, on a model whose weights outweigh its
    activations (so the step's peak falls where gradients are live), and the most gradient
    bytes alive at any moment of it."""
    ctx = context("train.batch_size=2", NO_CLIPPING)
    plan = build_plan(parse_cell(cell), tiny_bert(vocab=2000, hidden=128), ctx)
    scheduler = linear_schedule_with_warmup(plan.optimizer, 0, 10)
    batch = random_batch(2, 8, 2000)
    optimizer_step(plan, scheduler, batch, ctx)
    most = [0]

    def watch(device: str, snapshot: dict) -> None:
        live = sum(value for key, value in snapshot.items() if getattr(key, "value", key) == "Gradient")
        most[0] = max(most[0], live)

    tracker = StepMemoryTracker(plan.model, plan.optimizer, watch=watch)
    with tracker:
        optimizer_step(plan, scheduler, batch, ctx, tracker.before_forward)
    (peak,) = tracker.peaks()
    sizes = [p.numel() * p.element_size() for p in plan.model.parameters()]
    return peak, most[0], sum(sizes), max(sizes)


def test_the_gradients_bytes_leave_the_tracked_peak():
    baseline, baseline_most, weights, largest = tracked_step("baseline")
    in_backward, most, _, _ = tracked_step(CELL)
    # Negative control: the plain step holds every gradient at once, and its peak holds them.
    assert baseline_most == weights
    assert baseline.by_category["gradients"] > 0.5 * weights
    # In backward, at most one gradient lives at a time (the largest: the tied embeddings).
    assert most <= largest < 0.5 * weights
    assert in_backward.by_category["gradients"] == 0
    assert baseline.total_bytes - in_backward.total_bytes >= baseline.by_category["gradients"] - largest
    # Nothing else moved: the same weights and optimizer state.
    for category in ("parameters", "optimizer_state"):
        assert in_backward.by_category[category] == baseline.by_category[category]


def test_the_estimate_traces_it_and_matches_a_real_tracked_run(cache_dir: Path):
    # Weights heavier than the activations, so the gradients count at the traced peak.
    config = apply_overrides(load_preset("cpu"), TINY_RUN + [
        f"data.cache_dir={cache_dir}", "train.max_steps=2", "model.hidden_size=256", "model.intermediate_size=512",
        "train.batch_size=2", "strategy.micro_batch_size=1", "data.max_length=8",
    ])
    inputs = trace_inputs(config)
    baseline = trace_cell(parse_cell("baseline"), config, inputs, trace_target())
    traced = trace_cell(parse_cell(CELL), config, inputs, trace_target())
    assert traced.host is None  # nothing of the model waits on the host
    assert baseline.device.by_category["gradients"] > 0.5 * baseline.device.by_category["parameters"]
    assert traced.device.by_category["gradients"] < 0.25 * baseline.device.by_category["gradients"]
    assert traced.device.total_bytes < baseline.device.total_bytes - 0.5 * baseline.device.by_category["gradients"]
    real = run_cell(CELL, config, new_result(CELL, config))
    assert real.ok, real.reason
    assert traced.device.total_bytes == pytest.approx(real.value("tracked_peak_mib") * MIB, rel=0.05)


# --------------------------------------------------------------------------- clipping


def test_clipping_is_turned_off_and_said_so(monkeypatch: pytest.MonkeyPatch):
    calls = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(1) or real_clip(*a, **k))
    batch = random_batch(4, 16, 300)
    for cell, clipped in (("baseline", True), (CELL, False)):
        ctx = context("train.batch_size=4", "train.max_grad_norm=1.0")
        plan = build_plan(parse_cell(cell), tiny_bert(), ctx)
        calls.clear()
        optimizer_step(plan, linear_schedule_with_warmup(plan.optimizer, 0, 4), batch, ctx)
        # Negative control: the baseline clips; the cell in backward never calls the clip.
        assert bool(calls) is clipped and plan.facts["gradient_clipping"] is clipped
    assert plan.facts["turned_off"] == [
        "gradient clipping (train.max_grad_norm=1): a step inside backward cannot wait for the global norm, "
        "so every update is unclipped"
    ]
    # Nothing was turned off where the config asked for no clipping.
    assert "turned_off" not in build_plan(parse_cell(CELL), tiny_bert(), context(NO_CLIPPING)).facts
    assert "clipping" in parse_cell(CELL).strategies[0].gives_up


def test_the_table_notes_name_what_was_turned_off():
    turned_off = make_result(CELL, tracked_peak_mib=1.0)
    turned_off.strategy_facts = {"turned_off": ["gradient clipping (train.max_grad_norm=1): unclipped"]}
    frame, _ = build_frame([make_result("baseline", tracked_peak_mib=2.0), turned_off])
    assert f"turned off in {CELL}: gradient clipping (train.max_grad_norm=1): unclipped" in table_notes(frame)
    frame, _ = build_frame([make_result("baseline", tracked_peak_mib=2.0)])
    assert not any(note.startswith("turned off") for note in table_notes(frame))


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("other, reason", [
    ("2", "nothing to accumulate into"),
    ("4", "master copy on the host receives gradients only after backward"),
    ("fsdp-offload", "not through autograd's accumulation"),
    ("amp-fp16", "GradScaler must unscale every gradient"),
])
def test_the_pairs_it_cannot_run_with_are_refused_in_one_line(other, reason):
    cell = parse_cell(f"{other}+{CELL}")
    with pytest.raises(StrategyError) as error:
        launch_refusal(cell, context().config)
    message = str(error.value)
    assert f"'{CELL}' cannot run with '{other}'" in message and reason in message and "\n" not in message


def test_several_ranks_are_refused_in_one_line():
    ctx = dataclasses.replace(context("train.batch_size=8"), world_size=2)
    with pytest.raises(StrategyError, match="--nproc-per-node 1") as error:
        device_refusal(parse_cell(CELL), ctx)
    assert "\n" not in str(error.value)


def test_it_combines_with_checkpointing_lora_amp_and_sparse_head():
    for cell in (f"1+{CELL}", f"{CELL}+lora", f"{CELL}+amp", f"{CELL}+sparse-head"):
        ctx = context("train.batch_size=4", "data.objective=mlm")
        plan = build_plan(parse_cell(cell), tiny_bert(), ctx)
        trained = [p for p in plan.model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in trained]
        optimizer_step(plan, linear_schedule_with_warmup(plan.optimizer, 0, 4), random_batch(4, 16, 300), ctx)
        assert plan.optimizer.steps_in_backward == len(trained), cell
        assert all(p.grad is None for p in trained), cell
        assert any(not torch.equal(b, p) for b, p in zip(before, trained)), cell
