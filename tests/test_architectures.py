"""Every strategy on every architecture the project loads: tiny BERT, DistilBERT and RoBERTa
masked-LMs and a Llama-style causal LM, each a random init from a config.json (no weights,
no network). Each strategy either takes an optimizer step or refuses with its reason; LoRA's
targets resolve per architecture; qlora holds 4-bit weights and trains only its adapters."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import (
    AlbertConfig,
    BertConfig,
    DistilBertConfig,
    LlamaConfig,
    RobertaConfig,
    get_linear_schedule_with_warmup,
)

from gputech_bench.config import BenchConfig, apply_overrides, load_preset
from gputech_bench.errors import StrategyError
from gputech_bench.measure.tracker import QUANTIZED, StepMemoryTracker
from gputech_bench.modeling import load_model
from gputech_bench.strategies import RunContext, build_plan, distributed, launch_refusal, parse_cell, registered
from gputech_bench.strategies.architecture import repeated_blocks, resolve_lora_targets
from gputech_bench.strategies.checkpointing import is_checkpointing
from gputech_bench.training.loop import optimizer_step

VOCAB = 300
ROWS, LENGTH = 4, 16
MASKED_LMS = ("bert", "distilbert", "roberta")
CAUSAL_LMS = ("llama",)
ARCHITECTURES = MASKED_LMS + CAUSAL_LMS


def hf_config(architecture: str):
    """Hidden 32, 2 layers, 2 heads: seconds per step on a CPU."""
    if architecture == "bert":
        return BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=64, architectures=["BertForMaskedLM"])
    if architecture == "distilbert":
        return DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=2,
                                max_position_embeddings=64, architectures=["DistilBertForMaskedLM"])
    if architecture == "roberta":
        # RoBERTa's positions start after the padding index: 2 more rows than tokens.
        return RobertaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=66, architectures=["RobertaForMaskedLM"])
    if architecture == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                           architectures=["LlamaForCausalLM"])
    if architecture == "albert":  # a masked-LM no LoRA default and no sparse-head table covers
        return AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                            architectures=["AlbertForMaskedLM"])
    raise ValueError(architecture)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A config-only folder per architecture: ``--model`` builds a random init of it."""
    root = tmp_path_factory.mktemp("architectures")
    paths = {}
    for architecture in (*ARCHITECTURES, "albert"):
        hf_config(architecture).save_pretrained(root / architecture)
        paths[architecture] = root / architecture
    return paths


@pytest.fixture(autouse=True)
def no_process_group_left():
    """fsdp-offload starts a process group of one; no test leaves one behind."""
    yield
    if dist.is_initialized():
        distributed.shutdown()


def objective(architecture: str) -> str:
    return "clm" if architecture in CAUSAL_LMS else "mlm"


def arch_context(folder: Path, architecture: str, *overrides: str) -> RunContext:
    config = apply_overrides(BenchConfig(), [
        "device=cpu", f"model.pretrained={folder}", f"data.objective={objective(architecture)}",
        f"train.batch_size={ROWS}", "strategy.micro_batch_size=2", "train.lr=1e-3",
        *overrides,
    ])
    return RunContext(config, torch.device("cpu"), new_head_modules=())


def build(folder: Path, ctx: RunContext) -> nn.Module:
    return load_model(ctx.config.model, VOCAB, 0, 0).model


def batch_for(architecture: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (ROWS, LENGTH), generator=generator)
    if architecture in CAUSAL_LMS:
        labels = input_ids.clone()  # the model shifts them: next-token targets
    else:
        labels = torch.full_like(input_ids, -100)
        labels[:, ::4] = input_ids[:, ::4]
        input_ids = input_ids.clone()
        input_ids[:, ::4] = 4
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def snapshot(tensors) -> list[torch.Tensor]:
    return [(t.to_local() if isinstance(t, DTensor) else t).detach().clone() for t in tensors]


def step(plan, ctx: RunContext, architecture: str) -> torch.Tensor:
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 10)
    return optimizer_step(plan, scheduler, batch_for(architecture), ctx)


