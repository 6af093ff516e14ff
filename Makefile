# Two commands on a fresh machine: `make run` (the whole stack, serving the demo checkpoint) and `make test`.
#
# Which PyTorch build `make` installs (README, "Which torch"): TORCH_DEVICE=auto picks the CUDA build when
# `nvidia-smi -L` lists a GPU, else the CPU build; TORCH_DEVICE=cpu or cuda forces one; TORCH_SPEC, when given,
# is passed to pip as it is (any build, index or local file). torch goes in before the project, so resolving the
# project's `torch>=2.4,<2.15` never pulls a build on its own; an existing torch in the venv is kept.
#   cpu:  torch==2.13.0+cpu: first from what pip already reaches without PyTorch's index (a local wheel in its
#         find-links, as on the project's machines: no download), else from PyTorch's CPU index
#         (download.pytorch.org/whl/cpu: a ~190 MB wheel); its small dependencies come from PyPI either way
#   cuda: torch==2.13.0+cu126 from PyTorch's CUDA 12.6 index; its nvidia-*-cu12 libraries come from PyPI
#         (~2.5 GB downloaded in all). 12.6 is the CUDA build docker/Dockerfile's CUDA base holds too.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION := 2.13.0
TORCH_CUDA := cu126
TORCH_DEVICE ?= auto
TORCH_SPEC ?=
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

TORCH_INDEX := https://download.pytorch.org/whl

.PHONY: install torch-choice run test lint typecheck pytest fuzz chaos figures image-test compose-test clean

# The build `make` installs here: cpu or cuda (TORCH_DEVICE, else whether nvidia-smi lists a GPU).
torch_device = $(if $(filter cpu cuda,$(TORCH_DEVICE)),$(TORCH_DEVICE),$(if $(filter auto,$(TORCH_DEVICE)),$(shell \
	nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && echo cuda || echo cpu),$(error TORCH_DEVICE must be auto, cpu or cuda)))

# Prints the choice and the pip command(s) `make install` runs for torch (tests/deploy/test_makefile.py reads it).
torch-choice:
	@device=$(torch_device); \
	if [ -n "$(TORCH_SPEC)" ]; then echo "torch: TORCH_SPEC given: pip install $(TORCH_SPEC)"; \
	elif [ $$device = cuda ]; then echo "torch: $(TORCH_VERSION)+$(TORCH_CUDA) (CUDA build, TORCH_DEVICE=$(TORCH_DEVICE)): pip install torch==$(TORCH_VERSION)+$(TORCH_CUDA) --extra-index-url $(TORCH_INDEX)/$(TORCH_CUDA)"; \
	else echo "torch: $(TORCH_VERSION)+cpu (CPU build, TORCH_DEVICE=$(TORCH_DEVICE)): pip install torch==$(TORCH_VERSION)+cpu || pip install torch==$(TORCH_VERSION)+cpu --extra-index-url $(TORCH_INDEX)/cpu"; fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "torch: keeping the installed $$($(BIN)/python -c 'import torch; print(torch.__version__)') (make clean to choose again)"; \
	else \
	  $(MAKE) --no-print-directory torch-choice; \
	  if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q $(TORCH_SPEC); \
	  elif [ "$(torch_device)" = cuda ]; then \
	    $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)+$(TORCH_CUDA) --extra-index-url $(TORCH_INDEX)/$(TORCH_CUDA); \
	  else \
	    $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)+cpu 2>/dev/null \
	      || { echo "torch: no local CPU wheel; downloading it from $(TORCH_INDEX)/cpu"; \
	           $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)+cpu --extra-index-url $(TORCH_INDEX)/cpu; }; \
	  fi; \
	fi
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

# The CPU image and the compose stack, built and run on this machine's Docker engine (docs/DEPLOYMENT.md, "Proven here").
# Needs dockerd running (or DOCKER_HOST), mmdebstrap for the local base images, and the `deploy` extra (Compose).
image-test: $(STAMP)
	$(BIN)/python docker/local/prove.py image

compose-test: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[deploy]'
	$(BIN)/python docker/local/prove.py compose

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
