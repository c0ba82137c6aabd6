# The few commands a contributor needs. Everything installs into ./.venv.
#   make up     set up, then run Redis + gateway + one CPU worker (http://127.0.0.1:8000)
#   make test   set up, then run the whole test suite (CPU only, ~15 min on 2 cores)
#   make lint   ruff (lint + format check) and mypy on service/ and worker/
#
# torch is installed first and pinned, so that nothing pulls a CUDA build by accident. On a machine
# with the PyTorch CPU index reachable, `make TORCH_INDEX=https://download.pytorch.org/whl/cpu setup`
# fetches the small CPU wheel; for CUDA use the matching cu12x index.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: setup up test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

up: setup
	$(BIN)/univigu up

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
