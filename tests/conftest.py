"""Shared fixtures: a tiny BERT built from a config, and a tiny end-to-end config.

Nothing here downloads anything; every cache lives under pytest's tmp dirs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gputech_bench.config import BenchConfig, apply_overrides, load_preset

#: A model small enough to step in milliseconds on 2 cores.
TINY_MODEL = [
    "model.vocab_rows=0",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "model.max_position_embeddings=64",
]
#: A whole cell (data, train, eval) in a couple of seconds.
TINY_RUN = TINY_MODEL + [
    "data.train_sentences=96",
    "data.eval_sentences=16",
    "data.max_length=32",
    "data.tokenizer_vocab_size=400",
    "train.batch_size=16",
    "train.epochs=1",
    "strategy.micro_batch_size=4",
    "device=cpu",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache per test session: the stdlib corpus is parsed once, never in the user's home."""
    path = tmp_path_factory.mktemp("gputech-cache")
    os.environ["GPUTECH_BENCH_CACHE"] = str(path)
    return path


@pytest.fixture()
def tiny_config(cache_dir: Path) -> BenchConfig:
    return apply_overrides(load_preset("cpu"), TINY_RUN + [f"data.cache_dir={cache_dir}"])
