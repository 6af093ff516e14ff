# Two commands on a fresh machine: `make run` (the whole stack, serving the demo checkpoint) and `make test`.
# TORCH_SPEC picks the PyTorch build: the CPU wheel by default; e.g. `make TORCH_SPEC="torch==2.13.0
# --index-url https://download.pytorch.org/whl/cu128"` for CUDA. It is installed before the project so
# pip never pulls a CUDA build on its own.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make run` variables, given on the command line (`make run PORT=8001`); the environment's PORT etc. are not
# read (a shell may export PORT for something else): use DDPM_PORT and the other DDPM_* variables there.
#   PORT, HOST: the API's address   WORKER_METRICS_PORT: the worker's /metrics (default: first free from 9100)
#   DEVICE: auto|cpu|cuda   CHECKPOINT: NAME=FILE to serve   REDIS_URL: an existing Redis instead of a private one
#   REDIS_DATA_DIR: the private Redis's files (default: one directory per checkout and port)   STOP_GRACE: seconds
arg = $(if $(filter command line,$(origin $(1))),$(2) '$($(1))')
UP_FLAGS = $(call arg,PORT,--port) $(call arg,HOST,--host) $(call arg,WORKER_METRICS_PORT,--worker-metrics-port) \
	$(call arg,DEVICE,--device) $(call arg,CHECKPOINT,--checkpoint) $(call arg,REDIS_URL,--redis-url) \
	$(call arg,REDIS_DATA_DIR,--data-dir) $(call arg,STOP_GRACE,--stop-grace)

.PHONY: install run test lint typecheck pytest fuzz chaos figures clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ddpm up $(strip $(UP_FLAGS))

lint: $(STAMP)
	$(BIN)/ruff check model service tests benchmarks docker docs/figures

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

fuzz: $(STAMP)
	$(BIN)/python -m pytest -q tests/service/test_fuzz.py --fuzz-examples=2000

chaos: $(STAMP)
	$(BIN)/python -m pytest -q tests/chaos --chaos-scale=full

# The paper's figures made by the demo model, into docs/figures/ (docs/figures/README.md; ~5 min on 2 CPU cores).
figures: $(STAMP)
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/python -m pip install -q -e '.[figures]'
	OMP_NUM_THREADS=1 $(BIN)/python docs/figures/make_figures.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
