"""adam4bit (torchao's AdamW4bit) and strategy 3's torchao backend do what their names say,
proven with bytes and losses on a tiny CPU BERT, against AdamW as the control.

torchao compiles each parameter shape's update at the first step (Inductor's C++ on CPU): the
first test to step pays some seconds, later ones hit Inductor's cache.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import TINY_RUN, context, random_batch, tiny_bert
from transformers import get_linear_schedule_with_warmup

from gputech_bench.config import apply_overrides, load_preset
from gputech_bench.errors import ConfigError, StrategyError
from gputech_bench.measure.tracker import StepMemoryTracker
from gputech_bench.strategies import build_plan, device_refusal, parse_cell
from gputech_bench.strategies.adam8bit import Adam8bit
from gputech_bench.strategies.paged_adam8bit import PagedAdam8bit
from gputech_bench.strategies.torchao_optim import (
    BLOCK_SIZE,
    MomentSplit,
    is_quantised,
    load_torchao_optim,
    moment_bytes,
    quantises,
    state_bytes,
    tensor_bytes,
)
from gputech_bench.training.loop import optimizer_step

pytest.importorskip("torchao.optim")

VOCAB = 300
#: Hidden 64: the attention and feed-forward weights (4,096 and 8,192 values) and the embeddings
#: are quantised; biases and layer norms (64, 128 values) are not.
HIDDEN = 64


def stepped(cell: str, steps: int = 1, *overrides: str):
    """The plan of ``cell`` on the tiny BERT after ``steps`` steps on one batch, and its losses."""
    ctx = context("train.batch_size=8", "train.lr=1e-3", *overrides)
    plan = build_plan(parse_cell(cell), tiny_bert(vocab=VOCAB, hidden=HIDDEN), ctx)
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 100)
    batch = random_batch(8, 32, VOCAB)  # the same batch each step, so that the loss must fall
    losses = [float(optimizer_step(plan, scheduler, batch, ctx)) for _ in range(steps)]
    return plan, losses


def moments(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, list[torch.Tensor]]:
    return {p: [state["exp_avg"], state["exp_avg_sq"]] for p, state in optimizer.state.items()}


def split_bytes(plan, bits: int) -> tuple[int, int, int, int]:
    """(quantised moments' bytes, AdamW's bytes for the same tensors, full-width moments' bytes,
    how many full-width moments) of a stepped plan's optimizer."""
    quantised = adamw_same = full = full_count = 0
    for param, pair in moments(plan.optimizer).items():
        for moment in pair:
            if quantises(param.numel(), bits):
                assert is_quantised(moment), (tuple(param.shape), type(moment).__name__)
                quantised += tensor_bytes(moment)
                adamw_same += param.numel() * 4
            else:
                assert type(moment) is torch.Tensor and moment.dtype == torch.float32
                full += tensor_bytes(moment)
                full_count += 1
    return quantised, adamw_same, full, full_count


def test_adam4bit_state_is_an_eighth_of_adamw_for_the_large_tensors_and_the_small_ones_stay_fp32():
    plan, _ = stepped("adam4bit")
    control, _ = stepped("baseline")
    assert type(plan.optimizer).__name__ == "AdamW4bit" and plan.facts["optimizer_backend"] == "torchao"
    quantised, adamw_same, full, full_count = split_bytes(plan, 4)
    # 4 bits a value, one fp32 scale per 128 values and a 16-value code book: 0.53 of AdamW's 4 bytes.
    assert 0.125 < quantised / adamw_same < 0.14, quantised / adamw_same
    # The control's own state, counted the same way: AdamW's moments are fp32 tensors of the weights' size.
    control_bytes = sum(tensor_bytes(m) for pair in moments(control.optimizer).values() for m in pair)
    assert quantised + full < 0.2 * control_bytes, (quantised + full, control_bytes)
    # The tensors under torchao's threshold keep fp32 moments, as AdamW does: counted and said.
    split = MomentSplit.of(plan.model.parameters(), 4)
    assert full_count == 2 * split.full_tensors > 0
    assert full == 2 * 4 * split.full_values
    assert plan.facts["full_width_state_tensors"] == split.full_tensors
    assert plan.facts["4bit_state_tensors"] == split.quantised_tensors > 0
    print(f"adam4bit: {split.quantised_tensors} tensors' moments at {quantised / adamw_same:.3f} of AdamW's bytes; "
          f"{split.full_tensors} tensors ({split.full_values} values) keep fp32 moments ({full} bytes)")


