"""No model.* setting is dropped: with --model each shape field set for that model overrides
the checkpoint's config (under the architecture's own attribute name), resizes a
checkpoint's embeddings (vocab_rows), or is refused in one line. Tiny configs, no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, invoke, make_result
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, MambaConfig

from gputech_bench.config import (
    SHAPE_FIELDS,
    BenchConfig,
    ModelConfig,
    apply_mapping,
    apply_overrides,
    from_dict,
    load_preset,
    to_dict,
)
from gputech_bench.errors import ConfigError, ModelError
from gputech_bench.modeling import SHAPE_ATTRIBUTES, check_model_overrides, load_model
from gputech_bench.report.frame import build_frame
from gputech_bench.report.table import table_notes

VOCAB = 300
HIDDEN, LAYERS, FFN, POSITIONS = 32, 2, 64, 64


#: A Llama's config.json as the hub's small ones are written (configs/models/tiny-llama too):
#: head_dim is not stated, so Llama derives it from the width and the heads.
LLAMA_JSON = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": 2, "num_key_value_heads": 1,
              "vocab_size": VOCAB, "max_position_embeddings": POSITIONS}


def config_only(tmp_path: Path, name: str, **stated) -> Path:
    """A folder with only config.json: a random init of that shape."""
    folder = tmp_path / name
    folder.mkdir()
    if name == "llama":
        (folder / "config.json").write_text(json.dumps({**LLAMA_JSON, **stated}), encoding="utf-8")
        return folder
    configs = {
        "distilbert": DistilBertConfig(dim=HIDDEN, hidden_dim=FFN, n_layers=LAYERS, n_heads=2, vocab_size=VOCAB,
                                       max_position_embeddings=POSITIONS),
        "mamba": MambaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, vocab_size=VOCAB),
    }
    configs[name].to_json_file(folder / "config.json")
    return folder


def with_model(folder: Path, *sets: str) -> ModelConfig:
    """The model config that ``--preset cpu --model FOLDER --set ...`` resolves to."""
    return apply_overrides(load_preset("cpu"), [f"model.pretrained={folder}", *sets]).model


def parameters(model_config: ModelConfig) -> int:
    return load_model(model_config, VOCAB, 0, seed=1).report.parameters


def layer_parameters(folder: Path) -> int:
    model = load_model(with_model(folder), VOCAB, 0, seed=1).model
    layers = model.model.layers if hasattr(model, "model") else model.distilbert.transformer.layer
    return sum(p.numel() for p in layers[0].parameters())


def test_every_shape_field_has_its_attributes():
    """The config layer's shape fields and the loader's map are one list: a field added to one
    alone would be recorded and then never applied (or applied and never recorded)."""
    assert tuple(SHAPE_ATTRIBUTES) == SHAPE_FIELDS


# Each field on a config-only Llama (untied head, rotary positions, gate/up/down MLP, one KV
# head) and DistilBERT (tied head, learned positions, two-matrix FFN): the parameter count
# moves by what the architecture's own formula gives, and the attribute holds the value.
FIELDS = [
    # (architecture, setting, the architecture's attribute, its new value, change in parameters)
    ("llama", "num_layers=1", "num_hidden_layers", 1, "minus one layer"),
    ("distilbert", "num_layers=1", "n_layers", 1, "minus one layer"),
    ("llama", "intermediate_size=128", "intermediate_size", 128, 3 * HIDDEN * 64 * LAYERS),  # gate, up, down
    ("distilbert", "intermediate_size=128", "hidden_dim", 128, (2 * HIDDEN * 64 + 64) * LAYERS),  # lin1 (+bias), lin2
    ("llama", "vocab_rows=400", "vocab_size", 400, 2 * 100 * HIDDEN),  # embeddings and an untied head
    ("distilbert", "vocab_rows=400", "vocab_size", 400, 100 * HIDDEN + 100),  # tied head, its bias
    ("llama", "max_position_embeddings=128", "max_position_embeddings", 128, 0),  # rotary: no weights
    ("distilbert", "max_position_embeddings=128", "max_position_embeddings", 128, 64 * HIDDEN),
    # Llama's K/V projections are one head wide: 4 heads of 8 narrow them from 16 to 8 outputs.
    ("llama", "num_heads=4", "num_attention_heads", 4, -2 * (16 - 8) * HIDDEN * LAYERS),
    ("distilbert", "num_heads=4", "n_heads", 4, 0),  # heads split the same width
    ("llama", "dropout=0.25", "attention_dropout", 0.25, 0),
    ("distilbert", "dropout=0.25", "attention_dropout", 0.25, 0),
]


@pytest.mark.parametrize("name, setting, attribute, value, change", FIELDS, ids=[f"{f[0]}-{f[1]}" for f in FIELDS])
def test_each_shape_field_overrides_the_config_json(tmp_path: Path, name, setting, attribute, value, change):
    folder = config_only(tmp_path, name)
    before = parameters(with_model(folder))
    model_config = with_model(folder, f"model.{setting}")
    loaded = load_model(model_config, VOCAB, 0, seed=1)
    assert getattr(loaded.model.config, attribute) == value
    expected = -layer_parameters(folder) if change == "minus one layer" else change
    assert loaded.report.parameters - before == expected
    assert loaded.report.parameters == sum(p.numel() for p in loaded.model.parameters())
    note = next(line for line in loaded.report.notes() if "overridden" in line)
    assert f"model.{setting.split('=')[0]}=" in note and attribute in note


def test_hidden_size_derives_what_the_config_derives_from_it(tmp_path: Path):
    """As if config.json had said it: Llama's head_dim follows the new width."""
    loaded = load_model(with_model(config_only(tmp_path, "llama"), "model.hidden_size=64"), VOCAB, 0, seed=1)
    assert loaded.model.config.hidden_size == 64 and loaded.model.config.head_dim == 32
    assert loaded.model.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)


