"""The loss and predict hooks (``Strategy.wrap_loss``, ``Strategy.wrap_predict``) on a tiny BERT
and a tiny Llama-style causal LM: sparse-head on them gives the numbers it gave as a model
wrapper; a strategy defined here that doubles the loss doubles the gradients, alone and with
accumulation and amp; hooks compose in the strategies' order; a cell without hooks runs the
model's own forward, as before."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import context, random_batch, tiny_bert
from transformers import LlamaConfig, LlamaForCausalLM

from gputech_bench.data.masking import IGNORE_INDEX
from gputech_bench.data.prepare import EvalSet
from gputech_bench.errors import StrategyError
from gputech_bench.strategies import Cell, Strategy, build_plan, parse_cell
from gputech_bench.strategies.base import RunContext, TokenLoss, TokenPredict, TokenRows
from gputech_bench.strategies.hidden_states import HiddenStateModel
from gputech_bench.training.evaluate import evaluate
from gputech_bench.training.loop import accumulate_gradients

VOCAB = 300


class DoubleLoss(Strategy):
    """A test strategy: twice the loss, so twice the gradients."""

    key = name = "double-loss"
    saves = costs = "nothing: it proves the loss hook is called"
    order = 70

    def wrap_loss(self, inner: TokenLoss, ctx: RunContext) -> TokenLoss:
        return lambda rows: 2 * inner(rows)


#: Which hook saw the rows, in call order (the composition test's record).
CALLS: list[str] = []


class RecordsFirst(Strategy):
    key = name = "records-first"
    saves = costs = "nothing: it records when its hooks run"
    order = 71

    def wrap_loss(self, inner: TokenLoss, ctx: RunContext) -> TokenLoss:
        def loss(rows: TokenRows) -> torch.Tensor:
            CALLS.append(f"{self.key} loss of {rows.hidden.shape[0]} rows")
            return inner(rows)

        return loss

    def wrap_predict(self, inner: TokenPredict, ctx: RunContext) -> TokenPredict:
        def predict(rows: TokenRows) -> torch.Tensor:
            CALLS.append(f"{self.key} predict")
            return inner(rows)

        return predict


class RecordsSecond(RecordsFirst):
    key = name = "records-second"
    order = 72


def cell(text: str, *extra: type[Strategy]) -> Cell:
    """A cell of registered strategies plus the test's own (built directly: nothing is registered)."""
    registered = () if text == "baseline" else parse_cell(text).strategies
    return Cell(tuple(sorted((*registered, *extra), key=lambda cls: cls.order)))


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


