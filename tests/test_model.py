"""The model every cell starts from: the seed's architecture, or a local pretrained folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from gputech_bench.config import BenchConfig, apply_overrides, load_preset
from gputech_bench.data import embedded_corpus, train_wordpiece
from gputech_bench.errors import ModelError
from gputech_bench.modeling import build_model
from gputech_bench.worker.cell import new_result, run_cell


def test_seed_preset_builds_bert_base_with_the_seeds_149798_rows():
    model = build_model(load_preset("seed").model, tokenizer_size=10_664, pad_token_id=0, seed=222)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size) == (12, 768, 12, 3072)
    assert model.get_input_embeddings().num_embeddings == 149_798
    assert model.cls.predictions.decoder.weight.shape[0] == 149_798
    # BERT-base body (~86M) + 149,798 x 768 tied embeddings (~115M) = ~201M parameters.
    assert 195e6 < sum(p.numel() for p in model.parameters()) < 205e6


def test_vocab_rows_below_the_tokenizer_are_refused():
    config = apply_overrides(BenchConfig(), ["model.vocab_rows=100"])
    with pytest.raises(ModelError, match="smaller than the tokenizer"):
        build_model(config.model, tokenizer_size=400, pad_token_id=0, seed=0)


@pytest.fixture()
def local_pretrained(tmp_path: Path, tiny_config: BenchConfig, cache_dir: Path) -> Path:
    """A BertForMaskedLM and its tokenizer saved the way the hub lays them out, offline."""
    corpus = embedded_corpus(96, 16, 222, cache_dir)
    tokenizer = train_wordpiece(corpus.train, 400, cache_dir, corpus.fingerprint)
    model = build_model(tiny_config.model, len(tokenizer), tokenizer.pad_token_id, seed=5)
    folder = tmp_path / "my-bert"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_local_pretrained_folder_is_loaded_with_its_tokenizer(local_pretrained: Path, tiny_config: BenchConfig):
    config = apply_overrides(tiny_config, [f"model.pretrained={local_pretrained}", "train.max_steps=3"])
    result = run_cell("1", config, new_result("1", config))
    assert result.status == "ok"
    assert result.model["source"] == str(local_pretrained)
    assert result.data["tokenizer"].startswith("pretrained")
    assert result.model["vocab_rows"] == result.data["tokenizer_size"]


def test_a_missing_pretrained_folder_is_a_one_line_error(tmp_path: Path, tiny_config: BenchConfig, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = apply_overrides(tiny_config, [f"model.pretrained={tmp_path / 'nowhere'}"])
    from gputech_bench.errors import DataError

    with pytest.raises((DataError, ModelError)) as error:
        run_cell("baseline", config, new_result("baseline", config))
    assert "\n" not in str(error.value) and "nowhere" in str(error.value)