def test_a_head_dim_that_config_json_states_is_kept(tmp_path: Path):
    """What the file states stays stated: only what the config derives follows an override."""
    loaded = load_model(with_model(config_only(tmp_path, "llama", head_dim=16), "model.hidden_size=64"), VOCAB, 0, seed=1)
    assert loaded.model.config.head_dim == 16
    assert loaded.model.model.layers[0].self_attn.q_proj.weight.shape == (2 * 16, 64)


def test_distilbert_dropout_sets_both_of_its_dropouts(tmp_path: Path):
    config = load_model(with_model(config_only(tmp_path, "distilbert"), "model.dropout=0.25"), VOCAB, 0, seed=1).model.config
    assert (config.dropout, config.attention_dropout) == (0.25, 0.25)


def saved_bert(tmp_path: Path) -> tuple[Path, BertForMaskedLM]:
    original = BertForMaskedLM(BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                                          intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=POSITIONS))
    folder = tmp_path / "bert-with-weights"
    original.save_pretrained(folder)
    return folder, original


def test_vocab_rows_resizes_a_checkpoints_embeddings_as_the_seed_did(tmp_path: Path):
    folder, original = saved_bert(tmp_path)
    loaded = load_model(with_model(folder, "model.vocab_rows=350"), VOCAB, 0, seed=1)
    embeddings = loaded.model.get_input_embeddings().weight
    assert embeddings.shape == (350, HIDDEN) and loaded.model.config.vocab_size == 350
    # The checkpoint's rows are its own; only the new ones were initialised.
    assert torch.equal(embeddings[:VOCAB], original.get_input_embeddings().weight)
    assert loaded.report.resized_rows == (VOCAB, 350)
    # The count in the table is the resized model's: 50 rows, tied to the head, plus its bias.
    assert loaded.report.parameters == sum(p.numel() for p in original.parameters()) + 50 * HIDDEN + 50
    assert "embedding rows 300 \N{RIGHTWARDS ARROW} 350: 50 new rows, initialised by transformers" in loaded.report.notes()


def test_dropout_applies_to_a_checkpoint_whose_weights_still_load(tmp_path: Path):
    folder, original = saved_bert(tmp_path)
    loaded = load_model(with_model(folder, "model.dropout=0.3"), VOCAB, 0, seed=1)
    assert loaded.model.config.hidden_dropout_prob == 0.3 and loaded.model.config.attention_probs_dropout_prob == 0.3
    assert not loaded.report.newly_initialized
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), original.state_dict().values()))


@pytest.mark.parametrize("setting", ["num_layers=1", "hidden_size=64", "intermediate_size=128", "max_position_embeddings=128"])
def test_a_shape_the_checkpoints_weights_cannot_take_is_refused(tmp_path: Path, setting: str):
    folder, _ = saved_bert(tmp_path)
    with pytest.raises(ModelError) as raised:
        check_model_overrides(with_model(folder, f"model.{setting}"))
    message = str(raised.value)
    assert f"model.{setting.split('=')[0]}=" in message and "changes the shape of the weights" in message
    assert "\n" not in message


def test_a_field_the_architecture_lacks_is_refused_naming_both(tmp_path: Path):
    folder = config_only(tmp_path, "mamba")
    with pytest.raises(ModelError, match=r"model\.num_heads has no meaning for a 'mamba' model"):
        check_model_overrides(with_model(folder, "model.num_heads=4"))


