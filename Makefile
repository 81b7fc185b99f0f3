# Every target sets itself up: a fresh clone needs only Python >= 3.10 and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-stamp
# torch 2.13.0 is pinned only when no torch is importable: a bare `torch` requirement
# would pull a multi-GB CUDA build. GPU users bring their own CUDA torch.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup test test-fast demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[dev,hf,plot,bench]"
	touch $(STAMP)

test: setup
	$(VENV)/bin/pytest

test-fast: setup
	$(VENV)/bin/pytest -m "not slow and not distributed"

# `make demo DEMO_ARGS="--steps 100"` passes options through (see `lowprec demo --help`).
demo: setup
	$(VENV)/bin/lowprec demo $(DEMO_ARGS)

bench: setup
	$(PY) benchmarks/bench_formats.py
	$(PY) benchmarks/bench_optim.py
	$(PY) benchmarks/bench_fp8.py
	$(PY) benchmarks/bench_sensitivity.py
	$(PY) benchmarks/bench_block_scaled.py

lint: setup
	$(VENV)/bin/ruff check lowprec kernels tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info runs bench_results
