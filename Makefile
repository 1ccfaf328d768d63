# The README's commands. Everything lives in .venv; a second run rebuilds only what changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
BNB_SPEC ?= bitsandbytes==0.50.2
SOURCES := $(shell find csrc -type f) CMakeLists.txt pyproject.toml

.PHONY: setup build test bench serve info cuda-check gpu-check demo-models clean

setup: build

$(VENV)/.deps: requirements-dev.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Keep a torch that is already there; else the local CPU build (never an unpinned, multi-GB CUDA torch).
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements-dev.txt
	# bitsandbytes (the NF4 reference in tests/quant) without its dependencies, so it can never move torch.
	$(PIP) install -q --no-deps "$(BNB_SPEC)"
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m bench

# The OpenAI-compatible server on the built-in demo model (127.0.0.1:8000); SERVE_ARGS adds flags, e.g.
# make serve SERVE_ARGS="--speculative draft --port 8080".
serve: build
	$(PY) -m llmkern.cli serve $(SERVE_ARGS)

info: build
	$(PY) -m llmkern.info

# Retrain the built-in demo pair (about an hour on 2 cores) and rewrite llmkern/models/demo/ with new model cards.
demo-models: build
	$(PY) -m llmkern.cli train pretrain --preset demo-target --out runs/demo-target
	$(PY) -m llmkern.cli train pretrain --preset demo-draft --out runs/demo-draft --tokenizer runs/demo-target/tokenizer
	$(PY) -m llmkern.train.demo --target runs/demo-target --draft runs/demo-draft --dest llmkern/models/demo

cuda-check:
	bash scripts/cuda_check.sh

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build $(VENV)/.built