def test_a_shape_the_architecture_rejects_is_one_line(tmp_path: Path):
    with pytest.raises(ModelError, match="do not make a valid 'llama' config") as raised:
        load_model(with_model(config_only(tmp_path, "llama"), "model.num_heads=3"), VOCAB, 0, seed=1)
    assert "\n" not in str(raised.value)


def test_the_command_line_refuses_before_any_cell_runs(tmp_path: Path):
    folder, _ = saved_bert(tmp_path)
    result = invoke("run", "--preset", "cpu", "--strategies", "1", "--device", "cpu", "--model", str(folder),
                    "--set", "model.num_layers=1",
                    "--results", str(tmp_path / "results"))
    assert_one_line_error(result.exit_code, result.output, "model.num_layers=1", "changes the shape of the weights")
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json"))


# --------------------------------------------------------------------------- where a value came from


def test_a_presets_shape_for_its_own_bert_does_not_shrink_a_model_given_with_model(tmp_path: Path):
    preset = load_preset("cpu")
    assert preset.model.overrides == ("vocab_rows", "hidden_size", "num_layers", "num_heads", "intermediate_size")
    folder = config_only(tmp_path, "llama")
    assert with_model(folder).overrides == ()
    assert parameters(with_model(folder)) == parameters(ModelConfig(pretrained=str(folder)))
    # The seed preset states BERT-base's shape: for its BERT, not for a --model.
    assert apply_overrides(load_preset("seed"), [f"model.pretrained={folder}"]).model.overrides == ()


def test_a_setting_made_for_the_model_counts_wherever_it_was_made(tmp_path: Path):
    folder = str(config_only(tmp_path, "llama"))
    # --set after --model, or a preset file that names the model and its shape together.
    assert with_model(Path(folder), "model.num_layers=1").overrides == ("num_layers",)
    preset = apply_mapping(BenchConfig(), {"model": {"num_layers": 1, "pretrained": folder}})
    assert preset.model.overrides == ("num_layers",)
    # Naming another model drops what was set for the previous one, value and record.
    moved = apply_overrides(preset, ["model.pretrained="])
    assert moved.model.overrides == () and moved.model.num_layers == ModelConfig().num_layers


def test_the_record_survives_config_json_and_cannot_be_set(tmp_path: Path):
    config = apply_overrides(load_preset("cpu"), [f"model.pretrained={config_only(tmp_path, 'llama')}", "model.num_layers=1"])
    saved = to_dict(config)
    assert saved["model"]["overrides"] == ("num_layers",)
    assert from_dict(saved) == config
    # A config.json from before the record applied no override: it still applies none.
    older = {**saved, "model": {k: v for k, v in saved["model"].items() if k != "overrides"}}
    assert from_dict(older).model.overrides == ()
    with pytest.raises(ConfigError, match="recorded by gputech-bench, not set"):
        apply_overrides(config, ["model.overrides=hidden_size"])


def test_the_table_says_which_overrides_were_applied(tmp_path: Path):
    loaded = load_model(with_model(config_only(tmp_path, "llama"), "model.num_layers=1"), VOCAB, 0, seed=1)
    result = make_result("baseline", tracked_peak_mib=10.0, epoch_seconds=1.0, eval_token_accuracy=0.5)
    result.model = loaded.report.to_dict()
    frame, _ = build_frame([result])
    assert "model.num_layers=1 (config.json: num_hidden_layers 2)" in "\n".join(table_notes(frame))
    assert result.model["overrides"] == ["model.num_layers=1 (config.json: num_hidden_layers 2)"]


def test_the_estimate_names_the_overrides_it_traced(tmp_path: Path):
    from gputech_bench.config import model_overrides
    from gputech_bench.estimator.overheads import DEFAULTS
    from gputech_bench.estimator.render import EstimateReport, legend
    from gputech_bench.estimator.render import from_dict as report_from_dict

    config = apply_overrides(load_preset("cpu"), [f"model.pretrained={config_only(tmp_path, 'llama')}", "model.num_layers=1"])
    assert model_overrides(config.model) == ("model.num_layers=1",)
    assert model_overrides(load_preset("cpu").model) == ()  # the fields build the seed's BERT: nothing is overridden
    report = EstimateReport("a stand-in", None, [], DEFAULTS, model_overrides=model_overrides(config.model))
    assert "model: config.json overridden by model.num_layers=1" in legend(report)
    assert report_from_dict(report.to_dict()).model_overrides == ("model.num_layers=1",)
