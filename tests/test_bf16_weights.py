"""bf16-weights: the weights, gradients and optimizer state in bf16, measured on a tiny BERT and
a tiny Llama against the baseline (the negative control: the same step in fp32); stochastic
rounding keeps the updates that rounding to nearest loses; its refusals are one line each."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_RUN, context, random_batch, tiny_bert
from transformers import LlamaConfig, LlamaForCausalLM

from gputech_bench.errors import StrategyError
from gputech_bench.measure.tracker import StepMemoryTracker
from gputech_bench.strategies import build_plan, parse_cell
from gputech_bench.strategies.bf16_weights import StochasticRoundingAdamW, round_to_bf16_stochastically
from gputech_bench.strategies.plan import launch_refusal
from gputech_bench.strategies.registry import combination_refusal
from gputech_bench.training.loop import optimizer_step
from gputech_bench.training.schedule import linear_schedule_with_warmup

VOCAB = 300


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


def causal_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, VOCAB, (8, 16), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


MODELS = {
    "bert": (lambda: tiny_bert(VOCAB), lambda: random_batch(8, 16, VOCAB), ()),
    "llama": (llama, causal_batch, ("data.objective=clm",)),
}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def two_steps(cell: str, architecture: str, *overrides: str):
    """A plan after two optimizer steps (the second under the memory tracker, its state built)."""
    make_model, make_batch, extra = MODELS[architecture]
    ctx = context("train.batch_size=8", "strategy.micro_batch_size=4", "train.max_grad_norm=0", *extra, *overrides)
    plan = build_plan(parse_cell(cell), make_model(), ctx)
    scheduler = linear_schedule_with_warmup(plan.optimizer, 0, 10)
    batch = make_batch()
    optimizer_step(plan, scheduler, batch, ctx)
    with StepMemoryTracker(plan.model, plan.optimizer) as tracker:
        plan.precision.backward(plan.model(**batch).loss)  # the gradients, kept for the test to read
        grads = [p.grad for p in plan.model.parameters() if p.grad is not None]
        plan.optimizer.step()
    (peak,) = tracker.peaks()
    return plan, grads, peak


@pytest.mark.parametrize("architecture", sorted(MODELS))
def test_weights_gradients_and_optimizer_state_are_bf16_at_half_the_baselines_bytes(architecture):
    measured = {}
    for cell in ("baseline", "bf16-weights"):
        plan, grads, peak = two_steps(cell, architecture)
        state = [t for s in plan.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
        params = list(plan.model.parameters())
        measured[cell] = {
            "parameters": tensor_bytes(params), "gradients": tensor_bytes(grads), "optimizer_state": tensor_bytes(state),
            "tracked_parameters": peak.by_category["parameters"], "tracked_state": peak.by_category["optimizer_state"],
            "dtypes": {t.dtype for t in (*params, *grads, *state)},
        }
    base, bf16 = measured["baseline"], measured["bf16-weights"]
    # The negative control: the baseline's step is all fp32.
    assert base["dtypes"] == {torch.float32}
    assert bf16["dtypes"] == {torch.bfloat16}
    for figure in ("parameters", "gradients", "optimizer_state", "tracked_parameters", "tracked_state"):
        assert bf16[figure] * 2 == pytest.approx(base[figure], rel=0.01), (figure, base[figure], bf16[figure])


def test_the_rotary_frequencies_stay_fp32_in_a_bf16_llama():
    plan = build_plan(parse_cell("bf16-weights"), llama(), context("data.objective=clm"))
    buffers = dict(plan.model.named_buffers())
    rotary = {name: b.dtype for name, b in buffers.items() if "inv_freq" in name}
    assert rotary and set(rotary.values()) == {torch.float32}, rotary
    assert any(name.endswith("inv_freq") for name in plan.facts["fp32_buffers_kept"])
    assert plan.facts["loss_dtype"].startswith("float32")
    # The loss the loop backpropagates is fp32: transformers upcasts a causal LM's logits.
    assert plan.model(**causal_batch()).loss.dtype == torch.float32


def test_a_masked_lm_says_its_loss_is_computed_in_bf16():
    plan = build_plan(parse_cell("bf16-weights"), tiny_bert(VOCAB), context())
    assert plan.model(**random_batch(4, 16, VOCAB)).loss.dtype == torch.bfloat16
    assert plan.facts["loss_dtype"].startswith("bfloat16")
    assert plan.facts["compute_dtype"] == "bfloat16"
    assert "lost" in plan.facts["weight_update_rounding"]


def test_stochastic_rounding_is_exact_on_average_where_rounding_to_nearest_is_not():
    torch.manual_seed(0)
    # A quarter of bf16's step above 1.0 (2^-7): to nearest it is always 1.0.
    value = 1.0 + 2.0 ** -9
    values = torch.full((200_000,), value)
    assert float(values.to(torch.bfloat16).float().mean()) == 1.0
    rounded = round_to_bf16_stochastically(values)
    assert rounded.dtype == torch.bfloat16
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    assert float(rounded.float().mean()) == pytest.approx(value, abs=2e-5)
    # Negative values round away from zero just as often; non-finite values pass through.
    assert float(round_to_bf16_stochastically(-values).float().mean()) == pytest.approx(-value, abs=2e-5)
    special = round_to_bf16_stochastically(torch.tensor([float("nan"), float("inf"), -float("inf")]))
    assert special.isnan()[0] and special[1] == float("inf") and special[2] == -float("inf")


def test_updates_under_half_a_bf16_step_move_the_weight_only_with_stochastic_rounding():
    """100 AdamW steps of about lr = 1e-3 each on weights at 1.0, where bf16's step is 2^-8 below 1.0 and
    2^-7 above: in fp32 they reach 0.9; rounded to nearest every update is lost."""
    def train(optimizer_class) -> torch.Tensor:
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        optimizer = optimizer_class([weight], lr=1e-3, weight_decay=0.0)
        for _ in range(100):
            weight.grad = torch.ones_like(weight)
            optimizer.step()
        return weight.detach().float()

    nearest = train(torch.optim.AdamW)
    stochastic = train(StochasticRoundingAdamW)
    assert float(nearest.mean()) == 1.0  # every update lost: the negative control
    assert float(stochastic.mean()) == pytest.approx(0.9, abs=0.005)


def test_the_stochastic_rounding_adamw_is_torchs_adamw_on_fp32_weights(monkeypatch):
    from gputech_bench.strategies import bf16_weights

    monkeypatch.setattr(bf16_weights, "SR_CHUNK_ELEMENTS", 1000)
    """Without bf16 there is nothing to round: the same arithmetic as torch's AdamW, weight decay
    included, across steps and a tensor of several update chunks."""
    torch.manual_seed(0)
    start = torch.randn(3, 1000)
    grads = [torch.randn(3, 1000) for _ in range(5)]
    results = []
    for optimizer_class in (torch.optim.AdamW, StochasticRoundingAdamW):
        weight = torch.nn.Parameter(start.clone())
        optimizer = optimizer_class([weight], lr=1e-2, eps=1e-6, weight_decay=0.01)
        for grad in grads:
            weight.grad = grad.clone()
            optimizer.step()
        results.append(weight.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)
    assert not torch.equal(results[0], start)


def test_stochastic_rounding_builds_its_own_adamw_with_bf16_state(monkeypatch):
    from gputech_bench.strategies import bf16_weights

    monkeypatch.setattr(bf16_weights, "SR_CHUNK_ELEMENTS", 1000)  # several chunks per tensor
    plan, _, peak = two_steps("bf16-weights", "bert", "strategy.stochastic_rounding=true")
    assert isinstance(plan.optimizer, StochasticRoundingAdamW)
    assert plan.facts["optimizer"].endswith("StochasticRoundingAdamW")
    assert plan.facts["weight_update_rounding"].startswith("stochastic")
    state = [t for s in plan.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    assert {t.dtype for t in state} == {torch.bfloat16}
    baseline, _, baseline_peak = two_steps("baseline", "bert")
    assert peak.by_category["optimizer_state"] * 2 == pytest.approx(baseline_peak.by_category["optimizer_state"], rel=0.01)


@pytest.mark.parametrize("cell", ["1+bf16-weights", "2+bf16-weights", "3+bf16-weights", "lora+bf16-weights"])
def test_it_combines_and_everything_trained_is_bf16(cell):
    plan, grads, _ = two_steps(cell, "bert")
    trained = [p for p in plan.model.parameters() if p.requires_grad]
    assert trained and {p.dtype for p in trained} == {torch.bfloat16}
    assert grads and {g.dtype for g in grads} == {torch.bfloat16}
    assert all(torch.isfinite(p).all() for p in trained)


def test_bitsandbytes_8bit_adam_steps_bf16_weights():
    plan, _, _ = two_steps("3+bf16-weights", "bert")
    assert plan.facts["optimizer"] == "bitsandbytes.optim.Adam8bit"
    before = [p.detach().clone() for p in plan.model.parameters()]
    batch = random_batch(8, 16, VOCAB)
    plan.precision.backward(plan.model(**batch).loss)
    plan.optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, plan.model.parameters()))


@pytest.mark.parametrize("other, why", [
    ("4", "fp32 master copy"),
    ("amp", "redundant"),
    ("amp-fp16", "GradScaler"),
])
def test_it_is_refused_with_4_amp_and_amp_fp16_in_one_line(other, why):
    reason = combination_refusal(parse_cell(f"{other}+bf16-weights"))
    assert reason and why in reason and "\n" not in reason
    with pytest.raises(StrategyError) as refused:
        launch_refusal(parse_cell(f"{other}+bf16-weights"), context().config)
    assert "\n" not in str(refused.value) and why in str(refused.value)


def test_stochastic_rounding_beside_another_optimizer_is_refused_in_one_line_naming_the_setting():
    config = context("strategy.stochastic_rounding=true").config
    assert combination_refusal(parse_cell("3+bf16-weights")) is None  # fine without the setting
    launch_refusal(parse_cell("3+bf16-weights"), context().config)
    with pytest.raises(StrategyError) as refused:
        launch_refusal(parse_cell("3+bf16-weights"), config)
    message = str(refused.value)
    assert "\n" not in message and "build_optimizer" in message and "--set strategy.stochastic_rounding=false" in message


def test_stochastic_rounding_is_a_checked_boolean():
    from gputech_bench.config import BenchConfig, apply_overrides
    from gputech_bench.errors import ConfigError

    assert apply_overrides(BenchConfig(), ["strategy.stochastic_rounding=on"]).strategy.stochastic_rounding is True
    with pytest.raises(ConfigError, match="stochastic_rounding expects true or false"):
        apply_overrides(BenchConfig(), ["strategy.stochastic_rounding=maybe"])


@pytest.mark.parametrize("overrides", [(), ("strategy.stochastic_rounding=true",)])
def test_the_estimate_traces_bf16_weights_at_half_the_weights_and_state(cache_dir, overrides):
    from gputech_bench.config import apply_overrides, load_preset
    from gputech_bench.estimator.trace import trace_cell, trace_inputs, trace_target

    # Without dropout: the masks dropout keeps for backward are 1 byte an element in any precision.
    config = apply_overrides(load_preset("cpu"), [*TINY_RUN, f"data.cache_dir={cache_dir}", "train.max_steps=2",
                                                  "model.dropout=0.0", *overrides])
    inputs = trace_inputs(config)
    traced = {cell: trace_cell(parse_cell(cell), config, inputs, trace_target()).device.by_category
              for cell in ("baseline", "bf16-weights")}
    for category in ("parameters", "optimizer_state", "activations"):
        assert traced["bf16-weights"][category] * 2 == pytest.approx(traced["baseline"][category], rel=0.05), category


def test_at_the_seeds_learning_rate_rounding_to_nearest_loses_most_of_the_training_and_stochastic_rounding_keeps_it():
    """Ten steps at the seed's lr (3e-5) on a tiny BERT: its weights (about 0.02) sit where bf16's
    half step is about 6e-5, larger than Adam's update of about lr, so rounding to nearest drops
    most updates. The total movement of the weights is compared with fp32's (the control)."""
    batch = random_batch(8, 16, VOCAB)
    movement = {}
    for cell, rounding in (("baseline", "false"), ("bf16-weights", "false"), ("bf16-weights", "true")):
        torch.manual_seed(0)
        ctx = context("train.batch_size=8", "train.max_grad_norm=0", f"strategy.stochastic_rounding={rounding}")
        plan = build_plan(parse_cell(cell), tiny_bert(VOCAB), ctx)
        scheduler = linear_schedule_with_warmup(plan.optimizer, 0, 1000)
        start = [p.detach().float().clone() for p in plan.model.parameters()]
        for _ in range(10):
            optimizer_step(plan, scheduler, batch, ctx)
        movement[(cell, rounding)] = sum(float((p.detach().float() - s).abs().sum())
                                         for p, s in zip(plan.model.parameters(), start))
    fp32 = movement[("baseline", "false")]
    assert movement[("bf16-weights", "false")] < 0.5 * fp32, movement
    assert movement[("bf16-weights", "true")] == pytest.approx(fp32, rel=0.15), movement


