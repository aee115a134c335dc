"""Shared fixtures: one cache per session, and a tiny end-to-end config.

Nothing here downloads anything; every cache lives under pytest's tmp dirs. Helpers that
tests import live in helpers.py, not here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import TINY_RUN

from gputech_bench.config import BenchConfig, apply_overrides, load_preset


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache per test session: the stdlib corpus is parsed once, never in the user's home."""
    path = tmp_path_factory.mktemp("gputech-cache")
    os.environ["GPUTECH_BENCH_CACHE"] = str(path)
    return path


@pytest.fixture()
def tiny_config(cache_dir: Path) -> BenchConfig:
    return apply_overrides(load_preset("cpu"), TINY_RUN + [f"data.cache_dir={cache_dir}"])
