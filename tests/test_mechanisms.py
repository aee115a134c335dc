"""Each seed strategy does what its name says, proven with a number on a tiny CPU BERT."""

from __future__ import annotations

import pytest
import torch
from helpers import context, random_batch, saved_activation_bytes, tiny_bert
from transformers import get_linear_schedule_with_warmup

from gputech_bench.data.masking import IGNORE_INDEX
from gputech_bench.measure.tracker import StepMemoryTracker
from gputech_bench.strategies import build_plan, parse_cell
from gputech_bench.strategies.accumulation import split_into_micro_batches
from gputech_bench.strategies.checkpointing import is_checkpointing
from gputech_bench.training.loop import accumulate_gradients, optimizer_step

# --------------------------------------------------------------------------- 1: checkpointing


def test_checkpointing_lowers_saved_activation_bytes():
    batch = random_batch(8, 64, 300)
    ctx = context("model.num_layers=4")
    baseline = build_plan(parse_cell("baseline"), tiny_bert(layers=4), ctx)
    checkpointed = build_plan(parse_cell("1"), tiny_bert(layers=4), ctx)
    assert is_checkpointing(checkpointed.model) and not is_checkpointing(baseline.model)

    full = saved_activation_bytes(baseline.model, batch)
    kept = saved_activation_bytes(checkpointed.model, batch)
    # Four layers keep only their inputs; everything inside them is recomputed.
    assert kept < 0.5 * full, (kept, full)


def test_checkpointing_lowers_the_tracked_forward_backward_peak():
    batch = random_batch(16, 64, 300)
    peaks = {}
    for cell in ("baseline", "1"):
        plan = build_plan(parse_cell(cell), tiny_bert(layers=4), context())
        with StepMemoryTracker(plan.model) as tracker:
            plan.model(**batch).loss.backward()
        (peak,) = tracker.peaks()
        peaks[cell] = peak
    assert peaks["1"].total_bytes < 0.8 * peaks["baseline"].total_bytes
    assert peaks["1"].by_category["activations"] < peaks["baseline"].by_category["activations"]


# --------------------------------------------------------------------------- 2: accumulation


def gradients_of(cell: str, batch: dict[str, torch.Tensor], *overrides: str) -> dict[str, torch.Tensor]:
    ctx = context("train.batch_size=32", "strategy.micro_batch_size=8", *overrides)
    plan = build_plan(parse_cell(cell), tiny_bert(dropout=0.0), ctx)
    accumulate_gradients(plan, batch, ctx.device)
    return {name: p.grad.clone() for name, p in plan.model.named_parameters() if p.grad is not None}


