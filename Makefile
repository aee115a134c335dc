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

test: lint
	$(BIN)/python -m pytest

run: install
	$(BIN)/gputech-bench run --matrix

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
