# Two commands do everything on a fresh machine (see README):
#   make run    set up .venv, pretrain BaRP if checkpoints/barp.pt is missing, serve the embedded default
#               (OpenAI-compatible, http://127.0.0.1:8000/v1; Ctrl-C stops it)
#   make test   set up .venv, then the test suite
# and: make eval (offline evaluation of every policy on RouterBench), make bench, make lint
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup run eval bench bench-embedder test lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: 2.13.0 resolves to the CPU build; an unpinned torch pulls GBs of CUDA wheels.
	$(VENV)/bin/pip install --disable-pip-version-check -q torch==2.13.0
	$(VENV)/bin/pip install --disable-pip-version-check -q -e ".[serve,train,dev,onnx]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/banditrouter serve --config configs/local.yaml

eval: $(STAMP)
	$(VENV)/bin/banditrouter eval --dataset routerbench --split test --seed 0 --out reports/routerbench/

# every routing-overhead target in one run (200-char and RouterBench prompts, unloaded latency, the learner's
# absorb rate for BaRP and LinUCB); all figures in reports/bench.json, the ratios printed as JSON
bench: $(STAMP)
	test -f checkpoints/barp.pt || $(VENV)/bin/banditrouter train --policy barp --out checkpoints/barp.pt
	test -f checkpoints/linucb.pt || $(VENV)/bin/banditrouter train --policy linucb --out checkpoints/linucb.pt
	$(VENV)/bin/banditrouter bench --suite --config configs/local.yaml --requests 2000 --concurrency 16 --out reports/bench.json

# embedder backends (torch fp32 vs onnx vs onnx-int8): throughput on 256-token prompts, cosine, BaRP agreement
bench-embedder: $(STAMP)
	$(VENV)/bin/python scripts/bench_embedder.py --out reports/embedder_bench.json

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q

lint: $(STAMP)
	$(VENV)/bin/ruff check banditrouter envs learner deployments tests scripts
	$(VENV)/bin/ruff format --check banditrouter envs learner deployments tests scripts

clean:
	rm -rf $(VENV) reports checkpoints state