def test_the_estimates_moment_bytes_are_torchaos_own():
    for bits, cell, overrides in ((4, "adam4bit", ()), (8, "3", ("strategy.adam8bit_backend=torchao",))):
        plan, _ = stepped(cell, 1, *overrides)
        for param, pair in moments(plan.optimizer).items():
            for moment in pair:
                assert tensor_bytes(moment) == moment_bytes(param.numel(), param.element_size(), bits), tuple(param.shape)
        assert state_bytes(plan.optimizer)[0] > 0


def test_torchao_8bit_backend_keeps_a_quarter_of_adamws_state():
    plan, _ = stepped("3", 1, "strategy.adam8bit_backend=torchao")
    assert type(plan.optimizer).__name__ == "AdamW8bit"
    assert plan.facts["optimizer_backend"] == "torchao"
    quantised, adamw_same, _, _ = split_bytes(plan, 8)
    # One byte a value and one fp32 scale per 256 values: 1.016 of AdamW's 4 bytes. Each moment
    # also carries a 256-value fp32 code book (1 KiB), a tenth more on this tiny model's tensors.
    books = 4 * 256 * sum(is_quantised(m) for pair in moments(plan.optimizer).values() for m in pair)
    assert (quantised - books) / adamw_same == pytest.approx(1.0156 / 4, rel=0.001)
    assert quantised / adamw_same < 0.3
    bnb, _ = stepped("3")
    assert bnb.facts["optimizer_backend"] == "bitsandbytes" and type(bnb.optimizer).__module__.startswith("bitsandbytes")


@pytest.mark.parametrize("cell, overrides", [("adam4bit", ()), ("3", ("strategy.adam8bit_backend=torchao",))],
                         ids=["adam4bit", "3-torchao"])
def test_low_bit_adamw_moves_every_weight_and_lowers_the_loss_close_to_adamw(cell, overrides):
    """Over a few steps only: over a whole epoch from random weights 4-bit moments learn slower
    (docs/strategies.md has the cpu preset's run)."""
    plan, losses = stepped(cell, 1, *overrides)
    before = [p.detach().clone() for p in plan.model.parameters()]
    ctx = context("train.batch_size=8", "train.lr=1e-3", *overrides)
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 100)
    batch = random_batch(8, 32, VOCAB)
    losses += [float(optimizer_step(plan, scheduler, batch, ctx)) for _ in range(4)]
    changed = sum(not torch.equal(a, b) for a, b in zip(before, plan.model.parameters()))
    assert changed == len(before), "every weight moves: the step is no no-op"
    _, control = stepped("baseline", 5)
    assert losses[-1] < losses[0] and control[-1] < control[0]
    # The quantised moments follow AdamW's closely over these few steps on one batch.
    for ours, adamw in zip(losses, control):
        assert abs(ours - adamw) / adamw < 0.05, (losses, control)


def test_the_memory_tracked_step_runs_and_counts_the_quantised_state():
    """MemTracker's dispatch mode refuses torch.compile(fullgraph=True): under it the update runs eagerly."""
    plan, _ = stepped("adam4bit")
    ctx = context("train.batch_size=8", "train.lr=1e-3")
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 100)
    tracker = StepMemoryTracker(plan.model, plan.optimizer)
    with tracker:
        optimizer_step(plan, scheduler, random_batch(8, 32, VOCAB), ctx, tracker.before_forward)
    tracked = {peak.device: peak for peak in tracker.peaks()}["cpu"].by_category["optimizer_state"]
    quantised, full = state_bytes(plan.optimizer)
    # The moments, the step counters (one fp32 scalar a tensor) and nothing of AdamW's size.
    assert quantised + full <= tracked < quantised + full + 4 * 1024, (tracked, quantised, full)
    assert "eagerly" in plan.facts["memory_tracked_step"]


# --------------------------------------------------------------------------- refusals and facts


