"""The strategies beyond the seed (amp, sparse-head in evaluation, paged 8-bit Adam, compile)
do what their names say, proven with numbers on a tiny CPU BERT."""

from __future__ import annotations

import pytest
import torch
from helpers import context, random_batch, saved_activation_bytes, tiny_bert
from transformers import get_linear_schedule_with_warmup

from gputech_bench.data.masking import IGNORE_INDEX
from gputech_bench.data.prepare import EvalSet
from gputech_bench.errors import StrategyError
from gputech_bench.measure.tracker import StepMemoryTracker
from gputech_bench.results import CellResult
from gputech_bench.run.matrix import expand
from gputech_bench.strategies import build_plan, device_refusal, parse_cell
from gputech_bench.strategies.amp import AutocastPrecision
from gputech_bench.strategies.defaults import logits_predictor
from gputech_bench.training.evaluate import evaluate
from gputech_bench.training.loop import TrainOutcome, optimizer_step
from gputech_bench.worker.cell import record_compile_time


def losses_of(cell: str, steps: int = 3, *overrides: str) -> list[float]:
    ctx = context("train.batch_size=8", "train.lr=1e-3", *overrides)
    plan = build_plan(parse_cell(cell), tiny_bert(vocab=300), ctx)
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 100)
    batch = random_batch(8, 32, 300)  # the same batch each step, so that the loss must fall
    return [float(optimizer_step(plan, scheduler, batch, ctx)) for _ in range(steps)]


# --------------------------------------------------------------------------- amp


def test_amp_runs_in_bf16_on_cpu_and_its_loss_stays_close_to_fp32():
    plan = build_plan(parse_cell("amp"), tiny_bert(), context())
    assert isinstance(plan.precision, AutocastPrecision)
    assert plan.precision.dtype == torch.bfloat16 and plan.precision.scaler is None
    assert plan.facts["autocast_dtype"] == "bfloat16"
    # The weights (and so gradients and optimizer state) stay fp32: only compute is half.
    assert all(p.dtype == torch.float32 for p in plan.model.parameters())

    full, amp = losses_of("baseline"), losses_of("amp")
    assert full[-1] < full[0] and amp[-1] < amp[0]  # both train
    for a, b in zip(amp, full):
        assert abs(a - b) / b < 0.02, (amp, full)


@pytest.mark.parametrize("cell", ["amp", "amp-fp16"])
def test_amp_halves_the_activations_saved_for_backward(cell):
    def saved_bytes(cell: str) -> int:
        plan = build_plan(parse_cell(cell), tiny_bert(vocab=300, hidden=64), context())
        return saved_activation_bytes(plan.model, random_batch(8, 64, 300), plan.precision.autocast)

    full, amp = saved_bytes("baseline"), saved_bytes(cell)
    # Matmul inputs and outputs are saved in bf16 (fp16); softmax, layer norm and the loss stay fp32.
    assert amp < 0.8 * full, (amp, full)


def test_amp_fp16_scales_the_loss_and_skips_a_step_whose_gradients_overflow():
    ctx = context("train.batch_size=4", "train.max_grad_norm=0")
    plan = build_plan(parse_cell("amp-fp16"), tiny_bert(), ctx)
    assert plan.precision.dtype == torch.float16 and plan.precision.scaler is not None
    assert plan.facts["loss_scaling"].startswith("torch.amp.GradScaler")
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 10)
    loss = optimizer_step(plan, scheduler, random_batch(4, 16, 300), ctx)
    assert torch.isfinite(loss)
    scale = plan.precision.scaler.get_scale()
    assert scale > 1

    with torch.no_grad():  # an infinite weight makes the loss and the gradients overflow
        plan.model.bert.embeddings.word_embeddings.weight[0] = float("inf")
    before = [p.detach().clone() for p in plan.model.parameters()]
    optimizer_step(plan, scheduler, random_batch(4, 16, 300, seed=1) | {"input_ids": torch.zeros(4, 16, dtype=torch.long)}, ctx)
    # The scaler skipped the update and halved its scale, as in fp16 training on a GPU.
    assert all(torch.equal(a, b) for a, b in zip(plan.model.parameters(), before))
    assert plan.precision.scaler.get_scale() == scale / 2


def test_amp_combines_with_checkpointing_and_sparse_head():
    losses = losses_of("1+amp+sparse-head", 2, "data.objective=mlm")
    reference = losses_of("amp", 2)
    for a, b in zip(losses, reference):
        assert abs(a - b) / b < 0.02, (losses, reference)


