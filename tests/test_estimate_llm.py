"""Estimate and fit for LLM shapes (issue 14, section 6): a causal LM from its config.json alone,
an 8B Llama traced without its 32 GB of weights, and the figures checked against accounts
that do not come from the tracer: parameter count x 4 bytes, 16 bytes per trainable fp32
parameter for weights + gradients + Adam, and bitsandbytes' own NF4 layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gputech_bench.cli import app
from gputech_bench.config import apply_overrides, load_preset
from gputech_bench.estimator.fit import FitSearch, candidates, trains_every_weight
from gputech_bench.estimator.modelled import nf4_bytes, quantised_sizes
from gputech_bench.estimator.overheads import Overheads
from gputech_bench.estimator.predict import Setup, predict
from gputech_bench.estimator.trace import Limit, fake_mode, trace_cell, trace_inputs, trace_target
from gputech_bench.modeling import build_shape_model
from gputech_bench.strategies import parse_cell

LLAMA_8B = Path(__file__).resolve().parents[1] / "configs" / "models" / "llama-8b"
# Tensor bytes alone: no context, no reserve, the allocator's replay left out (its segments
# and workspaces would dwarf a tiny model's bytes; tests/test_reserved.py checks the replay).
NO_OVERHEAD = Overheads(0, "test", 0.0, "test", replayed=False)
runner = CliRunner()

#: A small Llama: 4 layers, GQA (4 heads, 2 KV heads), untied head; ~4.5M parameters, so that
#: weights, gradients and optimizer state dominate the step as they do at 8B.
SMALL_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 8192,
    "max_position_embeddings": 256,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
}
#: Data for the trace: the causal objective, short sequences, a small WordPiece (<= vocab_size).
LLM_DATA = [
    "data.objective=clm",
    "model.attention=sdpa",
    "data.train_sentences=64",
    "data.eval_sentences=8",
    "data.tokenizer_vocab_size=400",
    # Few tokens: the step's peak is then its optimizer update, where weights, gradients and
    # Adam's moments are all live (as at 8B, where they dwarf the activations).
    "train.batch_size=4",
    "data.max_length=16",
    "strategy.micro_batch_size=2",
    "device=cpu",
]


def llama_parameters(config: dict) -> int:
    """Parameters of a Llama from its config, by the architecture's formula: no torch involved."""
    hidden, inter, layers, vocab = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    attention = hidden * hidden * 2 + hidden * kv * 2  # q and o; k and v (grouped-query)
    mlp = 3 * hidden * inter  # gate, up, down
    per_layer = attention + mlp + 2 * hidden  # and two RMSNorm weights
    head = 0 if config.get("tie_word_embeddings") else vocab * hidden
    return vocab * hidden + layers * per_layer + hidden + head


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    folder = tmp_path_factory.mktemp("small-llama")
    (folder / "config.json").write_text(json.dumps(SMALL_LLAMA))
    config = apply_overrides(load_preset("cpu"), LLM_DATA + [f"model.pretrained={folder}", f"data.cache_dir={cache_dir}"])
    return config, trace_inputs(config)


def _sets(overrides: list[str]) -> list[str]:
    return sum((["--set", override] for override in overrides), [])


def test_the_8b_config_is_llama_3_8b_and_builds_without_allocating():
    config = json.loads((LLAMA_8B / "config.json").read_text())
    model_config = apply_overrides(load_preset("cpu"), [f"model.pretrained={LLAMA_8B}"]).model
    with fake_mode():
        model = build_shape_model(model_config, 4000, 0, 222)
        count = sum(p.numel() for p in model.parameters())
        fake = all(type(p).__name__ == "FakeTensor" or type(p.data).__name__ == "FakeTensor" for p in model.parameters())
    assert type(model).__name__ == "LlamaForCausalLM"
    assert count == llama_parameters(config) == 8_030_261_248  # Llama-3-8B's published count
    assert fake  # no storage: 32 GB of fp32 weights were never allocated
    # What qlora would quantise: every Linear of the 32 layers (the LM head stays), at about
    # half a byte per parameter with NF4's constants (double-quantised).
    quantised = [numel for numel, _ in quantised_sizes(model)]
    assert sum(quantised) == count - 2 * 128256 * 4096 - (2 * 32 + 1) * 4096
    assert 0.515 < sum(nf4_bytes(numel, True) for numel in quantised) / sum(quantised) < 0.517


