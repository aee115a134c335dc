# Set-up, tests and the main job. Every target installs what it needs first,
# so `make run` and `make test` each work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The project leaves torch open; here we pin the CPU wheel that development and CI
# use. On a GPU machine: make install TORCH="torch --index-url <your CUDA index>".
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install lint test run clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# ruff and mypy take their settings from pyproject.toml (mypy checks gputech_bench/).
lint: install
	$(BIN)/ruff check gputech_bench tests
	$(BIN)/mypy

# Two pytest-xdist workers: the suite waits on other processes (workers, torchrun ranks, CLI
# runs) much of the time, so two keep 2 cores busy. worksteal: a worker that ran out of tests
# takes over the other's queue, so the long tests at the end do not run one after another.
TEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

run: install
	$(BIN)/gputech-bench run --matrix

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