def assert_trains(plan, ctx: RunContext, architecture: str) -> None:
    """One optimizer step: a finite loss, and some weight the optimizer owns has moved."""
    trained = plan.placement.optimizer_parameters()
    before = snapshot(trained)
    loss = step(plan, ctx, architecture)
    assert torch.isfinite(loss), float(loss)
    after = snapshot(plan.placement.optimizer_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "no trainable weight changed"


@pytest.fixture()
def eager_compile(monkeypatch):
    """torch.compile with the aot_eager backend: Dynamo captures each architecture's forward and
    AOTAutograd its backward (the parts that depend on the model); Inductor's code generation,
    a minute per model on 2 CPU cores, is the slow compile test's (test_modern_strategies)."""
    original = nn.Module.compile

    def compile_eagerly(self, *args, **kwargs):
        return original(self, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(nn.Module, "compile", compile_eagerly)


#: (strategy, architecture) -> words the refusal must contain; every other pair trains.
REFUSED = {
    **{("paged-adam8bit", architecture): "needs CUDA" for architecture in ARCHITECTURES},
    ("sparse-head", "llama"): "causal LM",
}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("strategy", [cls.key for cls in registered()])
def test_every_strategy_trains_or_refuses_on_every_architecture(strategy, architecture, folders, eager_compile):
    ctx = arch_context(folders[architecture], architecture)
    expected_refusal = REFUSED.get((strategy, architecture))
    if expected_refusal:
        with pytest.raises(StrategyError) as refusal:
            build_plan(parse_cell(strategy), build(folders[architecture], ctx), ctx)
        message = str(refusal.value)
        assert expected_refusal in message and "\n" not in message
        return
    plan = build_plan(parse_cell(strategy), build(folders[architecture], ctx), ctx)
    assert_trains(plan, ctx, architecture)
    if strategy == "1":
        assert is_checkpointing(plan.model)
    if strategy == "fsdp-offload":
        unit = {"bert": "BertLayer", "distilbert": "TransformerBlock", "roberta": "RobertaLayer",
                "llama": "LlamaDecoderLayer"}[architecture]
        assert plan.facts["fsdp_layer_unit"].startswith(unit)


def test_sparse_head_on_a_causal_lm_is_refused_before_any_process_with_the_right_reason(folders):
    config = arch_context(folders["llama"], "llama").config
    with pytest.raises(StrategyError) as refusal:
        launch_refusal(parse_cell("sparse-head"), config)
    message = str(refusal.value)
    assert "causal LM" in message and "leave sparse-head out" in message
    assert "data.objective=mlm" not in message  # no objective makes a causal LM's head sparse


def test_sparse_head_on_a_masked_lm_it_does_not_know_is_refused(folders):
    config = arch_context(folders["albert"], "albert").config
    with pytest.raises(StrategyError, match="sparse-head knows the masked-LM heads of bert, distilbert, roberta, "
                                            "not of a 'albert' model"):
        launch_refusal(parse_cell("sparse-head"), config)


@pytest.mark.parametrize("architecture", ["distilbert", "roberta"])
def test_sparse_head_equals_the_full_head_on_each_masked_lm(architecture, folders):
    ctx = arch_context(folders[architecture], architecture)
    model = build(folders[architecture], ctx).eval()  # no dropout: both passes see the same network
    batch = batch_for(architecture)
    full = model(**batch)
    sparse = build_plan(parse_cell("sparse-head"), model, ctx)
    rows = sparse.model.token_rows(batch["input_ids"], batch["attention_mask"], batch["labels"]).labelled()
    masked = batch["labels"] != -100
    torch.testing.assert_close(rows.head(rows.hidden), full.logits[masked], rtol=1e-5, atol=1e-5)
    assert torch.equal(rows.targets, batch["labels"][masked])
    torch.testing.assert_close(sparse.model(**batch).loss, full.loss, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        predictions = sparse.predictor.predict(batch)
    assert torch.equal(predictions.predicted, full.logits.argmax(-1))


# --------------------------------------------------------------------------- LoRA targets


@pytest.mark.parametrize("architecture, targets, source", [
    ("bert", ["query", "value"], "peft's default for bert"),
    ("roberta", ["query", "value"], "peft's default for roberta"),
    ("llama", ["q_proj", "v_proj"], "peft's default for llama"),
    ("distilbert", ["q_lin", "v_lin"], "gputech-bench's table for distilbert (peft has none)"),
])
def test_lora_targets_resolve_per_architecture(architecture, targets, source, folders):
    ctx = arch_context(folders[architecture], architecture)
    plan = build_plan(parse_cell("lora"), build(folders[architecture], ctx), ctx)
    assert plan.facts["lora"]["targets"] == targets
    assert plan.facts["lora"]["targets_from"] == source
    adapted = {name.rsplit(".", 1)[-1] for name, module in plan.model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == set(targets)


def test_lora_targets_setting_overrides_the_default(folders):
    ctx = arch_context(folders["llama"], "llama", "strategy.lora_targets=q_proj,k_proj,v_proj,o_proj")
    plan = build_plan(parse_cell("lora"), build(folders["llama"], ctx), ctx)
    assert plan.facts["lora"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert plan.facts["lora"]["targets_from"] == "strategy.lora_targets"


@pytest.mark.parametrize("cell", ["lora", "qlora"])
def test_a_model_type_without_default_targets_is_refused_before_any_process(cell, folders):
    config = arch_context(folders["albert"], "albert").config
    with pytest.raises(StrategyError) as refusal:
        launch_refusal(parse_cell(cell), config)
    message = str(refusal.value)
    assert "'albert'" in message and "--set strategy.lora_targets=" in message and "\n" not in message
    # Named targets need no default.
    launch_refusal(parse_cell(cell), apply_overrides(config, ["strategy.lora_targets=query,value"]))


def test_the_seeds_bert_keeps_query_and_value():
    seed = load_preset("seed")
    assert seed.strategy.lora_targets == ()  # peft's default for the model type...
    assert resolve_lora_targets((), "bert", "lora")[0] == ("query", "value")  # ...which for BERT is the seed's
    assert apply_overrides(seed, ["strategy.lora_targets="]).strategy.lora_targets == ()


def test_lora_trains_a_newly_initialised_head_in_full(folders):
    head = ("vocab_transform", "vocab_layer_norm", "vocab_projector")
    # As the worker fills it from the load report of a checkpoint saved without its head.
    ctx = dataclasses.replace(arch_context(folders["distilbert"], "distilbert"), new_head_modules=head)
    plan = build_plan(parse_cell("lora"), build(folders["distilbert"], ctx), ctx)
    trainable = {name for name, p in plan.model.named_parameters() if p.requires_grad}
    for module in head:
        assert any(f"{module}.modules_to_save." in name for name in trainable), module
    assert all("lora_" in name or "modules_to_save" in name for name in trainable)
    assert plan.facts["lora"]["trained_in_full"] == list(head)
    assert_trains(plan, ctx, "distilbert")


# --------------------------------------------------------------------------- fsdp-offload's unit


@pytest.mark.parametrize("architecture, unit, how", [
    ("bert", "BertLayer", "_no_split_modules"),  # BertEmbeddings is listed too, but not repeated
    ("llama", "LlamaDecoderLayer", "_no_split_modules"),
    ("distilbert", "TransformerBlock", "largest nn.ModuleList"),  # DistilBERT lists none
])
def test_the_repeated_block_is_the_models_own_layer(architecture, unit, how, folders):
    ctx = arch_context(folders[architecture], architecture)
    blocks, found = repeated_blocks(build(folders[architecture], ctx))
    assert len(blocks) == 2 and {type(block).__name__ for block in blocks} == {unit}
    assert found.startswith(unit) and how in found


# --------------------------------------------------------------------------- strategy 4 on Llama


def test_mixed_precision_keeps_llamas_rotary_frequencies_in_fp32(folders):
    ctx = arch_context(folders["llama"], "llama")
    plan = build_plan(parse_cell("4"), build(folders["llama"], ctx), ctx)
    rotary = plan.model.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32  # a constant: half would blur positions
    assert {p.dtype for p in plan.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in plan.placement.optimizer_parameters()} == {torch.float32}


# --------------------------------------------------------------------------- qlora


def params4bit(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if type(p).__name__ == "Params4bit"}


@pytest.mark.parametrize("architecture", ["llama", "bert"])
def test_qlora_holds_uint8_packed_weights_and_trains_only_the_adapters(architecture, folders):
    import bitsandbytes as bnb

    ctx = arch_context(folders[architecture], architecture)
    model = build(folders[architecture], ctx)
    linear_weights = sum(m.weight.numel() for m in model.modules() if type(m) is nn.Linear)
    plan = build_plan(parse_cell("qlora"), model, ctx)

    quantized = params4bit(plan.model)
    assert quantized and all(p.dtype == torch.uint8 and not p.requires_grad for p in quantized.values())
    layers = [m for m in plan.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == len(quantized) and all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    # Two 4-bit codes per byte.
    assert sum(p.numel() for p in quantized.values()) * 2 == sum(p.quant_state.shape.numel() for p in quantized.values())
    # Unquantised as transformers leaves them: the embeddings, and the LM head (Llama) or the
    # decoder tied to the input embeddings (BERT).
    assert plan.model.get_input_embeddings().weight.dtype == torch.float32
    assert type(plan.model.get_output_embeddings()) is nn.Linear
    unquantized_linear = sum(m.weight.numel() for name, m in plan.model.named_modules()
                             if type(m) is nn.Linear and "lora_" not in name)
    assert plan.facts["qlora"]["quantized_parameters"] + unquantized_linear == linear_weights

    trainable = {name for name, p in plan.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    packed_before = {name: p.detach().clone() for name, p in quantized.items()}
    assert_trains(plan, ctx, architecture)
    assert all(torch.equal(params4bit(plan.model)[name], before) for name, before in packed_before.items())


def test_qlora_memory_breakdown_shows_the_quantized_weights_apart(folders):
    ctx = arch_context(folders["llama"], "llama")
    plan = build_plan(parse_cell("qlora"), build(folders["llama"], ctx), ctx)
    step(plan, ctx, "llama")  # optimizer state exists from here
    tracker = StepMemoryTracker(plan.model, plan.optimizer)
    with tracker:
        step(plan, ctx, "llama")
    (peak,) = tracker.peaks()

    packed = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params4bit(plan.model).values()}
    constants = {}
    for p in params4bit(plan.model).values():
        state = p.quant_state
        for tensor in (state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code):
            constants[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    assert peak.by_category[QUANTIZED] == sum(packed.values()) + sum(constants.values())
    # The rest of the parameters (embeddings, norms, LM head, adapters) stay "parameters".
    others = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
              for p in plan.model.parameters() if type(p).__name__ != "Params4bit"}
    assert peak.by_category["parameters"] == sum(others.values())
    assert peak.total_bytes == sum(peak.by_category.values())


def test_no_quantized_category_without_4bit_weights(folders):
    ctx = arch_context(folders["llama"], "llama")
    plan = build_plan(parse_cell("lora"), build(folders["llama"], ctx), ctx)
    with StepMemoryTracker(plan.model, plan.optimizer) as tracker:
        step(plan, ctx, "llama")
    assert QUANTIZED not in tracker.peaks()[0].by_category


def test_qlora_keeps_a_newly_initialised_head_unquantised_and_trains_it(folders):
    head = ("vocab_transform", "vocab_layer_norm", "vocab_projector")
    ctx = dataclasses.replace(arch_context(folders["distilbert"], "distilbert"), new_head_modules=head)
    plan = build_plan(parse_cell("qlora"), build(folders["distilbert"], ctx), ctx)
    assert not any(name.split(".")[2] in head for name in params4bit(plan.model))  # base_model.model.<module>
    assert set(head) <= set(plan.facts["qlora"]["kept_unquantized"])
    trainable = {name for name, p in plan.model.named_parameters() if p.requires_grad}
    for module in head:
        assert any(f"{module}.modules_to_save." in name for name in trainable), module
    assert_trains(plan, ctx, "distilbert")


@pytest.mark.parametrize("cell", ["1+qlora", "2+qlora", "amp+qlora"])
def test_qlora_combines_with_checkpointing_accumulation_and_amp(cell, folders):
    ctx = arch_context(folders["llama"], "llama")
    plan = build_plan(parse_cell(cell), build(folders["llama"], ctx), ctx)
    assert params4bit(plan.model)
    assert_trains(plan, ctx, "llama")
    if cell == "1+qlora":
        assert is_checkpointing(plan.model)
    if cell == "2+qlora":
        assert len(plan.split_batch(batch_for("llama"))) == 2
    if cell == "amp+qlora":
        assert plan.facts["autocast_dtype"] == "bfloat16"


@pytest.mark.parametrize("cell, reason", [
    ("3+qlora", "8-bit optimizer would save almost nothing"),
    ("paged-adam8bit+qlora", "8-bit optimizer would save almost nothing"),
    ("4+qlora", "casts every unquantised weight"),
    ("fsdp-offload+qlora", "FSDP2 shards and offloads parameters only"),
    ("lora+qlora", "the same adapters twice"),
])
def test_qlora_refuses_what_it_cannot_be_combined_with(cell, reason, folders):
    config = arch_context(folders["llama"], "llama").config
    with pytest.raises(StrategyError) as refusal:
        launch_refusal(parse_cell(cell), config)
    message = str(refusal.value)
    assert reason in message and "run them in separate cells" in message and "\n" not in message