def test_the_weights_of_the_8b_shape_are_4_bytes_a_parameter_from_the_first_operator(cache_dir: Path):
    """The trace stops at its first operator (the weights alone pass the limit), and what was
    live then is the fp32 weights: parameter count x 4 bytes, the independent account."""
    config = apply_overrides(load_preset("cpu"), LLM_DATA + [f"model.pretrained={LLAMA_8B}", f"data.cache_dir={cache_dir}"])
    traced = trace_cell(parse_cell("baseline"), config, trace_inputs(config), trace_target(), Limit(2**30))
    assert traced.stopped
    expected = 4 * llama_parameters(json.loads((LLAMA_8B / "config.json").read_text()))
    assert traced.device.by_category["parameters"] == expected


def test_the_8b_weights_agree_with_accelerates_account():
    """``accelerate estimate-memory``'s own count (its CLI needs the hub, so its functions are
    called on the folder's config): the same weights in fp32, and 16 bytes a parameter for
    training with Adam. (Its CLI builds AutoModel, the Llama without its LM head: 2.1 GB less.)"""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(LLAMA_8B), dtype=torch.float32)
    total, _ = calculate_maximum_sizes(model)
    parameters = llama_parameters(json.loads((LLAMA_8B / "config.json").read_text()))
    # accelerate counts buffers too: rotary embedding's inverse frequencies, 512 bytes.
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert buffers == 512 and total == 4 * parameters + buffers
    assert estimate_training_usage(total, "float32")["step"] == 4 * total


def test_nf4_bytes_match_what_bitsandbytes_allocates():
    from bitsandbytes.functional import quantize_4bit

    def nbytes(tensor):
        return tensor.numel() * tensor.element_size()

    for shape in [(256, 128), (100, 70), (1, 64 * 256 * 3 + 5)]:
        for double in (False, True):
            packed, state = quantize_4bit(torch.randn(*shape), blocksize=64, quant_type="nf4", compress_statistics=double)
            allocated = nbytes(packed) + nbytes(state.absmax) + nbytes(state.code)
            if state.nested:
                allocated += nbytes(state.state2.absmax) + nbytes(state.state2.code) + nbytes(state.offset)
            assert nf4_bytes(math.prod(shape), double) == allocated, (shape, double)
    # About half a byte per weight, plus its constants.
    assert 0.5 < nf4_bytes(4096 * 4096, True) / (4096 * 4096) < 0.52
    assert 0.56 < nf4_bytes(4096 * 4096, False) / (4096 * 4096) < 0.57


