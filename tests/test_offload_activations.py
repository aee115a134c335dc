"""offload-activations: the tensors saved for backward move to the host and come back unchanged.

On a CPU run host and device are one memory, so the saving is proved where the two are
apart: the estimate's trace, whose compute side is a stand-in device and whose host is the
CPU, counted by the same MemTracker a CPU run uses. The baseline (and strategy 1 alone) is
the negative control: the same trace without the strategy.
"""

from __future__ import annotations

import pytest
import torch
from helpers import context, make_result, random_batch, tiny_bert
from transformers import LlamaConfig, LlamaForCausalLM

from gputech_bench.config import load_preset
from gputech_bench.errors import ConfigError
from gputech_bench.estimator.measured import measured_peak
from gputech_bench.estimator.trace import trace_cell, trace_inputs, trace_target
from gputech_bench.strategies import RunContext, build_plan, combination_refusal, parse_cell
from gputech_bench.strategies.offload_activations import ActivationOffloader, offloader_of
from gputech_bench.training.loop import accumulate_gradients

VOCAB = 300


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


def causal_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, VOCAB, (4, 24), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def step(cell: str, model: torch.nn.Module, batch: dict[str, torch.Tensor], *overrides: str):
    """(loss, every gradient, the offloader) of one forward and backward, as the training loop makes it."""
    ctx = context("train.batch_size=4", *overrides)
    plan = build_plan(parse_cell(cell), model, ctx)
    plan.model.train()
    loss = accumulate_gradients(plan, batch, ctx.device)
    return loss, [p.grad.clone() for p in plan.model.parameters() if p.grad is not None], offloader_of(plan)


# --------------------------------------------------------------------------- the same numbers


@pytest.mark.parametrize("build, batch", [
    (lambda: tiny_bert(vocab=VOCAB), lambda: random_batch(4, 32, VOCAB)),
    (tiny_llama, causal_batch),
], ids=["bert", "llama"])
@pytest.mark.parametrize("without, with_offload", [
    ("baseline", "offload-activations"),
    ("1", "1+offload-activations"),
])
def test_gradients_equal_the_plain_steps_exactly(build, batch, without, with_offload):
    loss, grads, none = step(without, build(), batch())
    moved_loss, moved_grads, offloader = step(with_offload, build(), batch())
    assert none is None
    # Copies, never roundings: bit for bit the same loss and gradients.
    assert torch.equal(loss, moved_loss)
    assert len(grads) == len(moved_grads) and all(torch.equal(a, b) for a, b in zip(grads, moved_grads))
    # Not a no-op: tensors were moved, and weights were recognised and left alone.
    assert offloader.counts.moved_tensors > 0 and offloader.counts.moved_bytes > 0
    assert offloader.counts.kept_resident > 0


@pytest.mark.parametrize("placement", ["4", "fsdp-offload", "lora"])
def test_combines_with_the_placements_and_changes_none_of_their_numbers(placement):
    def run(cell: str):
        ctx = context("train.batch_size=4")
        plan = build_plan(parse_cell(cell), tiny_bert(vocab=VOCAB), ctx)
        plan.model.train()
        loss = accumulate_gradients(plan, random_batch(4, 32, VOCAB), ctx.device)
        plan.placement.before_step()  # the gradients where the optimizer reads them (4: the host's master)
        grads = [getattr(p.grad, "full_tensor", lambda g=p.grad: g)() for p in plan.placement.optimizer_parameters()
                 if p.grad is not None]
        return loss, grads, offloader_of(plan)

    loss, grads, _ = run(placement)
    moved_loss, moved_grads, offloader = run(f"{placement}+offload-activations")
    assert offloader.counts.moved_tensors > 0
    assert torch.equal(loss, moved_loss)
    assert len(grads) == len(moved_grads) and all(torch.equal(a, b) for a, b in zip(grads, moved_grads))


def test_with_checkpointing_only_the_layer_inputs_move():
    alone = step("offload-activations", tiny_bert(vocab=VOCAB), random_batch(4, 32, VOCAB))[2].counts
    checkpointed = step("1+offload-activations", tiny_bert(vocab=VOCAB), random_batch(4, 32, VOCAB))[2].counts
    assert checkpointed.moved_tensors < alone.moved_tensors / 2
    assert checkpointed.moved_bytes < alone.moved_bytes / 2


