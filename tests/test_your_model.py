"""The user's model, loaded as itself: its class, its parameters, its task, and what loading
initialised or ignored. Tiny models built from configs and saved locally; no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_result
from transformers import (
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
    T5Config,
)
from typer.testing import CliRunner

from gputech_bench.cli import app
from gputech_bench.config import BenchConfig, ModelConfig, apply_overrides, load_preset
from gputech_bench.data.objective import apply_objective
from gputech_bench.errors import ModelError
from gputech_bench.modeling import CLM, CONFIG_ONLY, MLM, WEIGHTS, load_model, model_task, source_kind
from gputech_bench.report.frame import build_frame
from gputech_bench.report.table import markdown, table_notes
from gputech_bench.strategies.defaults import logits_predictor
from gputech_bench.training.evaluate import EvalSet, evaluate

VOCAB = 300
TINY = dict(vocab_size=VOCAB, max_position_embeddings=64)


def distilbert() -> DistilBertForMaskedLM:
    return DistilBertForMaskedLM(DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **TINY))


def roberta() -> RobertaForMaskedLM:
    config = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           vocab_size=VOCAB, max_position_embeddings=70)
    return RobertaForMaskedLM(config)


def llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, **TINY))


ARCHITECTURES = {"distilbert": (distilbert, MLM), "roberta": (roberta, MLM), "llama": (llama, CLM)}


def saved(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_architecture_loads_as_its_own_class_with_its_own_parameters(tmp_path: Path, name: str):
    build, task = ARCHITECTURES[name]
    original = build()
    folder = saved(original, tmp_path / name)
    assert source_kind(str(folder)) == WEIGHTS
    assert model_task(ModelConfig(pretrained=str(folder))) == task
    loaded = load_model(ModelConfig(pretrained=str(folder)), VOCAB, 0, seed=1)
    assert type(loaded.model) is type(original)
    assert loaded.report.parameters == sum(p.numel() for p in original.parameters())
    assert loaded.report.architecture == type(original).__name__ and loaded.report.task == task
    assert not loaded.report.newly_initialized and not loaded.report.notes()
    # Loaded, not re-initialised: the weights are the checkpoint's.
    for (key, mine), theirs in zip(loaded.model.state_dict().items(), original.state_dict().values()):
        assert torch.equal(mine, theirs), key


def test_a_checkpoint_without_its_head_says_the_head_is_new(tmp_path: Path):
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **TINY)
    folder = saved(BertModel(config), tmp_path / "sentence-embedding-bert")  # no masked-LM head
    loaded = load_model(ModelConfig(pretrained=str(folder)), VOCAB, 0, seed=1)
    report = loaded.report
    assert report.task == MLM and report.architecture == "BertForMaskedLM"
    assert report.head_is_new and report.new_head_modules == ("cls",)
    assert all(key.startswith("cls.") for key in report.newly_initialized)
    note = next(line for line in report.notes() if line.startswith("newly initialized"))
    assert "cls.predictions.*" in note and "the checkpoint has no masked-LM head" in note

    # ... and every table says so under the figures.
    result = make_result("baseline", tracked_peak_mib=10.0, epoch_seconds=1.0, eval_masked_accuracy=0.1,
                         eval_token_accuracy=0.5)
    result.model = report.to_dict()
    frame, measure = build_frame([result])
    assert any("the checkpoint has no masked-LM head" in note for note in table_notes(frame))
    assert "the checkpoint has no masked-LM head" in markdown(frame, measure, [result])


def test_a_folder_with_only_config_json_is_a_random_init_of_that_architecture(tmp_path: Path):
    folder = tmp_path / "shape-only"
    folder.mkdir()
    llama().config.to_json_file(folder / "config.json")
    assert source_kind(str(folder)) == CONFIG_ONLY
    first = load_model(ModelConfig(pretrained=str(folder)), VOCAB, 0, seed=3)
    again = load_model(ModelConfig(pretrained=str(folder)), VOCAB, 0, seed=3)
    assert type(first.model) is LlamaForCausalLM and first.report.task == CLM
    assert "no weights were read" in first.report.notes()[0]
    # The same seed gives the same init in every cell.
    assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), again.model.parameters()))


def test_a_model_that_is_neither_task_is_one_line_naming_it(tmp_path: Path):
    folder = tmp_path / "t5"
    folder.mkdir()
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=VOCAB).to_json_file(folder / "config.json")
    with pytest.raises(ModelError) as raised:
        model_task(ModelConfig(pretrained=str(folder)))
    message = str(raised.value)
    assert "'t5' model" in message and "neither a masked-LM nor a causal LM" in message and "\n" not in message


def test_a_task_the_architecture_lacks_is_refused(tmp_path: Path):
    folder = saved(distilbert(), tmp_path / "distilbert")
    with pytest.raises(ModelError, match="no causal LM"):
        model_task(ModelConfig(pretrained=str(folder), task="clm"))


def test_the_causal_lm_loss_ignores_padding():
    torch.manual_seed(0)
    model = llama().eval()
    ids = torch.randint(5, VOCAB, (2, 12))
    attention = torch.ones_like(ids)
    attention[1, 7:] = 0
    padded = ids.clone()
    padded[1, 7:] = 0
    targets = apply_objective("clm", padded, None, torch.Generator(), attention)
    assert (targets.labels[1, 7:] == -100).all() and torch.equal(targets.labels[0], ids[0])
    with torch.no_grad():
        loss = model(input_ids=padded, attention_mask=attention, labels=targets.labels).loss
        # The same loss by hand, over the real positions only.
        logits = model(input_ids=padded, attention_mask=attention).logits
    real = [(row, position) for row in range(2) for position in range(11) if attention[row, position + 1]]
    by_hand = torch.stack([torch.nn.functional.cross_entropy(logits[r, p], padded[r, p + 1]) for r, p in real]).mean()
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5)
    # Whatever padding holds, the loss does not move.
    padded[1, 7:] = 42
    with torch.no_grad():
        again = model(input_ids=padded, attention_mask=attention, labels=apply_objective(
            "clm", padded, None, torch.Generator(), attention).labels).loss
    assert float(again) == pytest.approx(float(loss), rel=1e-5)


def test_next_token_evaluation_scores_the_shifted_real_positions():
    torch.manual_seed(0)
    model = llama()
    ids = torch.randint(5, VOCAB, (3, 10))
    attention = torch.ones_like(ids)
    attention[2, 6:] = 0
    targets = apply_objective("clm", ids, None, torch.Generator(), attention)
    eval_set = EvalSet(targets.input_ids, targets.labels, ids, attention, targets.masked, "clm")
    scores = evaluate(logits_predictor(model, causal=True), eval_set, torch.device("cpu"), batch_size=2)
    assert scores.scored_tokens == 9 + 9 + 5
    assert scores.perplexity == pytest.approx(torch.tensor(scores.loss).exp().item(), rel=1e-6)
    assert 0.0 <= scores.next_token_accuracy <= 1.0


def test_the_table_names_the_causal_lm_metrics():
    rows = []
    for cell, accuracy, perplexity in (("baseline", 0.20, 30.0), ("1", 0.21, 29.5)):
        result = make_result(cell, tracked_peak_mib=10.0, epoch_seconds=1.0, eval_next_token_accuracy=accuracy,
                             eval_perplexity=perplexity)
        result.model = {"task": "clm", "architecture": "LlamaForCausalLM", "parameters": 1234}
        rows.append(result)
    frame, measure = build_frame(rows)
    text = markdown(frame, measure, rows)
    assert "eval accuracy, next token (baseline: 20.0%)" in text and "eval perplexity (baseline: 30.00)" in text
    assert "| 21.0% (+1.0) | 29.50 |" in text
    assert any(note.startswith("model: LlamaForCausalLM, 1,234 parameters; the accuracy columns show next-token acc "
                               "and perplexity") for note in table_notes(frame))


def test_presets_name_their_models_and_the_causal_matrix_adds_qlora_when_registered():
    from gputech_bench.run.matrix import matrix_cells
    from gputech_bench.strategies import registered

    causal = load_preset("cpu-causal")
    assert Path(causal.model.pretrained).is_dir() and model_task(causal.model) == CLM
    assert model_task(load_preset("llama-1b").model) == CLM
    expected = ["baseline", "1", "2", "3", "4", "1+2+3", "1+2+4", "lora"]
    if any(cls.key == "qlora" for cls in registered()):
        expected.append("qlora")
    assert matrix_cells(causal) == expected
    assert matrix_cells(load_preset("cpu")) == expected[:8]  # the seed's table stays the seed's


def test_a_causal_model_under_a_masked_lm_preset_takes_its_objective_and_says_so(tmp_path: Path):
    import io

    from rich.console import Console

    from gputech_bench.api import Output
    from gputech_bench.api._setup import resolve_config

    folder = saved(llama(), tmp_path / "llama")
    said = io.StringIO()
    output = Output(Console(file=said), Console(file=io.StringIO()))
    config = resolve_config("cpu", [], str(folder), None, None, "cpu", output)
    assert config.data.objective == "clm"
    assert "data.objective=clm" in said.getvalue()  # and it says so
    from gputech_bench.errors import DataError

    with pytest.raises(DataError, match="data.objective=mlm does not train a causal LM"):
        resolve_config("cpu", ["data.objective=mlm"], str(folder), None, None, "cpu", output)


def test_a_missing_model_folder_is_one_line(tmp_path: Path):
    result = CliRunner().invoke(app, ["run", "--strategies", "1", "--preset", "cpu", "--device", "cpu",
                                      "--model", str(tmp_path / "nope"), "--results", str(tmp_path / "r")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "not found" in lines[0], result.output


def test_the_cpu_causal_preset_runs_a_cell(tmp_path: Path, cache_dir: Path):
    from gputech_bench.worker.cell import new_result, run_cell

    config = apply_overrides(load_preset("cpu-causal"), [
        "device=cpu", "train.max_steps=3", "data.train_sentences=96", "data.eval_sentences=16", f"data.cache_dir={cache_dir}"])
    result = run_cell("1", config, new_result("1", config))
    assert result.status == "ok", result.reason
    assert result.model["architecture"] == "LlamaForCausalLM" and result.model["task"] == "clm"
    assert 0.0 <= result.value("eval_next_token_accuracy") <= 1.0 and result.value("eval_perplexity") > 1
    assert result.value("eval_masked_accuracy") is None
    assert json.loads(json.dumps(result.to_dict()))["model"]["source_kind"] == CONFIG_ONLY


def test_the_default_config_still_builds_the_seeds_bert():
    assert model_task(BenchConfig().model) == MLM


def test_token_weighted_accumulation_matches_the_full_batch_of_a_causal_lm():
    from gputech_bench.strategies.accumulation import split_into_micro_batches

    torch.manual_seed(0)
    model = llama()
    ids = torch.randint(5, VOCAB, (4, 10))
    attention = torch.ones_like(ids)
    attention[1, 4:] = 0
    attention[3, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": attention,
             "labels": apply_objective("clm", ids, None, torch.Generator(), attention).labels}
    model(**batch).loss.backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for micro in split_into_micro_batches(batch, 2, 2, "token-weighted", next_token=True):
        (model(**micro.inputs).loss * micro.loss_weight).backward()
    for whole, accumulated in zip(full, (p.grad for p in model.parameters())):
        torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-6)