def assert_same_gradients(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal within fp32 round-off. The absolute floor is relative to the largest gradient,
    because some gradients are zero in exact arithmetic (attention key bias) and hold only noise."""
    assert a.keys() == b.keys()
    scale = max(float(g.abs().max()) for g in a.values())
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_token_weighted_accumulation_8x4_matches_batch_32():
    batch = random_batch(32, 24, 300, seed=1)  # micro-batches hold different numbers of targets
    full = gradients_of("baseline", batch)
    accumulated = gradients_of("2", batch, "strategy.accumulation_loss=token-weighted")
    assert_same_gradients(full, accumulated)


def test_seed_rule_8x4_matches_batch_32_when_micro_batches_hold_equal_targets():
    batch = random_batch(32, 24, 300, seed=2, mask_every=6)  # every row: 4 targets
    full = gradients_of("baseline", batch)
    accumulated = gradients_of("2", batch)
    assert_same_gradients(full, accumulated)


def forward_rows(cell: str) -> list[int]:
    """The rows of every forward pass the model runs in one optimizer step on a batch of 32."""
    ctx = context("train.batch_size=32", "strategy.micro_batch_size=8")
    plan = build_plan(parse_cell(cell), tiny_bert(), ctx)
    rows: list[int] = []

    def record(module, args, kwargs) -> None:
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        rows.append(input_ids.shape[0])

    plan.model.register_forward_pre_hook(record, with_kwargs=True)
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 10)
    optimizer_step(plan, scheduler, random_batch(32, 16, 300), ctx)
    return rows


def test_accumulation_forward_only_ever_sees_micro_batches():
    # The same hook on the baseline sees the whole batch in one forward.
    assert forward_rows("baseline") == [32]
    # Strategy 2: four forwards of 8 rows each, never more, for one optimizer step.
    assert forward_rows("2") == [8, 8, 8, 8]


def test_accumulation_lowers_the_tracked_activation_peak():
    batch = random_batch(32, 32, 300)
    activations = {}
    for cell in ("baseline", "2"):
        ctx = context("train.batch_size=32", "strategy.micro_batch_size=8")
        plan = build_plan(parse_cell(cell), tiny_bert(), ctx)
        scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 10)
        with StepMemoryTracker(plan.model, plan.optimizer) as tracker:
            optimizer_step(plan, scheduler, batch, ctx, tracker.before_forward)
        (peak,) = tracker.peaks()
        activations[cell] = peak.by_category["activations"]
    # One micro-batch of 8 rows in flight instead of 32: about a quarter of the activations.
    assert activations["2"] < 0.5 * activations["baseline"], activations


def test_seed_rule_is_a_mean_of_micro_batch_means():
    batch = random_batch(32, 24, 300, seed=3)
    micro = split_into_micro_batches(batch, 8, 4, "seed")
    assert [m.inputs["input_ids"].shape[0] for m in micro] == [8, 8, 8, 8]
    assert [m.loss_weight for m in micro] == [0.25] * 4
    # A short last batch keeps the /4 rule, as the seed's loop did.
    short = split_into_micro_batches({k: v[:16] for k, v in batch.items()}, 8, 4, "seed")
    assert [m.loss_weight for m in short] == [0.25, 0.25]


# --------------------------------------------------------------------------- 3: 8-bit Adam


def optimizer_state_bytes(cell: str) -> int:
    ctx = context("train.batch_size=4")
    plan = build_plan(parse_cell(cell), tiny_bert(vocab=2000, hidden=128), ctx)
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 10)
    optimizer_step(plan, scheduler, random_batch(4, 16, 2000), ctx)
    return sum(
        value.numel() * value.element_size()
        for state in plan.optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def test_adam8bit_state_is_at_most_30_percent_of_adamw():
    adamw = optimizer_state_bytes("baseline")
    eight_bit = optimizer_state_bytes("3")
    assert eight_bit <= 0.30 * adamw, (eight_bit, adamw)


def test_adam8bit_is_the_bitsandbytes_optimizer_with_the_seeds_betas():
    plan = build_plan(parse_cell("3"), tiny_bert(), context())
    assert type(plan.optimizer).__name__ == "Adam8bit"
    assert plan.optimizer.param_groups[0]["betas"] == (0.9, 0.995)


# --------------------------------------------------------------------------- 4: fp32 master on the host


def test_mixed_precision_keeps_fp32_master_and_half_compute_copy():
    ctx = context("train.batch_size=4")
    plan = build_plan(parse_cell("4"), tiny_bert(), ctx)
    master = plan.placement.optimizer_parameters()
    compute = [p for p in plan.model.parameters() if p.requires_grad]
    assert {p.dtype for p in master} == {torch.float32}
    assert {p.device.type for p in master} == {"cpu"}
    assert {p.dtype for p in compute} == {torch.bfloat16}  # the CPU's half type
    assert not plan.placement.clips_gradients
    # The optimizer steps the master, not the compute copy.
    assert {id(p) for group in plan.optimizer.param_groups for p in group["params"]} == {id(p) for p in master}

    before = [p.detach().clone() for p in master]
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 10)
    optimizer_step(plan, scheduler, random_batch(4, 16, 300), ctx)
    moved = sum(int(not torch.equal(a, b)) for a, b in zip(before, master))
    assert moved >= 0.9 * len(master)
    # The compute copy now holds the updated master, rounded to half precision.
    for m, c in zip(master, compute):
        assert torch.equal(m.detach().to(torch.bfloat16), c.detach())
        assert c.grad is None and m.grad is None


def test_mixed_precision_keeps_the_master_on_the_host_when_compute_is_on_another_device():
    """On a CPU run the host is the compute device, so the test above cannot tell them apart;
    "meta", the memory estimate's stand-in for a GPU, can."""
    import dataclasses

    ctx = dataclasses.replace(context(), device=torch.device("meta"), tracing=True)
    plan = build_plan(parse_cell("4"), tiny_bert(), ctx)
    master = plan.placement.optimizer_parameters()
    assert master and {(p.device.type, p.dtype) for p in master} == {("cpu", torch.float32)}
    assert {(p.device.type, p.dtype) for p in plan.model.parameters()} == {("meta", torch.float16)}
    assert plan.facts["master_device"] == "cpu"


def test_mixed_precision_dtype_can_be_forced():
    plan = build_plan(parse_cell("4"), tiny_bert(), context("strategy.half_dtype=float16"))
    assert next(plan.model.parameters()).dtype == torch.float16


# --------------------------------------------------------------------------- LoRA


def test_lora_trains_only_the_adapters():
    ctx = context("train.batch_size=4")
    plan = build_plan(parse_cell("lora"), tiny_bert(), ctx)
    trainable = {name for name, p in plan.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    assert plan.facts["trainable_parameters"] < 0.1 * plan.facts["total_parameters"]

    frozen_before = {n: p.detach().clone() for n, p in plan.model.named_parameters() if not p.requires_grad}
    adapters_before = {n: p.detach().clone() for n, p in plan.model.named_parameters() if p.requires_grad}
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 10)
    optimizer_step(plan, scheduler, random_batch(4, 16, 300), ctx)
    params = dict(plan.model.named_parameters())
    assert all(torch.equal(params[n], before) for n, before in frozen_before.items())
    assert any(not torch.equal(params[n], before) for n, before in adapters_before.items())


# --------------------------------------------------------------------------- combinations


@pytest.mark.parametrize("cell", ["1+2+3", "1+2+4", "3+4", "1+lora", "2+4+lora"])
def test_combinations_compose_every_hook(cell):
    ctx = context("train.batch_size=8", "strategy.micro_batch_size=4")
    plan = build_plan(parse_cell(cell), tiny_bert(), ctx)
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 10)
    loss = optimizer_step(plan, scheduler, random_batch(8, 16, 300), ctx)
    assert torch.isfinite(loss)
    names = parse_cell(cell).long_name
    if "checkpointing" in names:
        assert is_checkpointing(plan.model)
    if "adam8bit" in names:
        assert type(plan.optimizer).__name__ == "Adam8bit"
    if "mixed-precision" in names:
        assert plan.facts["compute_dtype"] == "bfloat16"
    if "accumulation" in names:
        assert len(plan.split_batch(random_batch(8, 16, 300))) == 2


