# Two commands do everything on a fresh machine (see README):
#   make run    set up .venv, then the main job (offline evaluation on the embedded RouterBench default)
#   make test   set up .venv, then the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup run test lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: 2.13.0 resolves to the CPU build; an unpinned torch pulls GBs of CUDA wheels.
	$(VENV)/bin/pip install --disable-pip-version-check -q torch==2.13.0
	$(VENV)/bin/pip install --disable-pip-version-check -q -e ".[serve,train,dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/banditrouter eval --dataset routerbench --split test --seed 0 --out reports/routerbench/

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q

lint: $(STAMP)
	$(VENV)/bin/ruff check banditrouter envs learner deployments tests scripts
	$(VENV)/bin/ruff format --check banditrouter envs learner deployments tests scripts

clean:
	rm -rf $(VENV) reports checkpoints
