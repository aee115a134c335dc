"""chunked-ce does what its name says, proven with numbers on a tiny CPU BERT (its decoder tied to
the word embeddings) and a tiny Llama: the same loss, gradients and predictions as the plain
head, under each objective; a tracked peak lower by at least the full logits less one chunk;
the same training in a short run; and its refusals, each in one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import context, random_batch, tiny_bert
from transformers import LlamaConfig, LlamaForCausalLM, get_linear_schedule_with_warmup

from gputech_bench.config import apply_overrides
from gputech_bench.data.masking import IGNORE_INDEX
from gputech_bench.data.prepare import EvalSet
from gputech_bench.errors import ConfigError, StrategyError
from gputech_bench.measure.tracker import StepMemoryTracker
from gputech_bench.strategies import build_plan, device_refusal, launch_refusal, parse_cell
from gputech_bench.strategies.base import TokenRows
from gputech_bench.strategies.chunked_ce import FUSED_KERNELS, mean_over_chunks
from gputech_bench.training.evaluate import evaluate
from gputech_bench.training.loop import accumulate_gradients, optimizer_step
from gputech_bench.worker.cell import new_result, run_cell

VOCAB = 500
#: Rows a chunk: not a divisor of the batches' rows, so that the last chunk is a short one.
CHUNK = 7


def llama(vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128))


def seed_batch(vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """The seed's objective: [MASK] at ~15% of the positions, a label at every position."""
    batch = random_batch(4, 24, vocab, seed=3)
    original = torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])
    return batch | {"labels": original}