def test_amp_and_the_seeds_master_copy_are_refused_together():
    for amp in ("amp", "amp-fp16"):
        with pytest.raises(StrategyError, match=f"'4' cannot run with '{amp}'"):
            device_refusal(parse_cell(f"4+{amp}"), context())


# --------------------------------------------------------------------------- sparse-head in evaluation


def eval_set(vocab: int, size: int = 6, length: int = 24) -> EvalSet:
    original = random_batch(size, length, vocab, seed=7)
    ids = original["input_ids"].clone()
    masked = original["labels"] != IGNORE_INDEX
    ids[masked] = original["labels"][masked]  # the unmasked sentence
    return EvalSet(original["input_ids"], original["labels"], ids, original["attention_mask"], masked)


def test_sparse_head_evaluation_scores_like_the_full_head():
    model = tiny_bert(vocab=500)
    data = eval_set(500)
    full = evaluate(logits_predictor(model, causal=False), data, torch.device("cpu"), batch_size=4)
    sparse_predictor = build_plan(parse_cell("sparse-head"), model, context("data.objective=mlm")).predictor
    sparse = evaluate(sparse_predictor, data, torch.device("cpu"), batch_size=4)
    assert sparse.masked_accuracy == full.masked_accuracy
    assert sparse.token_accuracy == full.token_accuracy
    assert sparse.loss == pytest.approx(full.loss, rel=1e-5)
    assert (sparse.masked_tokens, sparse.scored_tokens) == (full.masked_tokens, full.scored_tokens)


def test_sparse_head_evaluation_never_holds_the_full_logits(monkeypatch):
    import gputech_bench.strategies.sparse_head as sparse_head

    monkeypatch.setattr(sparse_head, "EVAL_CHUNK_POSITIONS", 32)
    model = tiny_bert(vocab=8000)
    data = eval_set(8000, size=8, length=32)

    def eval_peak(cell: str) -> int:
        predictor = build_plan(parse_cell(cell), model, context("data.objective=mlm")).predictor
        with StepMemoryTracker(predictor.model) as tracker:
            evaluate(predictor, data, torch.device("cpu"), batch_size=8)
        return tracker.peaks()[0].total_bytes

    full_logits = 8 * 32 * 8000 * 4
    full, sparse = eval_peak("baseline"), eval_peak("sparse-head")
    assert full - sparse > 0.8 * full_logits, (full, sparse, full_logits)


# --------------------------------------------------------------------------- paged 8-bit Adam


def test_paged_adam8bit_is_refused_before_running_without_cuda():
    from gputech_bench.config import BenchConfig

    with pytest.raises(StrategyError, match="needs a CUDA device"):
        expand("paged-adam8bit", False, BenchConfig(), cuda=False)
    with pytest.raises(StrategyError, match="paged-adam8bit needs CUDA"):
        device_refusal(parse_cell("paged-adam8bit"), context())
    assert expand("paged-adam8bit", False, BenchConfig(), cuda=True) == ["baseline", "paged-adam8bit"]


def test_paged_adam8bit_builds_bitsandbytes_paged_8bit_adamw():
    """What a CPU can check of the paging: the optimizer the strategy builds is bitsandbytes'
    paged one (its state goes to unified memory on CUDA; the CUDA test below sees it there)."""
    from gputech_bench.strategies.adam8bit import Adam8bit
    from gputech_bench.strategies.paged_adam8bit import PagedAdam8bit

    ctx = context()
    paged = PagedAdam8bit().build_optimizer([torch.nn.Parameter(torch.zeros(8))], ctx)
    assert type(paged).__module__.startswith("bitsandbytes.") and type(paged).__name__ == "PagedAdamW8bit"
    assert paged.is_paged and paged.args.optim_bits == 8
    assert paged.param_groups[0]["betas"] == (0.9, 0.995)
    # Strategy 3 builds the same 8-bit state, unpaged.
    plain = Adam8bit().build_optimizer([torch.nn.Parameter(torch.zeros(8))], ctx)
    assert not plain.is_paged and plain.args.optim_bits == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="paged optimizers need CUDA unified memory; no CUDA device here")