# --------------------------------------------------------------------------- sparse-head


def test_sparse_head_loss_and_masked_predictions_equal_the_full_heads():
    model = tiny_bert(vocab=500, dropout=0.0)
    batch = random_batch(4, 24, 500, seed=3)
    full = model(**batch)
    sparse = build_plan(parse_cell("sparse-head"), model, context("data.objective=mlm")).model.train()
    loss = sparse(**batch).loss
    torch.testing.assert_close(loss, full.loss, rtol=1e-6, atol=1e-6)
    rows = sparse.token_rows(batch["input_ids"], batch["attention_mask"], batch["labels"]).labelled()
    logits, targets = rows.head(rows.hidden), rows.targets
    masked = batch["labels"] != IGNORE_INDEX
    torch.testing.assert_close(logits, full.logits[masked], rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(-1), full.logits[masked].argmax(-1))
    assert torch.equal(targets, batch["labels"][masked])
    # Gradients are the full head's too.
    loss.backward()
    sparse_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    for sparse_grad, param in zip(sparse_grads, model.parameters()):
        torch.testing.assert_close(sparse_grad, param.grad, rtol=1e-4, atol=1e-6)


def test_sparse_head_lowers_the_tracked_peak_where_the_vocabulary_dominates():
    def tracked_peak(cell: str) -> int:
        ctx = context("train.batch_size=8", "data.objective=mlm")
        plan = build_plan(parse_cell(cell), tiny_bert(vocab=8000, hidden=32), ctx)
        scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 10)
        batch = random_batch(8, 32, 8000)
        optimizer_step(plan, scheduler, batch, ctx)
        tracker = StepMemoryTracker(plan.model, plan.optimizer)
        with tracker:
            optimizer_step(plan, scheduler, batch, ctx, tracker.before_forward)
        return tracker.peaks()[0].total_bytes

    full, sparse = tracked_peak("baseline"), tracked_peak("sparse-head")
    assert sparse < 0.8 * full, (sparse, full)


def test_sparse_head_combines_with_lora_and_checkpointing():
    ctx = context("train.batch_size=4", "data.objective=mlm")
    plan = build_plan(parse_cell("1+lora+sparse-head"), tiny_bert(vocab=300), ctx)
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 10)
    loss = optimizer_step(plan, scheduler, random_batch(4, 16, 300), ctx)
    assert torch.isfinite(loss)
    trainable = {name for name, p in plan.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