def test_a_trace_stops_once_past_its_limit_and_is_unchanged_below_it(small_llama):
    config, inputs = small_llama
    full = trace_cell(parse_cell("baseline"), config, inputs, trace_target())
    roomy = trace_cell(parse_cell("baseline"), config, inputs, trace_target(), Limit(full.device.total_bytes))
    assert not roomy.stopped and roomy.device == full.device
    stopped = trace_cell(parse_cell("baseline"), config, inputs, trace_target(), Limit(full.device.total_bytes // 2))
    assert stopped.stopped and full.device.total_bytes // 2 < stopped.device.total_bytes <= full.device.total_bytes


def test_estimate_takes_a_config_only_causal_lm(small_llama, cache_dir: Path):
    config, _ = small_llama
    args = ["estimate", "--strategies", "1,fsdp-offload", "--preset", "cpu", "--jobs", "1", "--format", "json",
            "--model", config.model.pretrained, *_sets(LLM_DATA + [f"data.cache_dir={cache_dir}"])]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # the JSON alone: the preset line and progress went to stderr
    rows = {row["cell"]: row for row in data["rows"]}
    assert set(rows) == {"baseline", "1", "fsdp-offload"}
    parameters = llama_parameters(SMALL_LLAMA)
    assert rows["baseline"]["source"] == "traced" and rows["baseline"]["parameters_mib"] * 2**20 == 4 * parameters
    # fsdp-offload cannot be traced: its figure says it is modelled, and how.
    assert rows["fsdp-offload"]["source"] == "modelled" and rows["fsdp-offload"]["modelled"].startswith("modelled, not traced")
    assert "traced on 'baseline'" in rows["fsdp-offload"]["modelled"]
    assert data["objective"] == "clm"


def test_a_modelled_figure_is_labelled_in_the_table_and_the_markdown():
    from gputech_bench.cli.tables import estimate_table
    from gputech_bench.estimator.predict import Prediction
    from gputech_bench.estimator.render import EstimateReport, markdown
    from gputech_bench.measure.tracker import TrackedPeak

    traced = Prediction(Setup("baseline"), TrackedPeak("meta", 2**20, {"parameters": 2**20}), None, 1.0, {})
    modelled = Prediction(Setup("fsdp-offload"), TrackedPeak("meta", 2**19, {"parameters": 2**19}), None, 1.0, {},
                          modelled="modelled, not traced: how")
    report = EstimateReport("test", None, [traced, modelled], NO_OVERHEAD, 2**30)
    text = markdown(report)
    assert "| baseline | traced |" in text and "| fsdp-offload | modelled [1] |" in text
    assert "- [1] modelled, not traced: how" in text
    table = estimate_table(report)
    assert [column.header for column in table.columns][:2] == ["setup", "figure"]
    assert list(table.columns[1].cells) == ["traced", "modelled [1]"]
    # Without a modelled figure the table is as it was: no figure column.
    assert "figure" not in markdown(EstimateReport("test", None, [traced], NO_OVERHEAD, 2**30))


def _sixteen_bytes_account(peak, trainable: int, largest: int) -> None:
    """weights + gradients + Adam's two moments = 4 + 4 + 8 bytes per trainable fp32 parameter.
    AdamW's step also holds a temporary or two of one parameter's size while it updates it
    (MemTracker files them as optimizer state): at most twice the largest parameter."""
    by_category = peak.by_category
    assert by_category["parameters"] == 4 * trainable
    assert by_category["gradients"] == 4 * trainable
    # (and a few bytes of scalars: a step counter per parameter tensor)
    assert 8 * trainable <= by_category["optimizer_state"] <= 8 * trainable + 2 * 4 * largest + 2**16


def test_fit_on_a_small_llama_finds_full_training_and_its_bytes_are_16_per_parameter(small_llama):
    config, inputs = small_llama
    parameters = llama_parameters(SMALL_LLAMA)
    largest = SMALL_LLAMA["vocab_size"] * SMALL_LLAMA["hidden_size"]
    baseline = trace_cell(parse_cell("baseline"), config, inputs, trace_target())
    _sixteen_bytes_account(baseline.device, parameters, largest)

    # A budget the baseline's 16 bytes per parameter cannot meet: full training must move its
    # state to the host, which fit must find. Left out so that the account is the plain one:
    # 3, adam4bit and paged-adam8bit (8-bit or 4-bit moments) and 4 (its host gradients are copies
    # made outside backward, which MemTracker files as activations); bf16-weights too, whose 8 bytes
    # a parameter on the device answer the budget another way (tests/test_bf16_weights.py).
    budget = 10 * parameters
    assert baseline.device.total_bytes > budget
    trace = lambda setups, cfg, limit=None: predict(setups, cfg, jobs=1, limit=limit)  # noqa: E731
    result = FitSearch(config, budget, NO_OVERHEAD, trace, wanted=1,
                       exclude={"3", "4", "adam4bit", "paged-adam8bit", "bf16-weights"}).run()
    assert result.chosen, "fit found nothing under the budget"
    full = result.full_training or next(c for c in result.chosen if trains_every_weight(c.setup))
    assert full.fits and full.device_total <= budget
    assert full.prediction.host is not None, "a full fine-tune under this budget keeps its state on the host"
    _sixteen_bytes_account(full.prediction.host, parameters, largest)


def test_fit_weighs_adam4bit_and_keeps_a_full_fine_tune_on_the_device_under_13_bytes_a_parameter(small_llama):
    config, inputs = small_llama
    parameters = llama_parameters(SMALL_LLAMA)
    # fp32 weights and gradients take 8 bytes a parameter, AdamW's moments 8 more, and its step
    # about 3 (two fp32 temporaries of the embedding, most of this small model): only a smaller
    # state fits on the device (adam4bit's peak: about 12 bytes a parameter).
    budget = 13 * parameters
    assert trace_cell(parse_cell("1"), config, inputs, trace_target()).device.total_bytes > budget
    trace = lambda setups, cfg, limit=None: predict(setups, cfg, jobs=1, limit=limit)  # noqa: E731
    result = FitSearch(config, budget, NO_OVERHEAD, trace, wanted=1, exclude={"3", "4", "fsdp-offload"}).run()
    full = result.full_training or next(c for c in result.chosen if trains_every_weight(c.setup))
    assert "adam4bit" in full.setup.cell.split("+") and full.fits and full.prediction.host is None
    assert full.prediction.source == "modelled"
    # About half a byte a moment value: the two moments of every large tensor in little over 1
    # byte, plus what AdamW's step allocates (two fp32 temporaries of the largest tensor at most).
    largest = SMALL_LLAMA["vocab_size"] * SMALL_LLAMA["hidden_size"]
    state = full.prediction.device.by_category["optimizer_state"]
    print(f"adam4bit optimizer state: {state / parameters:.2f} bytes a parameter")
    assert state < 1.2 * parameters + 2 * 4 * largest


def test_fsdp_offload_is_modelled_with_the_16_byte_state_on_the_host(small_llama):
    config, _ = small_llama
    prediction = predict([Setup("1+fsdp-offload")], config)[0]
    assert prediction.source == "modelled" and prediction.error is None
    parameters = llama_parameters(SMALL_LLAMA)
    _sixteen_bytes_account(prediction.host, parameters, SMALL_LLAMA["vocab_size"] * SMALL_LLAMA["hidden_size"])
    # On the device: the root unit (embeddings, head, final norm) with its gradients, two layers
    # in flight as copy and gathered weights, one layer's gradients twice.
    hidden, vocab = SMALL_LLAMA["hidden_size"], SMALL_LLAMA["vocab_size"]
    root = 4 * (2 * vocab * hidden + hidden)
    layer = 4 * (parameters - 2 * vocab * hidden - hidden) // SMALL_LLAMA["num_hidden_layers"]
    assert prediction.device.by_category["parameters"] == root + 4 * layer
    assert prediction.device.by_category["gradients"] == root + 2 * layer
    assert prediction.device.by_category.get("optimizer_state", 0) == 0


def test_qlora_is_a_fit_candidate_and_modelled_as_nf4_on_the_lora_trace(small_llama):
    config, inputs = small_llama
    assert any(setup.cell == "qlora" for setup in candidates(config))
    qlora, lora = predict([Setup("1+qlora"), Setup("1+lora")], config)
    assert qlora.error is None and qlora.source == "modelled" and "NF4" in qlora.modelled
    with fake_mode():
        model = build_shape_model(config.model, inputs.tokenizer_size, inputs.pad_token_id, config.train.seed)
        quantised = [numel for numel, _ in quantised_sizes(model)]
        assert type(model.lm_head).__name__ == "Linear"
    hidden, inter, layers = (SMALL_LLAMA[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    kv = SMALL_LLAMA["num_key_value_heads"] * hidden // SMALL_LLAMA["num_attention_heads"]
    # Every Linear of every layer is quantised; the LM head is not (transformers keeps it).
    assert sum(quantised) == layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
    packed = qlora.device.by_category["quantized_weights"]
    assert packed == sum(nf4_bytes(numel, True) for numel in quantised)
    # Half a byte per quantised parameter, plus constants: at this size each weight's ~1 KB of
    # code books weighs in (at 8B the whole is 0.516 byte a parameter, see below).
    assert 0.5 * sum(quantised) < packed < 0.6 * sum(quantised)
    # The rest of the base (embeddings, head, norms) and the adapters stay fp32, as LoRA's trace has them.
    assert qlora.device.by_category["parameters"] == lora.device.by_category["parameters"] - 4 * sum(quantised)
    assert qlora.device.by_category["gradients"] == lora.device.by_category["gradients"]
    assert qlora.device.by_category["optimizer_state"] == lora.device.by_category["optimizer_state"]


@pytest.mark.slow
def test_fit_on_the_8b_shape_under_24_gib_finds_a_full_fine_tune_whose_state_is_counted_where_it_lives(
        cache_dir: Path, tmp_path: Path):
    """The README's question, answered from configs/models/llama-8b/config.json alone (a few
    minutes on 2 cores: each 8B step traced on fake tensors takes about a minute)."""
    out = tmp_path / "fit.json"
    args = ["fit", "--budget", "24GiB", "--model", str(LLAMA_8B), "--preset", "cpu", "--jobs", "2", "--top", "1",
            "--format", "json", "--output", str(out),
            *_sets(["data.objective=clm", "model.attention=sdpa", "train.batch_size=8", "data.max_length=512",
                    f"data.cache_dir={cache_dir}"])]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["chosen"] and data["chosen"][0]["fits"]
    full = data["full_training"] or next(c for c in data["chosen"] if c["trains_every_weight"])
    assert full["fits"] and full["trains_every_weight"] and full["device_total_bytes"] <= 24 * 2**30
    parameters = llama_parameters(json.loads((LLAMA_8B / "config.json").read_text()))
    device = full["prediction"]["device"]["by_category"]
    host = (full["prediction"]["host"] or {"by_category": {}})["by_category"]
    # Adam's two moments of every weight are somewhere, never free: at least 4-bit ones (a byte a
    # parameter for the two), on the device or, paged or offloaded, on the host.
    assert device.get("optimizer_state", 0) + host.get("optimizer_state", 0) >= parameters
    strategies = full["setup"].split("+")
    if "paged-adam8bit" in strategies:  # 8-bit moments, 2 bytes a parameter, counted on the host side
        assert host["optimizer_state"] >= 2 * parameters
    if "fsdp-offload" in strategies:  # the whole fp32 state on the host: 16 bytes a parameter

        class Peak:
            by_category = host

        _sixteen_bytes_account(Peak, parameters, 128256 * 4096)