def causal_batch() -> dict[str, torch.Tensor]:
    """Next-token labels are the input ids; the second row ends in padding, which no loss scores."""
    ids = torch.randint(5, VOCAB, (4, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


def gradients(the_cell: Cell, model: torch.nn.Module, batch, *overrides: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(loss, every gradient) of one accumulate_gradients call, as the training loop makes it."""
    ctx = context("train.batch_size=4", "strategy.micro_batch_size=2", *overrides)
    plan = build_plan(the_cell, model, ctx)
    plan.model.train()
    loss = accumulate_gradients(plan, batch, ctx.device)
    return loss, [p.grad.clone() for p in plan.model.parameters() if p.grad is not None]


def grad_norm(grads: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])))


# --------------------------------------------------------------------------- sparse-head: the numbers it had


#: Recorded with sparse-head as a model wrapper (MaskedPositionsHead, before the hooks existed):
#: (loss, gradient norm) of one accumulate_gradients on a tiny BERT, 4 rows of 24 tokens.
SPARSE_HEAD_BEFORE_HOOKS = {
    ("sparse-head", 0.0): ("0x1.8eb8de0000000p+2", "0x1.1fc0220000000p+1"),
    ("sparse-head", 0.1): ("0x1.8d83240000000p+2", "0x1.183b740000000p+1"),
    ("2+sparse-head", 0.0): ("0x1.8eb6480000000p+2", "0x1.1f39860000000p+1"),
    ("amp+sparse-head", 0.0): ("0x1.8eba760000000p+2", "0x1.2078aa0000000p+1"),
    ("1+lora+sparse-head", 0.1): ("0x1.8d83b40000000p+2", "0x1.a598b00000000p-7"),
}


@pytest.mark.parametrize("name, dropout", list(SPARSE_HEAD_BEFORE_HOOKS))
def test_sparse_head_trains_with_the_loss_and_gradients_it_had_as_a_model_wrapper(name, dropout):
    torch.manual_seed(0)  # LoRA's initial adapters, as when the figures were recorded
    model = tiny_bert(vocab=500, dropout=dropout)
    ctx = context("train.batch_size=4", "strategy.micro_batch_size=2", "data.objective=mlm")
    plan = build_plan(parse_cell(name), model, ctx)
    plan.model.train()
    torch.manual_seed(1)  # the same dropout masks
    loss = accumulate_gradients(plan, random_batch(4, 24, 500, seed=3), ctx.device)
    norm = grad_norm([p.grad for p in plan.model.parameters() if p.grad is not None])
    loss_before, norm_before = (float.fromhex(value) for value in SPARSE_HEAD_BEFORE_HOOKS[(name, dropout)])
    assert float(loss) == pytest.approx(loss_before, rel=1e-6)
    assert norm == pytest.approx(norm_before, rel=1e-5)


def test_sparse_head_loss_and_gradients_equal_the_full_logits_masked_loss():
    batch = random_batch(4, 24, 500, seed=3)
    full_loss, full = gradients(cell("baseline"), tiny_bert(vocab=500), batch, "data.objective=mlm")
    sparse_loss, sparse = gradients(cell("sparse-head"), tiny_bert(vocab=500), batch, "data.objective=mlm")
    torch.testing.assert_close(sparse_loss, full_loss, rtol=1e-6, atol=1e-6)
    assert len(sparse) == len(full)
    for a, b in zip(sparse, full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def eval_set(vocab: int) -> EvalSet:
    original = random_batch(6, 24, vocab, seed=7)
    ids = original["input_ids"].clone()
    masked = original["labels"] != IGNORE_INDEX
    ids[masked] = original["labels"][masked]
    return EvalSet(original["input_ids"], original["labels"], ids, original["attention_mask"], masked, "mlm")


def test_sparse_head_evaluation_scores_what_the_full_logits_score():
    model, data = tiny_bert(vocab=500), eval_set(500)
    ctx = context("data.objective=mlm")
    full = evaluate(build_plan(cell("baseline"), model, ctx).predictor, data, ctx.device, 4)
    sparse = evaluate(build_plan(cell("sparse-head"), model, ctx).predictor, data, ctx.device, 4)
    assert (sparse.masked_accuracy, sparse.token_accuracy) == (full.masked_accuracy, full.token_accuracy)
    assert (sparse.masked_tokens, sparse.scored_tokens, sparse.labelled_tokens) == (
        full.masked_tokens, full.scored_tokens, full.labelled_tokens)
    assert sparse.loss == pytest.approx(full.loss, rel=1e-6)
    # The figure sparse-head's own evaluation gave before the hooks, for this model and set.
    assert sparse.loss == pytest.approx(float.fromhex("0x1.8c3171611a7b9p+2"), rel=1e-6)


# --------------------------------------------------------------------------- a loss hook of the test's own


@pytest.mark.parametrize("others", ["baseline", "2", "amp", "2+amp"])
def test_a_loss_hook_that_doubles_the_loss_doubles_the_gradients(others):
    batch = random_batch(4, 24, VOCAB, seed=3)
    loss, grads = gradients(cell(others), tiny_bert(), batch)
    doubled_loss, doubled = gradients(cell(others, DoubleLoss), tiny_bert(), batch)
    torch.testing.assert_close(doubled_loss, 2 * loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(doubled, grads):
        torch.testing.assert_close(a, 2 * b, rtol=1e-3, atol=1e-6)


def test_on_a_causal_lm_the_hooks_see_the_same_shifted_targets_as_the_models_own_loss():
    batch = causal_batch()
    loss, grads = gradients(cell("baseline"), llama(), batch, "data.objective=clm")
    doubled_loss, doubled = gradients(cell("baseline", DoubleLoss), llama(), batch, "data.objective=clm")
    torch.testing.assert_close(doubled_loss, 2 * loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(doubled, grads):
        torch.testing.assert_close(a, 2 * b, rtol=1e-4, atol=1e-6)


def test_on_a_causal_lm_evaluation_through_the_predict_hooks_scores_like_the_full_logits():
    batch = causal_batch()
    data = EvalSet(batch["input_ids"], batch["labels"], batch["input_ids"], batch["attention_mask"],
                   torch.zeros_like(batch["input_ids"], dtype=torch.bool), "clm")
    ctx = context("data.objective=clm")
    model = llama()
    full = evaluate(build_plan(cell("baseline"), model, ctx).predictor, data, ctx.device, 2)
    hooked = evaluate(build_plan(cell("baseline", RecordsFirst), model, ctx).predictor, data, ctx.device, 2)
    assert hooked.next_token_accuracy == full.next_token_accuracy
    assert hooked.scored_tokens == full.scored_tokens == 4 * 23 - 4  # the padded row scores 19 positions
    assert hooked.loss == pytest.approx(full.loss, rel=1e-6)


def test_hooks_compose_in_the_strategies_order_the_earliest_outermost():
    ctx = context("train.batch_size=4", "data.objective=mlm")
    plan = build_plan(cell("sparse-head", RecordsSecond, RecordsFirst), tiny_bert(), ctx)
    batch = random_batch(4, 16, VOCAB, mask_every=4)
    CALLS.clear()
    plan.model(**batch).loss.backward()
    # sparse-head (order 60) keeps the 16 masked rows of 64 before the later hooks see them.
    assert CALLS == ["records-first loss of 16 rows", "records-second loss of 16 rows"]
    CALLS.clear()
    with torch.no_grad():
        plan.predictor.predict(batch)
    # sparse-head's predictions come in chunks: each chunk passes through the later hooks.
    assert CALLS == ["records-first predict", "records-second predict",
                     "records-first loss of 16 rows", "records-second loss of 16 rows"]


def test_the_hooks_wrap_the_model_where_their_first_user_stands_and_no_hook_means_no_wrapper():
    ctx = context("train.batch_size=4", "data.objective=mlm")
    baseline = build_plan(cell("1+lora"), tiny_bert(), ctx)
    assert not isinstance(baseline.model, HiddenStateModel)  # the model's own forward and loss, as always
    hooked = build_plan(cell("1+lora", DoubleLoss), tiny_bert(), ctx)
    assert isinstance(hooked.model, HiddenStateModel)
    assert type(hooked.model.model).__name__ == "PeftModel"  # LoRA (order 50) ran inside the wrapper
    assert hooked.predictor.model is hooked.model
    loss, _ = gradients(cell("1+lora", DoubleLoss), tiny_bert(), random_batch(4, 16, VOCAB))
    assert torch.isfinite(loss)


def test_a_causal_lm_that_changes_its_scores_after_the_head_is_refused_by_name():
    model = llama()
    model.config.final_logit_softcapping = 30.0  # as Gemma 2's config has it
    with pytest.raises(StrategyError, match=r"changes its scores after the LM head \(final_logit_softcapping=30.0\)"):
        build_plan(cell("baseline", DoubleLoss), model, context("data.objective=clm"))


def test_lora_trains_the_new_head_the_run_context_names():
    head = ("cls",)
    ctx = dataclasses.replace(context("train.batch_size=4"), new_head_modules=head)
    plan = build_plan(cell("lora"), tiny_bert(), ctx)
    trainable = {name for name, p in plan.model.named_parameters() if p.requires_grad}
    assert any("cls.modules_to_save." in name for name in trainable)
    assert plan.facts["lora"]["trained_in_full"] == ["cls"]
    untouched = build_plan(cell("lora"), tiny_bert(), context("train.batch_size=4"))
    assert not any("modules_to_save" in name for name, _ in untouched.model.named_parameters())
