# Two commands on a fresh machine: `make run` (the whole stack, serving the demo checkpoint) and `make test`.
# TORCH_SPEC picks the PyTorch build: the CPU wheel by default; e.g. `make TORCH_SPEC="torch==2.13.0
# --index-url https://download.pytorch.org/whl/cu128"` for CUDA. It is installed before the project so
# pip never pulls a CUDA build on its own.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint typecheck pytest fuzz chaos figures clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ddpm up

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