def test_an_unknown_8bit_backend_is_refused_in_one_line():
    with pytest.raises(ConfigError) as error:
        apply_overrides(load_preset("cpu"), ["strategy.adam8bit_backend=apex"])
    assert str(error.value) == "strategy.adam8bit_backend must be one of bitsandbytes, torchao; got 'apex'"


def test_a_missing_torchao_is_refused_in_one_line_with_the_fix(monkeypatch):
    import importlib

    real = importlib.import_module

    def no_torchao(name, *args):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_torchao)
    with pytest.raises(StrategyError) as error:
        device_refusal(parse_cell("adam4bit"), context())
    message = str(error.value)
    assert "\n" not in message and "pip install 'torchao>=0.18,<0.19'" in message and "leave adam4bit out" in message
    with pytest.raises(StrategyError, match="--set strategy.adam8bit_backend=bitsandbytes"):
        load_torchao_optim("--set strategy.adam8bit_backend=bitsandbytes")


def test_a_probe_step_that_fails_is_refused_in_one_line(monkeypatch):
    optim = load_torchao_optim("leave adam4bit out")

    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")

    monkeypatch.setattr(optim, "AdamW4bit", broken)
    with pytest.raises(StrategyError) as error:
        device_refusal(parse_cell("adam4bit"), context())
    message = str(error.value)
    assert "\n" not in message and "C++ compiler" in message and "leave adam4bit out" in message


def test_the_warm_up_loads_the_chosen_backends_library_only():
    config = apply_overrides(load_preset("cpu"), ["strategy.adam8bit_backend=torchao"])
    assert Adam8bit.libraries_for(config) == ("torchao",)
    assert Adam8bit.libraries_for(load_preset("cpu")) == ("bitsandbytes",)
    # paged-adam8bit pages bitsandbytes' state, whatever strategy 3's backend is.
    assert PagedAdam8bit.libraries_for(config) == ("bitsandbytes",)
    assert parse_cell("adam4bit").strategies[0].libraries_for(config) == ("torchao",)


def test_adam4bit_owns_the_optimizer_so_it_does_not_combine_with_8bit_adam():
    from gputech_bench.strategies import combination_refusal

    assert "both own the build_optimizer hook" in (combination_refusal(parse_cell("3+adam4bit")) or "")
    assert combination_refusal(parse_cell("1+2+4+adam4bit")) is None
    assert combination_refusal(parse_cell("1+lora+adam4bit")) is None


# --------------------------------------------------------------------------- the estimate


@pytest.fixture(scope="module")
def tiny(cache_dir):
    from gputech_bench.estimator.trace import trace_inputs

    config = apply_overrides(load_preset("cpu"), TINY_RUN + [f"data.cache_dir={cache_dir}", "train.max_steps=3",
                                                             "model.hidden_size=128", "model.intermediate_size=512"])
    return config, trace_inputs(config)


def test_adam4bit_is_modelled_and_matches_a_real_tracked_cpu_run(tiny):
    from gputech_bench.estimator.fit import candidates, modelled_strategies
    from gputech_bench.estimator.modelled import modeller_for
    from gputech_bench.estimator.trace import trace_cell, trace_inputs, trace_target
    from gputech_bench.worker.cell import new_result, run_cell

    # Without dropout: a CPU run's dropout is unfused, where the trace follows a GPU's kernel.
    config = apply_overrides(tiny[0], ["model.dropout=0.0"])
    inputs = trace_inputs(config)
    assert "adam4bit" in modelled_strategies("meta")
    assert any(setup.cell == "adam4bit" for setup in candidates(config))
    modeller = modeller_for(parse_cell("adam4bit"), trace_target().device.type)
    assert modeller is not None
    modelled = modeller.run(parse_cell("adam4bit"), config, inputs, trace_target(), None)
    control = trace_cell(parse_cell("baseline"), config, inputs, trace_target())
    assert "modelled, not traced" in modelled.method and "4-bit" in modelled.method
    real = run_cell("adam4bit", config, new_result("adam4bit", config))
    measured = real.memory_breakdown["cpu"]["optimizer_state_mib"] * 2**20
    predicted = modelled.device.by_category["optimizer_state"]
    assert predicted == pytest.approx(measured, rel=0.01)
    assert modelled.device.total_bytes == pytest.approx(real.value("tracked_peak_mib") * 2**20, rel=0.05)
    # Against AdamW's traced state: the saving is the moments' 7/8 for the large tensors.
    adamw = control.device.by_category["optimizer_state"]
    assert predicted < 0.2 * adamw, (predicted, adamw)
    assert control.device.total_bytes - modelled.device.total_bytes == adamw - predicted
    print(f"optimizer state: AdamW traced {adamw / 2**20:.3f} MiB, adam4bit modelled {predicted / 2**20:.3f} MiB, "
          f"measured {measured / 2**20:.3f} MiB")


