"""Presets, overrides and their one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gputech_bench.config import (
    SHAPE_FIELDS,
    BenchConfig,
    apply_overrides,
    default_preset_name,
    from_dict,
    load_preset,
    preset_names,
    read_preset,
    to_dict,
)
from gputech_bench.errors import ConfigError


def test_seed_preset_is_the_seed_setup_and_equals_the_defaults():
    seed = load_preset("seed")
    # Equal in every value; the preset also records the BERT shape it states (for its own BERT).
    assert dataclasses.replace(seed, model=dataclasses.replace(seed.model, overrides=())) == BenchConfig(preset="seed")
    assert set(seed.model.overrides) == set(read_preset("seed")["model"]) & set(SHAPE_FIELDS)
    assert (seed.model.vocab_rows, seed.model.num_layers, seed.model.hidden_size) == (149_798, 12, 768)
    assert (seed.data.max_length, seed.train.batch_size, seed.train.epochs) == (128, 32, 3)
    assert (seed.train.lr, seed.train.adam_eps, seed.train.warmup_ratio, seed.train.max_grad_norm) == (3e-5, 1e-8, 0.1, 1.0)
    assert (seed.data.mask_probability, seed.train.seed) == (0.15, 222)
    assert (seed.data.train_sentences, seed.data.eval_sentences) == (10_000, 110)
    assert (seed.strategy.micro_batch_size, seed.strategy.adam8bit_betas) == (8, (0.9, 0.995))


def test_cpu_preset_shrinks_the_model_and_keeps_the_recipe():
    cpu = load_preset("cpu")
    assert cpu.model.num_layers == 2
    assert cpu.train.batch_size == 32 and cpu.strategy.micro_batch_size == 8
    assert cpu.train.seed == 222 and cpu.data.mask_probability == 0.15


def test_default_preset_follows_cuda():
    assert default_preset_name(True) == "seed"
    assert default_preset_name(False) == "cpu"
    assert {"seed", "cpu"} <= set(preset_names())


def test_overrides_are_typed():
    config = apply_overrides(
        BenchConfig(),
        ["train.epochs=1", "train.max_steps=40", "train.lr=1e-4", "train.track_memory=false",
         "strategy.lora_targets=query,key,value", "strategy.adam8bit_betas=0.9,0.99", "device=cpu"],
    )
    assert config.train.epochs == 1 and config.train.max_steps == 40 and config.train.lr == 1e-4
    assert config.train.track_memory is False
    assert config.strategy.lora_targets == ("query", "key", "value")
    assert config.strategy.adam8bit_betas == (0.9, 0.99)
    assert config.device == "cpu"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epoch=1", "unknown config key 'train.epoch': did you mean 'train.epochs'?"),
        ("trian.epochs=1", "unknown config key 'trian.epochs'"),
        ("train.epochs=three", "train.epochs expects an integer, got 'three'"),
        ("train.lr=fast", "train.lr expects a number, got 'fast'"),
        ("train.track_memory=maybe", "train.track_memory expects true or false"),
        ("train.epochs", "--set expects key=value"),
        ("train.epochs=0", "train.epochs must be more than 0"),
        ("device=tpu", "device must be one of auto, cuda, cpu"),
        ("strategy.adam8bit_betas=0.9", "expects 2 comma-separated values"),
        ("model.num_heads=5", "must be divisible by model.num_heads"),
    ],
    ids=["typo-key", "typo-section", "not-an-integer", "not-a-number", "not-a-flag", "no-value", "zero", "unknown-device",
         "one-beta", "heads-do-not-divide"],
)
def test_bad_overrides_are_one_line_errors(override, expected):
    with pytest.raises(ConfigError) as error:
        apply_overrides(BenchConfig(), [override])
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'huge': choose one of .*cpu.*seed"):
        load_preset("huge")


def test_config_round_trips_through_json():
    config = apply_overrides(load_preset("cpu"), ["train.max_steps=7", "strategy.lora_targets=query"])
    assert from_dict(json.loads(json.dumps(to_dict(config)))) == config


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        BenchConfig().train.epochs = 5  # type: ignore[misc]


def test_presets_are_found_from_any_working_directory(tmp_path: Path):
    code = "from gputech_bench.config import load_preset; print(load_preset('cpu').model.num_layers)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "2"