def test_weights_and_small_tensors_stay_where_they_are(monkeypatch):
    model = tiny_bert(vocab=VOCAB)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    copied: list[torch.Tensor] = []
    copy_out = ActivationOffloader._copy_out

    def recording(self, tensor, storage):
        copied.append(tensor)
        return copy_out(self, tensor, storage)

    monkeypatch.setattr(ActivationOffloader, "_copy_out", recording)
    counts = step("offload-activations", model, random_batch(4, 32, VOCAB))[2].counts
    assert copied and not any(t.untyped_storage().data_ptr() in weights for t in copied)
    assert all(t.untyped_storage().nbytes() >= 1024 for t in copied) and counts.kept_small > 0
    # A threshold above every activation moves nothing: the same step, untouched.
    nothing = step("offload-activations", tiny_bert(vocab=VOCAB), random_batch(4, 32, VOCAB),
                   "strategy.offload_min_bytes=1000000000")[2].counts
    assert nothing.moved_tensors == 0 and nothing.kept_small > 0


def test_views_of_one_storage_share_one_host_copy():
    """A layer's input feeds query, key and value: one copy on the host, not three."""
    counts = step("offload-activations", tiny_bert(vocab=VOCAB), random_batch(4, 32, VOCAB),
                  "strategy.offload_min_bytes=1")[2].counts
    per_copy = counts.moved_tensors / max(1, counts.copies)
    assert counts.copies < counts.moved_tensors and per_copy > 1


# --------------------------------------------------------------------------- the estimate: device and host apart


@pytest.fixture(scope="module")
def traces():
    config = load_preset("cpu")
    inputs = trace_inputs(config)
    return {cell: trace_cell(parse_cell(cell), config, inputs, trace_target())
            for cell in ("baseline", "offload-activations", "1", "1+offload-activations")}


def activations(peak) -> int:
    return peak.by_category.get("activations", 0)


def test_the_trace_counts_the_saved_tensors_on_the_host(traces):
    kept, moved = traces["baseline"], traces["offload-activations"]
    assert kept.host is None  # negative control: the baseline's host holds none of the model
    assert moved.host is not None and moved.host.by_category["parameters"] == 0
    dropped = activations(kept.device) - activations(moved.device)
    # The device gives up what the host gains (within 1%), nearly all of its activations.
    assert dropped > 0.99 * activations(kept.device)
    assert abs(activations(moved.host) - dropped) < 0.01 * dropped
    assert moved.device.total_bytes < kept.device.total_bytes


def test_with_checkpointing_the_host_holds_the_layer_inputs_only(traces):
    checkpointed, moved = traces["1+offload-activations"], traces["offload-activations"]
    # What checkpointing alone keeps on the device (the layers' inputs, the head's tensors) is
    # what moves: the same bytes, and far fewer than without checkpointing.
    assert abs(activations(checkpointed.host) - activations(traces["1"].device)) < 0.01 * activations(traces["1"].device)
    assert activations(checkpointed.host) < 0.6 * activations(moved.host)


# --------------------------------------------------------------------------- declared and refused


def test_a_cpu_result_says_it_saves_nothing_and_is_not_compared_with_the_device_prediction():
    model = tiny_bert(vocab=VOCAB)
    plan = build_plan(parse_cell("offload-activations"), model, context())
    assert "none on this CPU run" in plan.facts["activation_offload_saving"]
    assert "1,024 bytes" in plan.facts["activation_offload"]
    measured = measured_peak(make_result("offload-activations", tracked_peak_mib=50.0))
    assert measured.bytes is None and "one memory" in measured.what


def test_compile_is_refused_in_one_line():
    reason = combination_refusal(parse_cell("offload-activations+compile"))
    assert reason is not None and "compile" in reason and "\n" not in reason


def test_a_negative_threshold_is_refused():
    with pytest.raises(ConfigError, match="strategy.offload_min_bytes"):
        context("strategy.offload_min_bytes=-1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and a side stream need a CUDA device")
def test_on_cuda_the_copies_are_pinned_and_the_gradients_unchanged():
    device = torch.device("cuda")
    batch = {name: tensor.to(device) for name, tensor in random_batch(4, 32, VOCAB).items()}

    def run(cell: str):
        ctx = RunContext(context("train.batch_size=4").config, device, new_head_modules=())
        plan = build_plan(parse_cell(cell), tiny_bert(vocab=VOCAB).to(device), ctx)
        plan.model.train()
        loss = accumulate_gradients(plan, batch, device)
        return loss, [p.grad for p in plan.model.parameters() if p.grad is not None], offloader_of(plan)

    loss, grads, _ = run("baseline")
    moved_loss, moved_grads, offloader = run("offload-activations")
    assert offloader.counts.moved_tensors > 0 and offloader.counts.pinned
    assert torch.equal(loss, moved_loss) and all(torch.equal(a, b) for a, b in zip(grads, moved_grads))


def test_refuses_nothing_it_runs_with():
    for cell in ("1+offload-activations", "2+offload-activations", "3+offload-activations", "4+offload-activations",
                 "lora+offload-activations", "amp+offload-activations"):
        assert combination_refusal(parse_cell(cell)) is None, cell