def test_strategy_3_on_torchao_is_traced_as_bitsandbytes_and_says_so(tiny):
    from gputech_bench.estimator.trace import trace_cell, trace_target

    config, inputs = tiny
    torchao = apply_overrides(config, ["strategy.adam8bit_backend=torchao"])
    traced = trace_cell(parse_cell("3"), torchao, inputs, trace_target())
    assert "bitsandbytes.optim.Adam8bit" in traced.facts["traced_as"]
    plain = trace_cell(parse_cell("3"), config, inputs, trace_target())
    assert traced.device.by_category == plain.device.by_category


def test_the_trace_refusal_of_adam4bit_is_one_line():
    ctx = dataclasses.replace(context(), device=torch.device("meta"), tracing=True)
    with pytest.raises(StrategyError) as error:
        device_refusal(parse_cell("adam4bit"), ctx)
    assert str(error.value).startswith("adam4bit cannot be traced (") and "\n" not in str(error.value)


def test_block_sizes_are_torchaos_defaults():
    import inspect

    optim = load_torchao_optim("leave adam4bit out")
    for bits, name in ((4, "AdamW4bit"), (8, "AdamW8bit")):
        assert inspect.signature(getattr(optim, name)).parameters["block_size"].default == BLOCK_SIZE[bits]


def test_adam4bit_steps_fsdp_offloads_host_dtensors_like_it_steps_plain_tensors():
    """torchao wraps its 4-bit state in DTensors beside FSDP2's offloaded shards (one process, gloo)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from gputech_bench.strategies import distributed

    assert not dist.is_initialized()
    try:
        sharded, sharded_losses = stepped("fsdp-offload+adam4bit", 3)
        states = [state["exp_avg"] for state in sharded.optimizer.state.values()]
        assert all(isinstance(state, DTensor) for state in states)
        assert any(is_quantised(state.to_local()) for state in states)
    finally:
        distributed.shutdown()
    _, losses = stepped("adam4bit", 3)
    assert sharded_losses == pytest.approx(losses, rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao's compiled update on CUDA (Triton) needs a GPU")
def test_adam4bit_steps_on_cuda_and_the_warm_up_loads_torchao():
    from gputech_bench.measure.warmup import warm_up_cuda_libraries

    device = torch.device("cuda")
    assert "torchao low-bit optimizer (compiled)" in warm_up_cuda_libraries(device, {"torchao"})
    ctx = dataclasses.replace(context("train.batch_size=8", "train.lr=1e-3"), device=device)
    plan = build_plan(parse_cell("adam4bit"), tiny_bert(vocab=VOCAB, hidden=HIDDEN), ctx)
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 100)
    batch = {name: tensor.to(device) for name, tensor in random_batch(8, 32, VOCAB).items()}
    losses = [float(optimizer_step(plan, scheduler, batch, ctx)) for _ in range(3)]
    assert losses[-1] < losses[0]
    quantised = [m for pair in moments(plan.optimizer).values() for m in pair if is_quantised(m)]
    assert quantised and all(m.device.type == "cuda" for m in quantised)


def test_the_warm_up_steps_torchao_only_for_a_cell_that_uses_it():
    from gputech_bench.measure.warmup import warm_up_cuda_libraries

    cpu = torch.device("cpu")
    assert warm_up_cuda_libraries(cpu, {"torchao"})[-1] == "torchao low-bit optimizer (compiled)"
    assert not any("torchao" in step for step in warm_up_cuda_libraries(cpu, {"bitsandbytes"}))