def test_paged_adam8bit_steps_with_paged_state_on_cuda():
    from gputech_bench.config import BenchConfig, apply_overrides
    from gputech_bench.strategies import RunContext

    ctx = RunContext(apply_overrides(BenchConfig(), ["device=cuda"]), torch.device("cuda"), new_head_modules=())
    plan = build_plan(parse_cell("paged-adam8bit"), tiny_bert(vocab=8000), ctx)
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 10)
    optimizer_step(plan, scheduler, random_batch(4, 16, 8000), ctx)
    assert type(plan.optimizer).__name__ == "PagedAdamW8bit"
    states = [s for s in plan.optimizer.state.values() if "state1" in s]
    assert states and all(s["state1"].dtype == torch.uint8 for s in states)
    assert any(getattr(s["state1"], "is_paged", False) for s in states)


# --------------------------------------------------------------------------- compile


def compile_error() -> str | None:
    """What stops torch.compile here (no C++ compiler, unsupported platform), or None."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4))
    except Exception as error:  # the reasons vary by platform; each is a skip, not a failure
        return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return None


def test_compile_trains_like_eager():
    error = compile_error()
    if error:
        pytest.skip(reason=f"torch.compile cannot compile on this platform ({error})")
    compiled, eager = losses_of("compile", 3), losses_of("baseline", 3)
    for a, b in zip(compiled, eager):
        assert a == pytest.approx(b, rel=1e-3)


def test_compile_sends_the_training_step_through_dynamo_to_inductor():
    from torch._dynamo.utils import counters

    error = compile_error()
    if error:
        pytest.skip(reason=f"torch.compile cannot compile on this platform ({error})")

    def compiled(cell: str) -> tuple[int, int]:
        """(graphs Dynamo captured, Inductor's events) in one optimizer step of ``cell``."""
        # A model compiled earlier in this process would hit Dynamo's cache, which counts nothing.
        torch._dynamo.reset()
        counters.clear()
        losses_of(cell, 1)
        return counters["stats"]["unique_graphs"], sum(counters["inductor"].values())

    # The counters stay at zero for an eager step.
    assert compiled("baseline") == (0, 0)
    graphs, inductor_events = compiled("compile")
    assert graphs >= 1
    # Inductor compiled those graphs (or loaded its compiled code from its cache): not an eager backend.
    assert inductor_events > 0, dict(counters["inductor"])


def test_compile_time_is_the_first_steps_excess_over_a_steady_step():
    outcome = TrainOutcome(5, 5, 5, 40, step_seconds=[0.1, 0.1, 0.1], first_step_seconds=12.6)
    result = CellResult("compile")
    record_compile_time(result, outcome)
    assert result.value("compile_seconds") == pytest.approx(12.5)


# --------------------------------------------------------------------------- the estimate


# amp (on the stand-in, under CUDA autocast's lists) and sparse-head (its labelled rows counted
# on the real batches) are traced now: tests/test_fit_search.py.
@pytest.mark.parametrize("cell, reason", [
    ("compile", "Inductor's fused kernels"),
    ("fsdp-offload", "FSDP's CPU offload"),
    ("paged-adam8bit", "unified memory"),
    ("qlora", "Params4bit, a Tensor subclass"),
], ids=["compile", "fsdp-offload", "paged-adam8bit", "qlora"])
def test_strategies_the_estimate_cannot_follow_say_why_in_one_line(cell, reason):
    import dataclasses

    ctx = dataclasses.replace(context("data.objective=mlm"), device=torch.device("meta"), tracing=True)
    with pytest.raises(StrategyError) as error:
        device_refusal(parse_cell(f"1+{cell}"), ctx)
    message = str(error.value)
    assert message.startswith(f"{cell} cannot be traced (") and reason in message and "\n" not in message


def test_fit_searches_only_what_the_trace_can_follow():
    from gputech_bench.estimator.fit import candidates, modelled_strategies, unsearchable

    # fsdp-offload, qlora, paged-adam8bit and adam4bit cannot be traced, but are modelled around a
    # trace of the rest of their cell (estimator/modelled.py), their figures labelled so: fit weighs them.
    assert set(unsearchable("meta")) == {"compile"}
    assert {"fsdp-offload", "qlora", "paged-adam8bit", "adam4bit"} <= set(modelled_strategies("meta"))
    assert "amp" not in unsearchable("cuda")
    from gputech_bench.config import BenchConfig

    # sparse-head is refused by the seed objective (every position carries a label): fit lists
    # it as not searched, with that reason (tests/test_fit_search.py).
    searched = {part for setup in candidates(BenchConfig()) for part in setup.cell.split("+")}
    assert searched == {"baseline", "1", "2", "3", "4", "lora", "fsdp-offload", "qlora", "amp", "amp-fp16",
                        "paged-adam8bit", "chunked-ce", "offload-activations", "bf16-weights", "optimizer-in-backward",
                        "adam4bit"}