def causal_batch(vocab: int = VOCAB, size: int = 4, length: int = 24) -> dict[str, torch.Tensor]:
    """Next-token labels; the second row ends in padding, which no loss scores."""
    ids = torch.randint(5, vocab, (size, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, length - 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


#: objective -> (the model, a batch of that objective).
OBJECTIVES = {
    "seed": (lambda: tiny_bert(vocab=VOCAB), seed_batch),
    "mlm": (lambda: tiny_bert(vocab=VOCAB), lambda: random_batch(4, 24, VOCAB, seed=3)),
    "clm": (llama, causal_batch),
}


def loss_and_gradients(cell: str, objective: str, *overrides: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    make_model, make_batch = OBJECTIVES[objective]
    ctx = context("train.batch_size=4", f"data.objective={objective}", f"strategy.ce_chunk_tokens={CHUNK}", *overrides)
    model = make_model()
    plan = build_plan(parse_cell(cell), model, ctx)
    plan.model.train()
    loss = accumulate_gradients(plan, make_batch(), ctx.device)
    # Named as in the model itself (the loss hooks' wrapper would prefix "model."); LoRA injects in place.
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- the same numbers


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_loss_and_every_gradient_equal_the_plain_heads(objective):
    loss, grads = loss_and_gradients("baseline", objective)
    chunked_loss, chunked = loss_and_gradients("chunked-ce", objective)
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=1e-6)
    assert chunked.keys() == grads.keys()
    scale = max(float(g.abs().max()) for g in grads.values())
    for name in grads:
        torch.testing.assert_close(chunked[name], grads[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_the_tied_decoder_gets_its_gradient_from_both_uses():
    model = tiny_bert(vocab=VOCAB)
    decoder, embeddings = model.cls.predictions.decoder.weight, model.bert.embeddings.word_embeddings.weight
    assert decoder is embeddings  # BERT ties them: one parameter, used at the input and in the head
    _, grads = loss_and_gradients("chunked-ce", "seed")
    _, plain = loss_and_gradients("baseline", "seed")
    tied = "bert.embeddings.word_embeddings.weight"
    assert "cls.predictions.decoder.weight" not in grads  # named once, as the one parameter it is
    # The head's share alone (the negative control): the gradient of the loss through the decoder
    # only, the embeddings' use cut off by detaching the hidden states.
    ctx = context("train.batch_size=4", f"strategy.ce_chunk_tokens={CHUNK}")
    plan = build_plan(parse_cell("chunked-ce"), tiny_bert(vocab=VOCAB), ctx)
    batch = seed_batch()
    rows = plan.model.token_rows(batch["input_ids"], batch["attention_mask"], batch["labels"])
    detached = TokenRows(rows.hidden.detach(), rows.targets, rows.head)
    (head_only,) = torch.autograd.grad(plan.model.train_loss(detached), [plan.model.model.cls.predictions.decoder.weight])
    torch.testing.assert_close(grads[tied], plain[tied], rtol=1e-4, atol=1e-7)
    # Both uses reach it: the full gradient is not the head's share alone.
    assert float((grads[tied] - head_only).abs().max()) > 1e-3 * float(head_only.abs().max())


def test_a_chunk_without_a_target_weighs_nothing_and_no_target_at_all_gives_nan_as_the_plain_mean():
    hidden = torch.randn(10, 4, requires_grad=True)
    head = torch.nn.Linear(4, 6)
    targets = torch.tensor([IGNORE_INDEX] * 5 + [1, 2, IGNORE_INDEX, 3, 4])
    rows = TokenRows(hidden, targets, head)
    plain = torch.nn.functional.cross_entropy(head(hidden), targets, ignore_index=IGNORE_INDEX)

    def inner(part: TokenRows) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(part.head(part.hidden), part.targets, ignore_index=IGNORE_INDEX)

    chunked = mean_over_chunks(inner, rows, 5)  # the first chunk has no target: its mean is NaN
    torch.testing.assert_close(chunked, plain)
    chunked.backward()
    assert torch.isfinite(hidden.grad).all() and torch.equal(hidden.grad[:5], torch.zeros(5, 4))
    nothing = TokenRows(hidden, torch.full((10,), IGNORE_INDEX), head)
    assert torch.isnan(mean_over_chunks(inner, nothing, 5))


def eval_set(objective: str) -> EvalSet:
    if objective == "clm":
        batch = causal_batch()
        return EvalSet(batch["input_ids"], batch["labels"], batch["input_ids"], batch["attention_mask"],
                       torch.zeros_like(batch["input_ids"], dtype=torch.bool), "clm")
    original = random_batch(6, 24, VOCAB, seed=7)
    ids = original["input_ids"].clone()
    masked = original["labels"] != IGNORE_INDEX
    ids[masked] = original["labels"][masked]
    labels = ids if objective == "seed" else original["labels"]
    return EvalSet(original["input_ids"], labels, ids, original["attention_mask"], masked, objective)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_evaluation_predicts_in_chunks_what_the_full_logits_predict(objective):
    make_model, _ = OBJECTIVES[objective]
    model, data = make_model(), eval_set(objective)
    ctx = context(f"data.objective={objective}", f"strategy.ce_chunk_tokens={CHUNK}")
    full = evaluate(build_plan(parse_cell("baseline"), model, ctx).predictor, data, ctx.device, 4)
    chunked_plan = build_plan(parse_cell("chunked-ce"), model, ctx)
    seen: list[int] = []
    head = chunked_plan.model.token_rows  # every head call of evaluation goes through TokenRows.head

    def recording_rows(*args, **kwargs) -> TokenRows:
        rows = head(*args, **kwargs)
        return TokenRows(rows.hidden, rows.targets, lambda hidden: seen.append(hidden.shape[0]) or rows.head(hidden))

    chunked_plan.model.token_rows = recording_rows
    chunked = evaluate(chunked_plan.predictor, data, ctx.device, 4)
    figures, chunked_figures = dataclasses.asdict(full), dataclasses.asdict(chunked)
    assert figures.keys() == chunked_figures.keys()
    for name, figure in figures.items():  # every score and count the same; the loss up to reassociation
        assert chunked_figures[name] == (figure if figure is None else pytest.approx(figure, rel=1e-6, nan_ok=True)), name
    assert seen and max(seen) <= CHUNK  # the head never saw more rows than a chunk, loss and predictions alike


# --------------------------------------------------------------------------- the memory it saves


BIG_VOCAB = 20_000


def tracked_peak(cell: str, objective: str, chunk: int) -> int:
    """The MemTracker peak of a second optimizer step (the first made the optimizer state)."""
    ctx = context("train.batch_size=8", f"data.objective={objective}", f"strategy.ce_chunk_tokens={chunk}")
    model = llama(BIG_VOCAB) if objective == "clm" else tiny_bert(vocab=BIG_VOCAB)
    batch = causal_batch(BIG_VOCAB, 8, 64) if objective == "clm" else random_batch(8, 64, BIG_VOCAB)
    plan = build_plan(parse_cell(cell), model, ctx)
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 10)
    optimizer_step(plan, scheduler, batch, ctx)
    tracker = StepMemoryTracker(plan.model, plan.optimizer)
    with tracker:
        optimizer_step(plan, scheduler, batch, ctx, tracker.before_forward)
    return tracker.peaks()[0].total_bytes


@pytest.mark.parametrize("objective", ["seed", "clm"])
def test_the_tracked_peak_drops_by_at_least_the_full_logits_less_one_chunk(objective):
    chunk = 128
    rows = 8 * (63 if objective == "clm" else 64)  # a causal LM's last position predicts nothing
    full_logits, one_chunk = rows * BIG_VOCAB * 4, chunk * BIG_VOCAB * 4
    plain, chunked = tracked_peak("baseline", objective, chunk), tracked_peak("chunked-ce", objective, chunk)
    assert plain - chunked >= full_logits - one_chunk, (plain, chunked, full_logits, one_chunk)
    # The saving is the chunking's: the peak grows with the chunk (the no-op would not).
    assert tracked_peak("chunked-ce", objective, 64) < chunked < tracked_peak("chunked-ce", objective, 256)


# --------------------------------------------------------------------------- the same training


def test_a_short_cpu_run_trains_as_the_baseline_does(tiny_config):
    config = apply_overrides(tiny_config, ["strategy.ce_chunk_tokens=100"])  # 16 x 32 positions: 6 chunks
    baseline = run_cell("baseline", config, new_result("baseline", config))
    chunked = run_cell("chunked-ce", config, new_result("chunked-ce", config))
    assert baseline.status == chunked.status == "ok", (baseline.reason, chunked.reason)
    # The same seed gives the same training, up to float reassociation of the chunks' sum.
    assert chunked.value("final_train_loss") == pytest.approx(baseline.value("final_train_loss"), rel=1e-4)
    assert chunked.value("eval_token_accuracy") == pytest.approx(baseline.value("eval_token_accuracy"), abs=1e-3)
    assert chunked.value("eval_masked_accuracy") == pytest.approx(baseline.value("eval_masked_accuracy"), abs=1e-3)
    assert chunked.strategy_facts["ce_kernel"].startswith("torch: ")  # the result names the kernel it used


# --------------------------------------------------------------------------- combinations


@pytest.mark.parametrize("others, objective", [("1", "seed"), ("2", "seed"), ("amp", "seed"), ("lora", "seed"),
                                               ("sparse-head", "mlm"), ("1", "clm")])
def test_it_combines_and_changes_nothing_of_the_others_numbers(others, objective):
    loss, grads = loss_and_gradients(others, objective, "strategy.micro_batch_size=2")
    chunked_loss, chunked = loss_and_gradients(f"{others}+chunked-ce", objective, "strategy.micro_batch_size=2")
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-5, atol=1e-6)
    assert chunked.keys() == grads.keys()
    # Under amp the head's backward runs in bf16 (8 bits of mantissa): summing the chunks' weight
    # gradients in another order moves a gradient by a few of its ulps.
    tolerance = 3e-2 if others == "amp" else 1e-4
    scale = max(float(g.abs().max()) for g in grads.values())
    for name in grads:
        torch.testing.assert_close(chunked[name], grads[name], rtol=tolerance,
                                   atol=tolerance * float(grads[name].abs().max()) + 1e-6 * scale, msg=name)


# --------------------------------------------------------------------------- kernels and refusals


def test_the_result_names_the_kernel_and_the_chunk():
    ctx = context("strategy.ce_chunk_tokens=64")
    plan = build_plan(parse_cell("chunked-ce"), tiny_bert(), ctx)
    assert plan.facts["ce_kernel"].startswith("torch: ")
    assert plan.facts["ce_chunk_tokens"] == 64


def test_an_unknown_kernel_and_a_chunk_of_zero_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="strategy.ce_kernel must be one of torch, liger, cce"):
        context("strategy.ce_kernel=triton")
    with pytest.raises(ConfigError, match="strategy.ce_chunk_tokens must be more than 0"):
        context("strategy.ce_chunk_tokens=0")


@pytest.mark.parametrize("kernel", list(FUSED_KERNELS))
def test_a_fused_kernel_is_refused_on_the_cpu_and_in_the_trace(kernel):
    cpu = context(f"strategy.ce_kernel={kernel}")
    with pytest.raises(StrategyError) as error:
        launch_refusal(parse_cell("chunked-ce"), cpu.config, cuda=False)
    assert "CUDA only" in str(error.value) and "strategy.ce_kernel=torch" in str(error.value)
    assert "\n" not in str(error.value)
    auto = dataclasses.replace(cpu, config=dataclasses.replace(cpu.config, device="auto"))
    with pytest.raises(StrategyError, match="CUDA only"):
        device_refusal(parse_cell("chunked-ce"), auto)
    traced = dataclasses.replace(auto, device=torch.device("meta"), tracing=True)
    with pytest.raises(StrategyError, match="ce_kernel=torch only"):
        device_refusal(parse_cell("chunked-ce"), traced)


def kernel_installed(kernel: str) -> bool:
    try:
        __import__(FUSED_KERNELS[kernel][0])
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("kernel", list(FUSED_KERNELS))
def test_a_fused_kernel_gives_the_torch_kernels_loss_and_gradients_on_cuda(kernel):
    if not torch.cuda.is_available():
        pytest.skip(reason="the fused kernels run on CUDA only, and this machine has none")
    if not kernel_installed(kernel):
        pytest.skip(reason=f"{FUSED_KERNELS[kernel][1]} is not installed (an optional extra)")
    results = {}
    for chosen in ("torch", kernel):
        ctx = dataclasses.replace(context(f"strategy.ce_kernel={chosen}", "data.objective=clm"),
                                  device=torch.device("cuda"))
        plan = build_plan(parse_cell("chunked-ce"), llama(), ctx)
        batch = {name: tensor.cuda() for name, tensor in causal_batch().items()}
        loss = accumulate_gradients(plan, batch, ctx.device)
        results[chosen] = (loss, [p.grad.float().cpu() for p in plan.model.parameters() if p.grad is not None])
    torch.testing.assert_close(results[kernel][0], results["torch"][0], rtol=1e-3, atol=1e-4)
    for a, b in zip(results[kernel][1], results["torch"][1]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)


def test_the_estimate_traces_it_and_shows_the_drop(tiny_config):
    from gputech_bench.estimator.trace import trace_cell, trace_inputs, trace_target

    # Without dropout: a CPU run's dropout is unfused, where the trace follows a GPU's kernel.
    config = apply_overrides(tiny_config, ["train.max_steps=2", "strategy.ce_chunk_tokens=64", "model.dropout=0.0"])
    inputs = trace_inputs(config)
    plain = trace_cell(parse_cell("baseline"), config, inputs, trace_target())
    chunked = trace_cell(parse_cell("chunked-ce"), config, inputs, trace_target())
    assert chunked.device.total_bytes < plain.device.total_bytes
    # The trace follows the real step: a CPU run's tracked peak, within 5%.
    measured = run_cell("chunked-ce", config, new_result("chunked-ce", config)).value("tracked_peak_mib") * 2**20
    assert chunked.device.total_bytes == pytest.approx(measured, rel=0.05)


def test_it_is_documented_outside_the_generated_listing():
    text = (Path(__file__).parents[1] / "docs" / "strategies.md").read_text()
    listing_end = text.index("<!-- end of listing -->")
    assert "## chunked-ce" in text[listing_end:] or "## chunked-ce" in text[:text.index("<!-- listing")]


def test_with_fsdp_offload_the_recomputed_head_finds_its_weights_and_trains_as_without():
    """FSDP2 gathers the root's weights for forward and again for backward: the chunks' recompute
    in backward must see them whole (one process: the gathered weights are the host's)."""
    import torch.distributed as dist

    from gputech_bench.strategies import distributed

    def losses(cell: str) -> list[float]:
        ctx = context("train.batch_size=8", "train.lr=1e-3", f"strategy.ce_chunk_tokens={CHUNK}")
        plan = build_plan(parse_cell(cell), tiny_bert(), ctx)
        scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 10)
        return [float(optimizer_step(plan, scheduler, random_batch(8, 16, 300, seed=step), ctx)) for step in range(3)]

    assert not dist.is_initialized()
    try:
        expected = losses("chunked-ce")
        assert losses("fsdp-offload+chunked-ce") == pytest.approx(expected, abs=1e-6)
    finally:
        distributed.shutdown()
