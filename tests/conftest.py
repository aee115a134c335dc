"""Shared fixtures: one cache per session, Ctrl-C for the tests that send it, and a tiny
end-to-end config.

Nothing here downloads anything; every cache lives under pytest's tmp dirs. Helpers that
tests import live in helpers.py, not here.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

# One OpenMP thread per process, set before anything here imports torch and inherited by the
# workers and CLI processes the tests start. The tests' models are tiny, so intra-op threads
# buy nothing, and `make test` runs two pytest-xdist workers on 2 cores: with two OpenMP
# threads each, a sample of the suite took 55 s against 51 s for one worker; with one, 36 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from helpers import TINY_RUN  # noqa: E402

from gputech_bench.config import BenchConfig, apply_overrides, load_preset  # noqa: E402
from gputech_bench.data.corpus import CACHE_DIR_ENV_VAR  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache per test session: the stdlib corpus is parsed once, never in the user's home.

    Autouse: a test that prepares data without naming a cache (the default config) writes to
    $GPUTECH_BENCH_CACHE, so the variable must be set before the first test runs, whichever
    tests are selected and in whatever order, not only once some test asked for this fixture.
    Workers and CLI processes started by tests inherit it."""
    path = tmp_path_factory.mktemp("gputech-cache")
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv(CACHE_DIR_ENV_VAR, str(path))
        yield path


@pytest.fixture()
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in this process, as at a prompt, until the test ends.

    For a test that sends SIGINT to the test process: a shell starts a background command
    (`make test &`, a script's job) with SIGINT ignored, Python keeps an inherited "ignore",
    and the signal would then never arrive. The previous disposition is restored afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture()
def tiny_config(cache_dir: Path) -> BenchConfig:
    return apply_overrides(load_preset("cpu"), TINY_RUN + [f"data.cache_dir={cache_dir}"])