def test_the_table_notes_say_which_rounding_ran():
    from gputech_bench.strategies.bf16_weights import Bf16Weights

    nearest, = Bf16Weights().table_notes(context())
    stochastic, = Bf16Weights().table_notes(context("strategy.stochastic_rounding=true"))
    assert "lost to rounding" in nearest and "own AdamW" in stochastic and "stochastically" in stochastic


def test_a_gpu_without_bf16_is_refused_in_one_line(monkeypatch):
    from gputech_bench.strategies import RunContext
    from gputech_bench.strategies.bf16_weights import Bf16Weights

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100-SXM2-16GB")
    ctx = RunContext(context().config, torch.device("cuda"), new_head_modules=())
    with pytest.raises(StrategyError) as refused:
        Bf16Weights().device_refusal(ctx)
    message = str(refused.value)
    assert "\n" not in message and "V100" in message and "amp-fp16" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_step_keeps_everything_bf16_with_and_without_stochastic_rounding():
    from gputech_bench.strategies import RunContext

    for rounding in ("false", "true"):
        config = context("train.batch_size=8", f"strategy.stochastic_rounding={rounding}").config
        ctx = RunContext(config, torch.device("cuda"), new_head_modules=())
        plan = build_plan(parse_cell("1+bf16-weights"), tiny_bert(VOCAB), ctx)
        optimizer_step(plan, linear_schedule_with_warmup(plan.optimizer, 0, 10), random_batch(8, 16, VOCAB), ctx)
        state = [t for s in plan.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
        assert {p.dtype for p in plan.model.parameters()} == {torch.bfloat16}
        assert state and {t.dtype for t in state} == {torch.bfloat16}
