# Two entry points for a newcomer: `make demo` and `make test`.
# Both create/reuse .venv and install the project into it first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	bash scripts/check_disk.sh $(VENV) 3000 "installing the venv (torch, transformers, MiniLM)"
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first: the CPU wheel installs from local disk here; a GPU machine keeps its own torch.
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh $(DEMO_DIR)

test: $(STAMP)
	$(VPY) -m pytest -q tests

clean:
	rm -rf $(DEMO_DIR) runs .pytest_cache
